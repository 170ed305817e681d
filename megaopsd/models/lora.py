"""LoRA adapters on megatron-core's tensor-parallel linear layers (local spec).

Each targeted linear keeps its base weight where it is (the names, the import and the export
mapping are unchanged) and gains a child ``lora`` holding one adapter per Hugging Face module
it fuses: ``linear_qkv`` -> q_proj, k_proj, v_proj; ``linear_fc1`` -> gate_proj, up_proj;
``linear_proj`` -> o_proj; ``linear_fc2`` -> down_proj. The layer returns
``base(x) + (alpha / r) * B @ A @ dropout(x)``.

TP layout (the shards concatenate to the HF PEFT tensors, so any TP equals TP1):

- column-parallel (qkv, fc1): A ``[r, in]`` replicated, B ``[out_shard, r]`` split like the
  member's rows of the base weight (q/k/v rows of this rank's query groups; gate/up rows of
  this rank). ``h = x @ A^T`` is the same on every TP rank; its gradient is the sum over the
  ranks' B shards, so ``h`` passes megatron's copy-to-TP region (all-reduce in backward), or
  with sequence parallel the sequence all-gather (reduce-scatter in backward, A's gradient
  then summed over TP by ``finalize_model_grads`` through the ``sequence_parallel`` flag).
- row-parallel (proj, fc2): A ``[r, in_shard]`` split like the base input columns, B
  ``[out, r]`` replicated; ``h`` is all-reduced (or reduce-scattered with SP) over TP.

The base weights are frozen by ``add_lora`` before DDP wraps the chunks, so megatron's DDP
buffers and optimizer see the adapters alone. ``adapter_mode(modules, "off")`` bypasses every
adapter (the fixed teacher is the same network with the adapters switched off). The
Transformer Engine spec fuses the pre-norm into ``linear_qkv``/``linear_fc1``; it is refused
by config validation (untested).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
from collections.abc import Iterator, Sequence

import torch

from megaopsd.config import LoraConfig
from megaopsd.models.builder import unwrap_chunk

# megatron linear (relative to a decoder layer) -> kind, HF module prefix, fused members
LINEARS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "self_attention.linear_qkv": ("qkv", "self_attn.", ("q_proj", "k_proj", "v_proj")),
    "self_attention.linear_proj": ("row", "self_attn.", ("o_proj",)),
    "mlp.linear_fc1": ("gate_up", "mlp.", ("gate_proj", "up_proj")),
    "mlp.linear_fc2": ("row", "mlp.", ("down_proj",)),
}
MODES = ("on", "off", "shadow")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Geometry:
    kind: str  # qkv | gate_up | row
    rows_per_group: tuple[int, ...]  # qkv: rows of q, k, v per query group (interleave unit)


class LoraAdapters(torch.nn.Module):
    """The adapters of one linear layer: ``A[member]``, ``B[member]`` and the switch."""

    def __init__(
        self, *, kind: str, hf_prefix: str, members: tuple[str, ...], cfg: LoraConfig, geo: _Geometry
    ):
        super().__init__()
        self.kind, self.hf_prefix, self.members = kind, hf_prefix, members
        self.scale = cfg.scale
        self.dropout = cfg.dropout
        self.geo = geo
        self.A = torch.nn.ParameterDict()
        self.B = torch.nn.ParameterDict()
        self.mode = "on"  # on | off (bypass) | shadow (use ``shadow`` tensors, e.g. an EMA)
        self.shadow: dict[str, torch.Tensor] = {}
        self.tp_group = None
        self.tp_size = 1
        self.sequence_parallel = False

    def tensors(self, member: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in use now: the parameters, or the shadow copies in ``shadow`` mode."""
        if self.mode == "shadow":
            return self.shadow[f"A.{member}"], self.shadow[f"B.{member}"]
        return self.A[member], self.B[member]

    def assemble(self, parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        """Members' outputs (or weight rows) -> the fused layer's layout along ``dim``."""
        if self.kind != "qkv":
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
        moved = [p.movedim(dim, -1) for p in parts]
        groups = moved[0].shape[-1] // self.geo.rows_per_group[0]
        split = [m.reshape(*m.shape[:-1], groups, rows) for m, rows in zip(moved, self.geo.rows_per_group)]
        fused = torch.cat(split, dim=-1).reshape(*moved[0].shape[:-1], -1)
        return fused.movedim(-1, dim)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``(alpha/r) B A x`` in the layer's output layout (this rank's shard)."""
        from megatron.core import tensor_parallel as tpl

        if self.dropout > 0 and self.training:
            x = torch.nn.functional.dropout(x, p=self.dropout)
        pairs = [self.tensors(m) for m in self.members]
        if self.kind == "row":
            (a, b) = pairs[0]
            h = torch.matmul(x, a.t())
            if self.sequence_parallel:
                h = tpl.reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
            elif self.tp_size > 1:
                h = tpl.reduce_from_tensor_model_parallel_region(h, group=self.tp_group)
            return torch.matmul(h, b.t()) * self.scale
        rank = pairs[0][0].shape[0]
        h = torch.matmul(x, torch.cat([a for a, _ in pairs], dim=0).t())
        if self.sequence_parallel:
            h = tpl.gather_from_sequence_parallel_region(h, group=self.tp_group)
        elif self.tp_size > 1:
            h = tpl.copy_to_tensor_model_parallel_region(h, group=self.tp_group)
        parts = [torch.matmul(h[..., i * rank : (i + 1) * rank], b.t()) for i, (_, b) in enumerate(pairs)]
        return self.assemble(parts, dim=-1) * self.scale

    @torch.no_grad()
    def weight_delta(self) -> torch.Tensor:
        """``(alpha/r) B A`` as this rank's shard of the base weight ``[out_shard, in_shard]``."""
        pairs = [self.tensors(m) for m in self.members]
        parts = [torch.matmul(b.float(), a.float()) * self.scale for a, b in pairs]
        return self.assemble(parts, dim=0)


