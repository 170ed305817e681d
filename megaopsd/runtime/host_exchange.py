"""Shared memory between the processes of one host: each publishes a CPU tensor, all read it.

Gloo moves a tensor between two processes of one machine through the loopback TCP stack: about
0.6 GB/s on a 2-core VM, where a memory copy runs at more than 20 GB/s. A refit moves half the
model between two CPU trainer ranks (every rank's engine needs every tensor), so on CPU the ranks
of one host exchange the export's tensors through shared memory instead. NCCL does the same
inside a node on GPUs (its SHM and P2P transports): CUDA runs keep the collectives.

    exchange = HostExchange.open(slot_bytes)         # collective; raises Unavailable if a rank is elsewhere
    exchange.publish([(offset, tensor), ...])        # collective, one round ([]: publish nothing)
    peer = exchange.view(rank, offset, shape, dtype) # what ``rank`` published at ``offset`` this round

Each rank owns one file under /dev/shm holding two slots. Every rank of the group maps every
file (populated up front), then the files are unlinked: the memory lives as long as the
mappings, and nothing is left behind when a process dies. A round copies this rank's tensors
into slot ``round % 2`` at the offsets the caller chose (callers agree on them, e.g. from a
plan) and waits for the whole group (one one-element all-reduce). A peer writes that slot
again two rounds later, which it can only start after this rank has joined the next round; so
a view is valid until this rank's next ``publish``, and a reader copies out what it keeps.
Two slots let a rank publish round k+1 while a slower peer still reads round k: with one slot
and a second wait per round, the TP2 refit of bench/weight_sync.py took 1.54 s instead of 1.36 s.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import secrets
from collections.abc import Sequence

import torch
import torch.distributed as dist

_HEADER = 4096  # the owner's token; slots start page-aligned
ALIGN = 64  # offsets inside a slot are multiples of this


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to the next offset a tensor may start at."""
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


class Unavailable(RuntimeError):
    """The group cannot share memory (ranks on other hosts, no /dev/shm or no room in it).

    Raised on every rank of the group together, so all of them fall back to the collectives.
    """


class HostExchange:
    """Two shared-memory slots per rank of ``group``, all ranks on one host (see module docstring).

    Build with ``HostExchange.open``.
    """

    def __init__(
        self,
        maps: Sequence[mmap.mmap],
        *,
        slot_bytes: int,
        rank: int,
        ranks: Sequence[int],
        group: dist.ProcessGroup | None,
    ) -> None:
        self._maps = list(maps)
        self._buffers = [torch.frombuffer(m, dtype=torch.uint8) for m in self._maps]
        self.slot_bytes = slot_bytes
        self.rank = rank  # this process's rank in ``group``
        self.ranks = tuple(ranks)  # global rank of each group rank
        self._group_rank = {global_rank: i for i, global_rank in enumerate(self.ranks)}
        self._group = group
        self._round = -1
        self._flag = torch.zeros(1, dtype=torch.int32)

    @classmethod
    def open(
        cls, slot_bytes: int, *, group: dist.ProcessGroup | None = None, directory: str = "/dev/shm"
    ) -> HostExchange:
        """Collective over ``group``: create, map and unlink every rank's file.

        Args:
            slot_bytes: the most bytes a rank publishes in one round (tensors and their alignment).
            group: the ranks that exchange (None: the world).
            directory: where the files live; a tmpfs, so the slots are memory.

        Raises:
            Unavailable: on every rank, if any rank cannot create its file (no directory, no room:
                the space is reserved up front, so a full tmpfs fails here and not with SIGBUS
                during a sync) or cannot map a peer's (the peer is on another host).
        """
        slot_bytes = aligned(max(slot_bytes, 1))
        size = _HEADER + 2 * slot_bytes
        token = secrets.token_bytes(16)
        path = os.path.join(directory, f"megaopsd-exchange-{secrets.token_hex(8)}")
        problem = ""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
                os.pwrite(fd, token, 0)
            finally:
                os.close(fd)
        except OSError as exc:
            problem = f"cannot create {size} bytes at {path}: {exc}"
        offers: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(offers, (path, token, problem), group=group)
        problem = next((p for _, _, p in offers if p), "")
        maps: list[mmap.mmap] = []
        if not problem:
            for peer_path, peer_token, _ in offers:
                try:
                    maps.append(_map(peer_path, size))
                except OSError as exc:
                    problem = f"cannot map {peer_path} ({exc}): that rank runs on another host"
                    break
                if maps[-1][:16] != peer_token:
                    problem = (
                        f"{peer_path} here is not the file its rank wrote: that rank runs on another host"
                    )
                    break
        verdict = torch.tensor([0 if problem else 1], dtype=torch.int32)
        dist.all_reduce(verdict, op=dist.ReduceOp.MIN, group=group)
        dist.barrier(group=group)  # every rank has mapped (or given up on) every file
        if os.path.exists(path):
            os.unlink(path)
        dist.barrier(group=group)  # and when open returns, no rank's file is left in the directory
        if not int(verdict):
            for m in maps:
                m.close()
            raise Unavailable(problem or "another rank could not share memory with its peers")
        ranks = dist.get_process_group_ranks(group) if group is not None else range(len(offers))
        return cls(maps, slot_bytes=slot_bytes, rank=dist.get_rank(group), ranks=ranks, group=group)

    @property
    def nbytes(self) -> int:
        """Memory this rank's file holds (its two slots and the header)."""
        return _HEADER + 2 * self.slot_bytes

    def _slot(self, group_rank: int) -> torch.Tensor:
        start = _HEADER + (self._round % 2) * self.slot_bytes
        return self._buffers[group_rank][start : start + self.slot_bytes]

    def publish(self, parts: Sequence[tuple[int, torch.Tensor]]) -> None:
        """Collective: start a round; this rank contributes each tensor at its byte offset."""
        self._round += 1
        slot = self._slot(self.rank)
        for offset, tensor in parts:
            self._region(slot, offset, tuple(tensor.shape), tensor.dtype).copy_(tensor)
        dist.all_reduce(self._flag, group=self._group)  # every rank's tensors are in place

    def view(self, global_rank: int, offset: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """What ``global_rank`` published at ``offset`` this round; valid until this rank's next ``publish``."""
        return self._region(self._slot(self._group_rank[global_rank]), offset, tuple(shape), dtype)

    def _region(
        self, slot: torch.Tensor, offset: int, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        end = offset + math.prod(shape) * dtype.itemsize
        if offset % ALIGN or end > self.slot_bytes:
            raise ValueError(
                f"host exchange: a {shape} {dtype} tensor at offset {offset} does not fit the "
                f"{self.slot_bytes}-byte slot at a multiple of {ALIGN} bytes"
            )
        return slot[offset:end].view(dtype).view(shape)

    def close(self) -> None:
        """Unmap the slots (the memory goes back once every rank has closed)."""
        self._buffers = []
        for m in self._maps:
            with contextlib.suppress(BufferError):  # a caller still holds a view: unmapped with it
                m.close()
        self._maps = []


def _map(path: str, size: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR)
    try:
        # MAP_POPULATE: fault every page in now, not during the first syncs (~0.3 s per 100 MB)
        return mmap.mmap(fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
