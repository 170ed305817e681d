"""HostExchange: shared memory between the ranks of one host, and its refusal when they are not.

Two gloo ranks (spawned processes). "Another host" is played by running each rank in its own
working directory and opening the exchange in ".": a peer's file is then not at the path its
rank named, as on a second machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dist_harness import run_ranks


def rounds_worker(directory: str) -> dict:
    """Publish at several offsets over several rounds; read the peer's tensors back."""
    import torch
    import torch.distributed as dist

    from megaopsd.runtime.host_exchange import HostExchange, aligned

    dist.init_process_group("gloo")
    me, peer = dist.get_rank(), 1 - dist.get_rank()
    exchange = HostExchange.open(1000, directory=directory)
    left_behind = sorted(p.name for p in Path(directory).iterdir())  # unlinked once all mapped
    seen, expected = [], []
    shapes = [((3, 5), torch.float32), ((7,), torch.bfloat16), ((2, 2, 2), torch.int64)]
    for round_index in range(5):  # more than two rounds: both slots are reused
        parts, offset = [], 0
        for k, (shape, dtype) in enumerate(shapes):
            parts.append((offset, torch.full(shape, 100 * me + 10 * round_index + k).to(dtype)))
            offset += aligned(parts[-1][1].numel() * parts[-1][1].element_size())
        exchange.publish(parts)
        for k, ((offset, _), (shape, dtype)) in enumerate(zip(parts, shapes)):
            seen.append(exchange.view(peer, offset, shape, dtype).clone())
            expected.append(torch.full(shape, 100 * peer + 10 * round_index + k).to(dtype))
    errors = []
    for bad in ((8, torch.ones(2)), (992, torch.ones(4))):  # misaligned; past the slot's end
        try:
            exchange.publish([bad])
        except ValueError as exc:
            errors.append(str(exc))
    exchange.close()
    dist.destroy_process_group()
    return {
        "left_behind": left_behind,
        "equal": all(torch.equal(a, b) for a, b in zip(seen, expected)) and len(seen) == 15,
        "errors": errors,
    }


def test_ranks_read_each_others_tensors_over_reused_slots(tmp_path):
    results = run_ranks(rounds_worker, world_size=2, args=(str(tmp_path),))
    for result in results:
        assert result["left_behind"] == []
        assert result["equal"]
        assert len(result["errors"]) == 2 and all("does not fit" in e for e in result["errors"])
    assert list(tmp_path.iterdir()) == []


def refusal_worker(directories: list[str], relative: bool) -> str:
    import os

    import torch.distributed as dist

    from megaopsd.runtime.host_exchange import HostExchange, Unavailable

    dist.init_process_group("gloo")
    directory = directories[dist.get_rank()]
    if relative:
        os.chdir(directory)
    try:
        HostExchange.open(1 << 20, directory="." if relative else directory)
    except Unavailable as exc:
        return str(exc)
    finally:
        dist.barrier()
        dist.destroy_process_group()
    return "opened"


@pytest.mark.parametrize("case", ["other-host", "no-directory"])
def test_every_rank_refuses_together_when_memory_cannot_be_shared(tmp_path, case):
    if case == "other-host":
        directories = [tmp_path / "host-a", tmp_path / "host-b"]
        for directory in directories:
            directory.mkdir()
    else:
        directories = [tmp_path / "missing", tmp_path / "missing"]
    args = ([str(d) for d in directories], case == "other-host")
    results = run_ranks(refusal_worker, world_size=2, args=args)
    assert "opened" not in results  # both ranks fall back, or neither would
    if case == "other-host":
        assert all("another host" in message for message in results)
        assert all(list(d.iterdir()) == [] for d in directories)  # no file left behind
    else:
        assert all("cannot create" in message and "missing" in message for message in results)
