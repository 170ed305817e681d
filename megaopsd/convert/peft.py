"""LoRA adapters <-> Hugging Face PEFT: gather the TP/PP-sharded adapters, write or read a PEFT adapter.

    tensors = gather_adapters(modules, parallel)           # collective; {peft_name: full tensor} on rank 0
    write_peft_adapter(out_dir, tensors, lora_cfg, spec)   # adapter_config.json + adapter_model.safetensors

PEFT names: ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` (``[r, in]``)
and ``...lora_B.weight`` (``[out, r]``); the shards of ``megaopsd.models.lora`` concatenate to
them along the dimension megatron splits (see its module docstring). Adapters are small (rank
x hidden per module), so they travel as pickled objects over the default group.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from megaopsd.config import LoraConfig
from megaopsd.config.hf_spec import HFModelSpec
from megaopsd.models.lora import adapters_of, peft_names
from megaopsd.runtime.parallel import ParallelState

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _full(local: torch.Tensor, dim: int | None, parallel: ParallelState) -> torch.Tensor:
    """The TP-gathered tensor (on every TP rank) of a shard split along ``dim``; replicated as is."""
    local = local.detach().contiguous()
    if dim is None or parallel.tp_size == 1:
        return local.clone()
    parts = [torch.empty_like(local) for _ in range(parallel.tp_size)]
    dist.all_gather(parts, local, group=parallel.tp_group)
    return torch.cat(parts, dim=dim)


def gather_adapters(
    modules: Sequence[torch.nn.Module],
    parallel: ParallelState,
    *,
    source: Callable[[torch.nn.Parameter], torch.Tensor] = lambda p: p,
    dst: int = 0,
) -> dict[str, torch.Tensor] | None:
    """Collective: every adapter as a full PEFT-named float tensor on global rank ``dst`` (None elsewhere).

    Args:
        modules: this rank's chunks (wrapped or not).
        parallel: this rank's layout.
        source: what to read from each adapter parameter (``lambda p: p.main_grad`` for gradients).
        dst: the receiving global rank.
    """
    mine: dict[str, torch.Tensor] = {}
    for adapters in adapters_of(modules):
        row = adapters.kind == "row"
        for member in adapters.members:
            name_a, name_b = peft_names(adapters, member)
            a = _full(source(adapters.A[member]), 1 if row else None, parallel)
            b = _full(source(adapters.B[member]), None if row else 0, parallel)
            if parallel.tp_rank == 0 and parallel.dp_rank == 0:
                mine[name_a], mine[name_b] = a.float().cpu(), b.float().cpu()
    gathered: list = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(mine, gathered, dst=dst)
    if gathered is None:
        return None
    out: dict[str, torch.Tensor] = {}
    for part in gathered:
        out.update(part)
    return dict(sorted(out.items(), key=lambda item: _order(item[0])))


def _order(name: str) -> tuple[int, str]:
    layer = int(name.split(".layers.")[1].split(".")[0])
    return layer, name


def adapter_config(cfg: LoraConfig, spec: HFModelSpec, base_model: str) -> dict:
    """PEFT's ``adapter_config.json`` for these adapters (plain LoRA, no bias, no rslora)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(cfg.target_modules),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
        "architectures": list(spec.raw.get("architectures", [])),
    }


def write_peft_adapter(
    out_dir: str | Path, tensors: dict[str, torch.Tensor], cfg: LoraConfig, spec: HFModelSpec, base_model: str
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (loadable by ``peft``)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / ADAPTER_WEIGHTS))
    (out / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(cfg, spec, base_model), indent=2) + "\n")
    return out
