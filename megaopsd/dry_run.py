"""``trainer.dry_run=true``: the layout a config asks for and a per-GPU memory estimate, loading nothing.

    python -m megaopsd.train recipe=qwen3_8b model.hf_path=/models/Qwen3-8B trainer.dry_run=true

Only the model's ``config.json`` is read. The target size is ``trainer.dry_run_world_size``
(the recipes carry their cluster's GPU count), so a laptop can plan a cluster job; without it
the launch's own world size is used.

The memory estimate is a sum of named parts, each from one function in ``MEMORY_PARTS``
(``part(cfg, plan) -> {name: GiB}``). The trainer's own state is one such function; a
component that adds memory on every GPU (a colocated rollout engine, say) adds its function
to the tuple and the printout and the total include it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from megaopsd.config import Config, data_parallel_size, engine_layout, read_hf_config
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
            hf=hf,
            world_size=world_size,
            tp=tp,
            pp=pp,
            dp=data_parallel_size(par, world_size),
            stage_layers=tuple(counts),
        )

    def stage_params(self) -> list[float]:
        """Parameters each pipeline stage holds per TP rank (embedding on the first, output layer on the last)."""
        hf = self.hf
        h, vocab, heads = hf["hidden_size"], hf["vocab_size"], hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or h // heads
        kv = hf.get("num_key_value_heads") or heads
        per_layer = h * head_dim * (2 * heads + 2 * kv) + 3 * h * hf["intermediate_size"] + 2 * h
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


def lora_params(hf: dict, lora) -> int:
    """Adapter elements of one decoder layer: rank x (in + out) of every targeted module."""
    h, ffn = hf["hidden_size"], hf["intermediate_size"]
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or h // heads
    kv = hf.get("num_key_value_heads") or heads
    sizes = {
        "q_proj": (h, heads * head_dim),
        "k_proj": (h, kv * head_dim),
        "v_proj": (h, kv * head_dim),
        "o_proj": (heads * head_dim, h),
        "gate_proj": (h, ffn),
        "up_proj": (h, ffn),
        "down_proj": (ffn, h),
    }
    return sum(lora.rank * sum(sizes[name]) for name in lora.target_modules)


def trainer_memory_gib(cfg: Config, plan: DryRunPlan) -> dict[str, float]:
    """The trainer's state on the largest stage: weights, grads, Adam, teacher copy, logits.

    Activations besides the logits are left out (they depend on recompute and sequence lengths).
    With LoRA the adapters train alone (grads and Adam on them only; upper bound: TP splits one
    factor of each) and the fixed teacher is the base with the adapters off (no copy); the EMA
    teacher is a float32 average of the adapters.
    """
    params = max(plan.stage_params())
    weight_bytes = 2 if cfg.model.dtype == "bfloat16" else 4
    adam = 8 + (4 if cfg.model.dtype == "bfloat16" else 0)  # exp_avg + exp_avg_sq (+ fp32 master)
    optimizer_shards = plan.dp if cfg.parallel.use_distributed_optimizer else 1
    trained, extra = params, 0.0
    teacher = params * weight_bytes if cfg.teacher.mode != "current" else 0.0
    if cfg.lora.enabled:
        trained = extra = lora_params(plan.hf, cfg.lora) * max(plan.stage_layers)
        teacher = trained * 4 if cfg.teacher.mode == "ema" else 0.0
    return {
        "weights": (params + extra) * weight_bytes / GIB,
        "grads (fp32)": trained * 4 / GIB,
        "optimizer": trained * adam / optimizer_shards / GIB,
        "teacher copy": teacher / GIB,
        "logits (both streams)": 2
        * cfg.trainer.microbatch_tokens
        * plan.hf["vocab_size"]
        / plan.tp
        * 4
        / GIB,
    }


def engine_memory_gib(cfg: Config, plan: DryRunPlan, *, gpu_gib: float = 80.0) -> dict[str, float]:
    """The colocated engine on each GPU: its weights (full model / engine TP) and KV cache.

    During generation the engine holds both next to the trainer's state; while the trainer
    trains it sleeps (level 1 moves its weights to host memory and frees the KV cache; level 0
    keeps both), which ``estimate_memory_gib`` accounts per phase.
    """

    ro = cfg.rollout
    if engine_layout(ro, plan.world_size).placement == "rank0":
        return {"engine weights": 0.0, "engine KV cache": 0.0}
    engine_bytes = 2 if (ro.dtype or cfg.model.dtype) == "bfloat16" else 4
    whole = sum(plan.stage_params()) * plan.tp  # every stage's parameters, unsharded
    weights = whole * engine_bytes / ro.tensor_parallel_size / GIB
    kv = max(ro.gpu_memory_utilization * gpu_gib - weights, 0.0)
    return {"engine weights": weights, "engine KV cache": kv}


# Every part of the per-GPU memory estimate; see the module docstring.
MEMORY_PARTS: tuple[Callable[[Config, DryRunPlan], dict[str, float]], ...] = (
    trainer_memory_gib,
    engine_memory_gib,
)


def estimate_memory_gib(cfg: Config, world_size: int) -> dict[str, float]:
    """Rough per-GPU memory by part, per phase (generation / training), and ``total`` (the larger)."""
    plan = DryRunPlan.of(cfg, world_size)
    estimate: dict[str, float] = {}
    for part in MEMORY_PARTS:
        estimate.update(part(cfg, plan))
    engine = estimate.get("engine weights", 0.0) + estimate.get("engine KV cache", 0.0)
    trainer = sum(estimate.values()) - engine - estimate["logits (both streams)"]
    asleep = engine if cfg.rollout.sleep_level == 0 else 0.0
    estimate["during generation"] = trainer + engine
    estimate["during training"] = trainer + estimate["logits (both streams)"] + asleep
    estimate["total"] = max(estimate["during generation"], estimate["during training"])
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
    for name, value in estimate_memory_gib(cfg, world_size).items():
        lines.append(f"  {name:<22}{value:8.2f} GiB per GPU")
    return "\n".join(lines)