def _seed(base: int, layer: int, name: str) -> int:
    digest = hashlib.sha256(f"{base}/{layer}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _init_a(cfg: LoraConfig, layer: int, member: str, in_full: int, dtype: torch.dtype) -> torch.Tensor:
    """The full ``[r, in]`` A, from a stream of its own (the layout and the model RNG do not matter)."""
    gen = torch.Generator().manual_seed(_seed(cfg.seed, layer, member))
    if cfg.init == "gaussian":
        full = torch.randn(cfg.rank, in_full, generator=gen) / cfg.rank
    else:  # kaiming_uniform(a=sqrt(5)) as in torch.nn.Linear and PEFT: bound 1/sqrt(fan_in)
        bound = 1.0 / math.sqrt(in_full)
        full = torch.rand(cfg.rank, in_full, generator=gen) * (2 * bound) - bound
    return full.to(dtype)


def _mark(param: torch.nn.Parameter, partition_dim: int | None, sequence_parallel: bool) -> None:
    """megatron's TP attributes: sharded along ``partition_dim``, or replicated (grads summed with SP)."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    if partition_dim is not None:
        set_tensor_model_parallel_attributes(param, True, partition_dim, 1)
    elif sequence_parallel:
        param.sequence_parallel = True


def _attach(
    linear: torch.nn.Module, name: str, layer: int, cfg: LoraConfig, model_cfg
) -> LoraAdapters | None:
    """Add the adapters of ``cfg.target_modules`` fused in ``linear``; None if none is targeted."""
    from megatron.core import parallel_state

    kind, hf_prefix, members = LINEARS[name]
    chosen = tuple(m for m in members if m in cfg.target_modules)
    if not chosen:
        return None
    if len(chosen) != len(members):
        raise ValueError(
            f"lora.target_modules holds {list(chosen)} but not all of {list(members)}, which megatron fuses "
            f"into one layer; target all of them or none"
        )
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    heads, groups = model_cfg.num_attention_heads, model_cfg.num_query_groups
    hd = model_cfg.kv_channels
    geo = _Geometry(kind=kind, rows_per_group=((heads // groups) * hd, hd, hd) if kind == "qkv" else ())
    adapters = LoraAdapters(kind=kind, hf_prefix=hf_prefix, members=members, cfg=cfg, geo=geo)
    adapters.tp_group = parallel_state.get_tensor_model_parallel_group()
    adapters.tp_size, adapters.sequence_parallel = tp, model_cfg.sequence_parallel
    weight = linear.weight
    out_shard, in_shard = weight.shape
    if kind == "qkv":
        local_groups = out_shard // sum(geo.rows_per_group)
        member_rows = [local_groups * rows for rows in geo.rows_per_group]
    else:
        member_rows = [out_shard // len(members)] * len(members) if kind == "gate_up" else [out_shard]
    for member, rows in zip(members, member_rows):
        in_full = in_shard * (tp if kind == "row" else 1)
        a = _init_a(cfg, layer, member, in_full, weight.dtype)
        if kind == "row":
            a = a[:, tp_rank * in_shard : (tp_rank + 1) * in_shard]
        adapters.A[member] = torch.nn.Parameter(a.contiguous().to(weight.device))
        adapters.B[member] = torch.nn.Parameter(
            torch.zeros(rows, cfg.rank, dtype=weight.dtype, device=weight.device)
        )
        row = kind == "row"
        _mark(adapters.A[member], 1 if row else None, model_cfg.sequence_parallel and not row)
        _mark(adapters.B[member], None if row else 0, model_cfg.sequence_parallel and row)
    linear.lora = adapters
    original = linear.forward

    def forward(input_, *args, **kwargs):
        output, bias = original(input_, *args, **kwargs)
        if adapters.mode == "off":
            return output, bias
        return output + adapters.delta(input_), bias

    linear.forward = forward
    _fix_sharded_state(linear, adapters)
    weight.lora_adapters = adapters  # the export merges through this (see ``merged_shard``)
    return adapters


def _fix_sharded_state(linear: torch.nn.Module, adapters: LoraAdapters) -> None:
    """megatron's linear treats every entry but ``weight``/``bias`` as replicated; the adapter
    shards are re-declared with their TP split so checkpoints reshard like the base weights."""
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    original = linear.sharded_state_dict
    row = adapters.kind == "row"

    def sharded_state_dict(prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        state = original(prefix=prefix, sharded_offsets=sharded_offsets, metadata=metadata)
        local, axes = {}, {}
        for kind, params in (("A", adapters.A), ("B", adapters.B)):
            split = (kind == "A") == row  # row: A split on inputs; column: B split on outputs
            for member, param in params.items():
                key = f"lora.{kind}.{member}"
                local[key] = param
                if split:
                    axes[key] = 1 if row else 0
        state.update(make_sharded_tensors_for_checkpoint(local, prefix, axes, sharded_offsets))
        return state

    linear.sharded_state_dict = sharded_state_dict


def base_fingerprint(hf_path: str) -> str:
    """A content fingerprint of the base model: config.json, and for every weight file its
    name, size, its last 64 KiB and 64 KiB samples at 17 evenly spaced offsets (a different checkpoint of the
    same architecture differs in every sample; hashing 16 GB would take a minute)."""
    from pathlib import Path

    root = Path(hf_path)
    digest = hashlib.sha256((root / "config.json").read_bytes())
    for path in sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as handle:
            for i in range(17):
                handle.seek(size * i // 17)
                digest.update(handle.read(1 << 16))
            handle.seek(max(size - (1 << 16), 0))
            digest.update(handle.read())
    return digest.hexdigest()[:32]


def add_lora(chunks: Sequence[torch.nn.Module], cfg: LoraConfig) -> list[LoraAdapters]:
    """Freeze every base parameter and attach adapters to the targeted linears of every layer.

    Call on unwrapped chunks, after the base weights are loaded and before DDP wraps them.
    """
    found = []
    for chunk in map(unwrap_chunk, chunks):
        chunk.requires_grad_(False)
        for layer in chunk.decoder.layers:
            for name, (_, _, members) in LINEARS.items():
                if not set(members) & set(cfg.target_modules):
                    continue  # not targeted (a mixture-of-experts layer has no mlp.linear_fc1)
                linear = layer.get_submodule(name)
                adapters = _attach(linear, name, layer.layer_number - 1, cfg, chunk.config)
                if adapters is not None:
                    adapters.layer = layer.layer_number - 1
                    found.append(adapters)
    return found


def adapters_of(modules: Sequence[torch.nn.Module]) -> list[LoraAdapters]:
    """Every adapter module inside ``modules`` (wrapped or not), in module order."""
    return [m for module in modules for m in module.modules() if isinstance(m, LoraAdapters)]


@contextlib.contextmanager
def adapter_mode(adapters: Sequence[LoraAdapters], mode: str) -> Iterator[None]:
    """Run the block with every adapter in ``mode`` (on | off | shadow), restoring the old modes."""
    if mode not in MODES:
        raise ValueError(f"adapter mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    previous = [a.mode for a in adapters]
    for a in adapters:
        a.mode = mode
    try:
        yield
    finally:
        for a, old in zip(adapters, previous):
            a.mode = old


def merged_shard(param: torch.Tensor) -> torch.Tensor:
    """``param`` with its adapters merged (``W + (alpha/r) B A``, this rank's shard); as is otherwise."""
    adapters = getattr(param, "lora_adapters", None)
    if adapters is None or adapters.mode == "off":
        return param.detach()
    return (param.detach().float() + adapters.weight_delta()).to(param.dtype)


def peft_names(adapters: LoraAdapters, member: str) -> tuple[str, str]:
    """The PEFT tensor names of ``member``'s A and B (``base_model.model.model.layers.{i}...``)."""
    base = f"base_model.model.model.layers.{adapters.layer}.{adapters.hf_prefix}{member}"
    return f"{base}.lora_A.weight", f"{base}.lora_B.weight"
