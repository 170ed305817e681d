"""megaopsd entry point: compose the Hydra config, validate it, and run.

    python -m megaopsd.train [overrides]                     # one process
    torchrun --nproc-per-node 2 -m megaopsd.train parallel=tp2
    python -m megaopsd.train --cfg job parallel=tp2           # print the resolved config (Hydra)

Hydra lives only here: the defaults come from the dataclasses in ``megaopsd.config`` (stored
in Hydra's ConfigStore below, so ``conf/`` holds only what differs); the composed config becomes
a plain dict, then frozen dataclasses, validated against the launch's world size before any process group
starts. An invalid config exits with status 2 and one line naming the field and the fix.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from megaopsd.config import (
    Config,
    ConfigError,
    default_tree,
    load_config,
    read_hf_config,
    validate,
    world_size_from_env,
)

DEFAULTS_NAME = "megaopsd_defaults"  # the first entry of conf/config.yaml's defaults list


def register_defaults() -> None:
    """Give Hydra the dataclass defaults as config ``megaopsd_defaults`` (the single source).

    Importing this module registers them; anything that composes ``conf/`` (the entry point,
    Hydra's compose API in tests) must import it first, or Hydra reports the config missing.
    """
    ConfigStore.instance().store(name=DEFAULTS_NAME, node=default_tree())


register_defaults()


def describe_layout(cfg: Config, world_size: int) -> str:
    """One line per fact about the parallel layout this config asks for."""
    par = cfg.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    hf = read_hf_config(cfg.model.hf_path)
    return "\n".join(
        [
            f"model: {hf.get('architectures', ['?'])[0]} from {cfg.model.hf_path} "
            f"({hf['num_hidden_layers']} layers, hidden {hf['hidden_size']}, vocab {hf['vocab_size']})",
            f"world size {world_size} = TP {tp} x PP {pp} x DP {world_size // (tp * pp)}"
            + (
                f", VPP {par.virtual_pipeline_model_parallel_size}"
                if par.virtual_pipeline_model_parallel_size
                else ""
            )
            + (", sequence parallel" if par.sequence_parallel else ""),
            f"loss {cfg.loss.kind} (beta {cfg.loss.beta}"
            + (f", {cfg.loss.clip_mode} clip {cfg.loss.clip:g}" if cfg.loss.clip is not None else "")
            + f"), teacher {cfg.teacher.mode}",
        ]
    )


def build_config(raw: DictConfig) -> Config:
    """Resolve, type and validate the composed config; exit(2) with one line if it is invalid."""
    try:
        cfg = load_config(OmegaConf.to_container(raw, resolve=True))
        validate(cfg, world_size=world_size_from_env())
    except ConfigError as err:
        print(f"megaopsd: {err}", file=sys.stderr)
        sys.exit(2)
    return cfg


def estimate_memory_gib(cfg: Config, world_size: int, *, gpu_gib: float = 80.0) -> dict[str, float]:
    """Rough per-GPU memory of the largest stage, per phase: trainer state, logits, engine.

    Colocated rollouts put an engine worker on every GPU: during generation it holds its
    weights (the full model / engine TP) and its KV cache (``rollout.gpu_memory_utilization`` of
    a ``gpu_gib`` GPU in all) next to the trainer's weights, grads, optimizer and teacher; while
    the trainer trains the engine sleeps (level 1 moves its weights to host memory and frees the
    KV cache; level 0 keeps both). Activations besides the logits are left out (they depend on
    recompute and sequence lengths). ``total`` is the larger of the two phases.
    """
    from megaopsd.config import rollout_placement

    hf = read_hf_config(cfg.model.hf_path)
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    dp = world_size // (tp * pp)
    h, layers, vocab = hf["hidden_size"], hf["num_hidden_layers"], hf["vocab_size"]
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or h // heads
    kv = hf.get("num_key_value_heads") or heads
    per_layer = h * head_dim * (2 * heads + 2 * kv) + 3 * h * hf["intermediate_size"] + 2 * h
    embeddings = vocab * h * (1 if hf.get("tie_word_embeddings") else 2)
    params = (per_layer * layers / pp + embeddings) / tp  # embeddings counted on the worst stage
    weight_bytes = 2 if cfg.model.dtype == "bfloat16" else 4
    adam = 8 + (4 if cfg.model.dtype == "bfloat16" else 0)  # exp_avg + exp_avg_sq (+ fp32 master)
    gib = 1 << 30
    estimate = {
        "weights": params * weight_bytes / gib,
        "grads (fp32)": params * 4 / gib,
        "optimizer": params * adam / (dp if cfg.parallel.use_distributed_optimizer else 1) / gib,
        "teacher copy": params * weight_bytes / gib if cfg.teacher.mode != "current" else 0.0,
    }
    trainer = sum(estimate.values())
    estimate["logits (both streams)"] = 2 * cfg.trainer.microbatch_tokens * vocab / tp * 4 / gib
    ro = cfg.rollout
    engine_weights = engine_kv = 0.0
    if rollout_placement(ro, world_size) == "colocated" or world_size == 1:
        engine_bytes = 2 if (ro.dtype or cfg.model.dtype) == "bfloat16" else 4
        engine_weights = (per_layer * layers + embeddings) * engine_bytes / ro.tensor_parallel_size / gib
        engine_kv = max(ro.gpu_memory_utilization * gpu_gib - engine_weights, 0.0)
    estimate["engine weights"] = engine_weights
    estimate["engine KV cache"] = engine_kv
    asleep = engine_weights + engine_kv if ro.sleep_level == 0 else 0.0
    estimate["during generation"] = trainer + engine_weights + engine_kv
    estimate["during training"] = trainer + estimate["logits (both streams)"] + asleep
    estimate["total"] = max(estimate["during generation"], estimate["during training"])
    return estimate


def quiet_libraries() -> None:
    """Keep the console to megaopsd's status lines: drop known-harmless library chatter.

    megatron-core warns at import that Transformer Engine / Apex are missing (expected on CPU)
    and logs every DDP bucket at INFO; vLLM logs each weight reload. Real warnings still show.
    """
    for pattern in (
        ".*Transformer Engine and Apex are not installed.*",
        ".*Apex is not installed.*",
        ".*full scope is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("megatron").setLevel(logging.WARNING)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(raw: DictConfig) -> None:
    quiet_libraries()
    cfg = build_config(raw)
    world_size = world_size_from_env()
    if cfg.trainer.dry_run:
        print(describe_layout(cfg, world_size))
        for name, value in estimate_memory_gib(cfg, world_size).items():
            print(f"  {name:<22}{value:8.2f} GiB per GPU")
        return
    from megaopsd.trainer import run

    sys.exit(run(cfg))


if __name__ == "__main__":
    main()
