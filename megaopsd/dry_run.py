"""``trainer.dry_run=true``: the layout a config asks for and a per-GPU memory estimate, loading nothing.

    python -m megaopsd.train recipe=qwen3_8b model.hf_path=/models/Qwen3-8B trainer.dry_run=true

Only the model's ``config.json`` is read. The target size is ``trainer.dry_run_world_size``
(the recipes carry their cluster's GPU count), so a laptop can plan a cluster job; without it
the launch's own world size is used.

The memory estimate is a sum of named parts, each from one function in ``MEMORY_PARTS``
(``part(cfg, plan) -> {name: GiB}``). The trainer's own state is one such function; a
component that adds memory on every GPU (a colocated rollout engine, say) adds its function
to the tuple and the printout and the total include it. ``total`` is the sum of every part,
the peak with an engine that never sleeps; ``phase_memory_gib`` splits it into what each GPU
holds while generating and while training (the engine asleep per ``rollout.sleep_level``).

The colocated engine (``rollout_engine_memory_gib``) holds the whole model over its own TP,
in the engine dtype. Its KV cache: on CPU (``runtime.device=cpu``) ``rollout.kv_cache_gib``;
otherwise the target is a GPU and vLLM's ``gpu_memory_utilization`` is a fraction of the
device (``trainer.dry_run_gpu_gib``) that covers the engine's weights and its KV cache, so
the KV cache is that fraction minus the engine weights (vLLM's own activation scratch, a few
hundred MiB, is left out).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from megaopsd.config import Config, read_hf_config
from megaopsd.stages import stage_layer_counts

GIB = 1 << 30


@dataclasses.dataclass(frozen=True, kw_only=True)
class DryRunPlan:
    """The numbers of a planned run: model shape from config.json, and the parallel layout."""

    hf: Mapping[str, Any]
    world_size: int
    tp: int
    pp: int
    dp: int
    stage_layers: tuple[int, ...]  # decoder layers per pipeline stage, first to last

    @classmethod
    def of(cls, cfg: Config, world_size: int) -> DryRunPlan:
        hf = read_hf_config(cfg.model.hf_path)
        par = cfg.parallel
        tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
        counts = stage_layer_counts(
            hf["num_hidden_layers"],
            pp,
            par.num_layers_in_first_pipeline_stage,
            par.num_layers_in_last_pipeline_stage,
        )
        return cls(
            hf=hf, world_size=world_size, tp=tp, pp=pp, dp=world_size // (tp * pp), stage_layers=tuple(counts)
        )

    def model_params(self) -> float:
        """Parameters of the whole model, each tensor once (what one inference engine loads)."""
        hf = self.hf
        h, vocab = hf["hidden_size"], hf["vocab_size"]
        output = 0 if hf.get("tie_word_embeddings") else vocab * h
        return hf["num_hidden_layers"] * _layer_params(hf) + vocab * h + output + h

    def stage_params(self) -> list[float]:
        """Parameters each pipeline stage holds per TP rank (embedding on the first, output layer on the last)."""
        hf = self.hf
        h, vocab = hf["hidden_size"], hf["vocab_size"]
        per_layer = _layer_params(hf)
        embedding = vocab * h
        # With tied embeddings one tensor serves both ends on a single stage; with PP the last
        # stage keeps its own copy of the output layer.
        output = 0 if hf.get("tie_word_embeddings") and self.pp == 1 else vocab * h
        params = []
        for stage, layers in enumerate(self.stage_layers):
            count = layers * per_layer
            count += embedding if stage == 0 else 0
            count += output + h if stage == self.pp - 1 else 0
            params.append(count / self.tp)
        return params


def _layer_params(hf: Mapping[str, Any]) -> int:
    """Parameters of one decoder layer: attention (q, k, v, o), SwiGLU MLP, two norms."""
    h, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or h // heads
    kv = hf.get("num_key_value_heads") or heads
    return h * head_dim * (2 * heads + 2 * kv) + 3 * h * hf["intermediate_size"] + 2 * h


def trainer_memory_gib(cfg: Config, plan: DryRunPlan) -> dict[str, float]:
    """The trainer's state on the largest stage: weights, grads, Adam, teacher copy, logits.

    Activations besides the logits are left out (they depend on recompute and sequence lengths).
    """
    params = max(plan.stage_params())
    weight_bytes = 2 if cfg.model.dtype == "bfloat16" else 4
    adam = 8 + (4 if cfg.model.dtype == "bfloat16" else 0)  # exp_avg + exp_avg_sq (+ fp32 master)
    optimizer_shards = plan.dp if cfg.parallel.use_distributed_optimizer else 1
    return {
        "weights": params * weight_bytes / GIB,
        "grads (fp32)": params * 4 / GIB,
        "optimizer": params * adam / optimizer_shards / GIB,
        "teacher copy": params * weight_bytes / GIB if cfg.teacher.mode != "current" else 0.0,
        "logits (both streams)": 2
        * cfg.trainer.microbatch_tokens
        * plan.hf["vocab_size"]
        / plan.tp
        * 4
        / GIB,
    }


ENGINE_WEIGHTS = "engine weights"
ENGINE_KV = "engine KV cache"
LOGITS = "logits (both streams)"


def rollout_engine_memory_gib(cfg: Config, plan: DryRunPlan) -> dict[str, float]:
    """The vLLM engine on each GPU: the whole model over the engine's TP, and its KV cache.

    Colocated placement (the default with more than one process) puts an engine on every GPU;
    rank0 placement puts one on GPU 0 only, which is then the fullest GPU, the one reported.
    """
    engine_dtype = cfg.rollout.dtype or cfg.model.dtype
    weight_bytes = 2 if engine_dtype == "bfloat16" else 4
    weights = plan.model_params() * weight_bytes / cfg.rollout.tensor_parallel_size / GIB
    if cfg.runtime.device == "cpu":
        kv = cfg.rollout.kv_cache_gib
    else:
        kv = max(0.0, cfg.rollout.gpu_memory_utilization * cfg.trainer.dry_run_gpu_gib - weights)
    return {ENGINE_WEIGHTS: weights, ENGINE_KV: kv}


# Every part of the per-GPU memory estimate; see the module docstring.
MEMORY_PARTS: tuple[Callable[[Config, DryRunPlan], dict[str, float]], ...] = (
    trainer_memory_gib,
    rollout_engine_memory_gib,
)


def engine_sleeps(cfg: Config) -> bool:
    """Whether the engine frees GPU memory while training (sleep mode is CUDA-only)."""
    return cfg.rollout.sleep_level > 0 and cfg.runtime.device != "cpu"


def phase_memory_gib(cfg: Config, estimate: Mapping[str, float]) -> dict[str, float]:
    """Per-GPU memory while generating and while training, from ``estimate_memory_gib``'s parts.

    Generating: the trainer's state and the awake engine (no training logits). Training: the
    trainer's state and logits; an asleep engine frees its KV cache, and its weights too (level 1
    offloads them to host RAM, level 2 drops them and the sync reloads them).
    """
    parts = {k: v for k, v in estimate.items() if k != "total"}
    asleep = {ENGINE_WEIGHTS, ENGINE_KV} if engine_sleeps(cfg) else set()
    return {
        "generation": sum(v for k, v in parts.items() if k != LOGITS),
        "training": sum(v for k, v in parts.items() if k not in asleep),
    }


def estimate_memory_gib(cfg: Config, world_size: int) -> dict[str, float]:
    """Rough per-GPU memory by part, plus ``total``, for ``cfg`` on ``world_size`` GPUs."""
    plan = DryRunPlan.of(cfg, world_size)
    estimate: dict[str, float] = {}
    for part in MEMORY_PARTS:
        estimate.update(part(cfg, plan))
    estimate["total"] = sum(estimate.values())
    return estimate


def describe_layout(cfg: Config, world_size: int) -> str:
    """One line per fact about the parallel layout this config asks for."""
    plan = DryRunPlan.of(cfg, world_size)
    par, hf = cfg.parallel, plan.hf
    vpp = par.virtual_pipeline_model_parallel_size
    lines = [
        f"model: {hf.get('architectures', ['?'])[0]} from {cfg.model.hf_path} "
        f"({hf['num_hidden_layers']} layers, hidden {hf['hidden_size']}, vocab {hf['vocab_size']})",
        f"world size {world_size} = TP {plan.tp} x PP {plan.pp} x DP {plan.dp}"
        + (f", VPP {vpp}" if vpp else "")
        + (", sequence parallel" if par.sequence_parallel else ""),
    ]
    if plan.pp > 1:
        lines.append("layers per pipeline stage: " + " + ".join(map(str, plan.stage_layers)))
    clip = f", {cfg.loss.clip_mode} clip {cfg.loss.clip:g}" if cfg.loss.clip is not None else ""
    lines.append(f"loss {cfg.loss.kind} (beta {cfg.loss.beta}{clip}), teacher {cfg.teacher.mode}")
    return "\n".join(lines)


def dry_run_report(cfg: Config, world_size: int) -> str:
    """What ``trainer.dry_run=true`` prints: the layout, then the memory estimate per GPU."""
    lines = [describe_layout(cfg, world_size)]
    estimate = estimate_memory_gib(cfg, world_size)
    for name, value in estimate.items():
        lines.append(f"  {name:<22}{value:8.2f} GiB per GPU")
    ro = cfg.rollout
    if cfg.runtime.device == "cpu":
        kv_source = f"rollout.kv_cache_gib {ro.kv_cache_gib:g}"
    else:
        kv_source = (
            f"gpu_memory_utilization {ro.gpu_memory_utilization:g} x {cfg.trainer.dry_run_gpu_gib:g} GiB"
            " minus engine weights"
        )
    lines.append(
        f"engine: TP {ro.tensor_parallel_size}, KV cache from {kv_source}, sleep level {ro.sleep_level}"
    )
    phases = phase_memory_gib(cfg, estimate)
    if not engine_sleeps(cfg):
        asleep = "engine stays awake"
    elif ro.sleep_level == 1:
        asleep = f"engine asleep: KV freed, weights on host ({estimate[ENGINE_WEIGHTS]:.2f} GiB per GPU)"
    else:
        asleep = "engine asleep: KV and weights freed"
    lines.append(f"  phase generation      {phases['generation']:8.2f} GiB per GPU (trainer state + engine)")
    lines.append(f"  phase training        {phases['training']:8.2f} GiB per GPU ({asleep})")
    return "\n".join(lines)
