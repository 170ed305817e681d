"""``validate``: every cross-field rule, checked before any process group exists.

Each failure is a ``ConfigError`` whose message is one line naming the field, the problem and
the fix. The launch facts come in as arguments: the world size (``validate(cfg, world_size=)``)
and the model's ``config.json`` (read from ``model.hf_path`` when not given).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from megaopsd.config.engines import engine_layout, rollout_placement
from megaopsd.config.hf_spec import (
    HFModelSpec,
    UnsupportedModelError,
    load_hf_config,
    tensor_parallel_problem,
)
from megaopsd.config.schema import (
    ADD_A_MODEL,
    LORA_TARGETS,
    Config,
    ConfigError,
    ModelConfig,
    ParallelConfig,
    check_literal,
)
from megaopsd.config.schema import fail as _fail
from megaopsd.stages import FIRST, LAST, check_stages, interleaved_min_microbatches


def _validate_choices(cfg: Config) -> None:
    """Every Literal-typed field of every section holds one of its choices."""
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        hints = typing.get_type_hints(type(value))
        for field in dataclasses.fields(value):
            annotation = hints[field.name]
            literal = typing.get_origin(annotation) is typing.Literal or any(
                typing.get_origin(o) is typing.Literal for o in typing.get_args(annotation)
            )
            if literal:
                check_literal(f"{section.name}.{field.name}", getattr(value, field.name), annotation)


def read_hf_config(hf_path: str) -> dict[str, Any]:
    """The model's ``config.json``, with a clear error if the directory is not a model."""
    config_file = Path(hf_path) / "config.json"
    if not config_file.is_file():
        _fail("model.hf_path", hf_path, "has no config.json", "point it at a Hugging Face model directory")
    return json.loads(config_file.read_text())


def _model_spec(hf_path: str, hf: Mapping[str, Any]) -> HFModelSpec:
    """The parsed model config; an architecture or option megaopsd cannot build is a config error."""
    try:
        return load_hf_config(hf)
    except UnsupportedModelError as err:
        _fail("model.hf_path", hf_path, f"holds a model megaopsd cannot build ({err})", ADD_A_MODEL)
    except KeyError as err:
        _fail("model.hf_path", hf_path, f"has a config.json without {err}", "point it at a causal-LM model")


def _validate_experts(cfg: Config, world_size: int, spec: HFModelSpec) -> None:
    """Expert parallelism: megatron's rules, one line each, before any process group."""
    par = cfg.parallel
    ep, etp = par.expert_model_parallel_size, par.expert_tensor_parallel_size
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    mlp_targets = sorted(set(cfg.lora.target_modules) & {"gate_proj", "up_proj", "down_proj"})
    if spec.moe is not None and cfg.lora.enabled and mlp_targets:
        _fail(
            "lora.target_modules",
            list(cfg.lora.target_modules),
            f"adapts {', '.join(mlp_targets)}, which a mixture-of-experts model has once per expert "
            "(adapters on experts are not implemented)",
            "target the attention only: lora.target_modules=[q_proj,k_proj,v_proj,o_proj]",
        )
    if spec.moe is None:
        for field, value in (("expert_model_parallel_size", ep), ("expert_tensor_parallel_size", etp)):
            if value != 1:
                _fail(
                    f"parallel.{field}",
                    value,
                    f"needs a mixture-of-experts model ({spec.architecture} is dense)",
                    "set it to 1",
                )
        return
    for field, value in (("expert_model_parallel_size", ep), ("expert_tensor_parallel_size", etp)):
        if value < 1:
            _fail(
                f"parallel.{field}", value, "must be >= 1", "use 1 to keep every expert whole on every rank"
            )
    if spec.moe.num_experts % ep:
        _fail(
            "parallel.expert_model_parallel_size",
            ep,
            f"does not divide num_experts={spec.moe.num_experts}",
            "pick an EP that divides the expert count",
        )
    if spec.moe.expert_ffn_hidden_size % etp:
        _fail(
            "parallel.expert_tensor_parallel_size",
            etp,
            f"does not divide moe_intermediate_size={spec.moe.expert_ffn_hidden_size}",
            "use 1 or a divisor of the expert width",
        )
    if world_size % (etp * ep * pp):
        _fail(
            "parallel.expert_model_parallel_size",
            ep,
            f"x expert_tensor_parallel_size={etp} x pipeline_model_parallel_size={pp} does not divide the "
            f"world size {world_size}",
            f"launch a multiple of {etp * ep * pp} processes or lower EP / expert TP",
        )
    if ep > 1 and tp > 1 and not par.sequence_parallel:
        _fail(
            "parallel.sequence_parallel",
            False,
            f"must be true with tensor_model_parallel_size={tp} and expert_model_parallel_size={ep} "
            "(megatron's expert dispatch reads sequence-parallel activations)",
            "set parallel.sequence_parallel=true",
        )


def _validate_parallel(cfg: Config, world_size: int, spec: HFModelSpec) -> None:
    par = cfg.parallel
    tp, pp, vpp = (
        par.tensor_model_parallel_size,
        par.pipeline_model_parallel_size,
        par.virtual_pipeline_model_parallel_size,
    )
    if tp < 1:
        _fail("parallel.tensor_model_parallel_size", tp, "must be >= 1", "use 1 for no tensor parallelism")
    if pp < 1:
        _fail(
            "parallel.pipeline_model_parallel_size", pp, "must be >= 1", "use 1 for no pipeline parallelism"
        )
    if world_size % (tp * pp) != 0:
        _fail(
            "parallel.tensor_model_parallel_size",
            tp,
            f"x pipeline_model_parallel_size={pp} does not divide the world size {world_size}",
            f"set trainer.dry_run_world_size to the target GPU count (a multiple of {tp * pp})"
            if cfg.trainer.dry_run
            else f"launch a multiple of {tp * pp} processes or change TP/PP",
        )

    problem = tensor_parallel_problem(spec, tp)
    if problem is not None:
        _fail("parallel.tensor_model_parallel_size", tp, problem, "pick a TP that divides both head counts")
    _validate_experts(cfg, world_size, spec)
    first, last = par.num_layers_in_first_pipeline_stage, par.num_layers_in_last_pipeline_stage
    problem = check_stages(spec.num_layers, pp, vpp, first, last)
    if problem is not None:
        field = "parallel.pipeline_model_parallel_size" if first is None and last is None else FIRST
        field = LAST if first is None and last is not None else field
        raise ConfigError(f"config: {field}: {problem}")
    even_stages = first is None and last is None and problem is None
    chunk_layers = spec.num_layers // (pp * (vpp or 1))
    if (
        even_stages
        and cfg.model.recompute_granularity == "full"
        and cfg.model.recompute_num_layers > chunk_layers
    ):
        _fail(
            "model.recompute_num_layers",
            cfg.model.recompute_num_layers,
            f"exceeds the {chunk_layers} layers of a pipeline chunk",
            f"use 1..{chunk_layers}",
        )
    if vpp is not None and (vpp < 2 or pp < 2):
        _fail(
            "parallel.virtual_pipeline_model_parallel_size",
            vpp,
            "needs pipeline_model_parallel_size >= 2 and a value >= 2",
            "set it to null or raise PP",
        )
    if par.overlap_param_gather and not par.use_distributed_optimizer:
        _fail(
            "parallel.overlap_param_gather",
            True,
            "needs the distributed optimizer",
            "set parallel.use_distributed_optimizer=true or overlap_param_gather=false",
        )
    if par.sequence_parallel and tp == 1:
        _fail(
            "parallel.sequence_parallel",
            True,
            "needs tensor_model_parallel_size > 1",
            "set parallel.sequence_parallel=false",
        )
    if cfg.model.dtype == "bfloat16" and not par.use_distributed_optimizer:
        # megatron-core 0.16.1's Float16OptimizerWithFloat16Params maps only its bfloat16
        # parameters to checkpoint tensors; the model's float32 ones make the save fail
        # ("Param id N does not match"). The distributed optimizer saves both.
        _fail(
            "parallel.use_distributed_optimizer",
            False,
            "cannot checkpoint a bfloat16 model (megatron's non-distributed mixed-precision optimizer "
            "leaves the model's float32 parameters out of its checkpoint)",
            "set parallel.use_distributed_optimizer=true (it works at any data-parallel size, 1 included)",
        )


def _validate_algorithm(cfg: Config) -> None:
    loss, teacher, rollout = cfg.loss, cfg.teacher, cfg.rollout
    if not 0.0 <= loss.beta <= 1.0:
        _fail("loss.beta", loss.beta, "is outside [0, 1]", "use 0 (forward KL) .. 1 (reverse KL)")
    if loss.temperature <= 0:
        _fail("loss.temperature", loss.temperature, "must be > 0", "use 1.0 for no temperature scaling")
    if loss.kind in ("topk", "topk_tail") and loss.top_k < 1:
        _fail(
            "loss.top_k", loss.top_k, "must be >= 1", "set loss.top_k to the number of teacher tokens to keep"
        )
    if loss.clip is not None and loss.kind == "pg":
        _fail("loss.clip", loss.clip, "is not defined for loss.kind=pg", "set loss.clip=null")
    if loss.clip is not None and loss.clip <= 0:
        _fail("loss.clip", loss.clip, "must be > 0", "set loss.clip=null to disable clipping")
    if loss.clip_mode == "entry" and loss.clip is None:
        _fail(
            "loss.clip_mode", "entry", "needs loss.clip", "set loss.clip (e.g. 0.05) or loss.clip_mode=token"
        )
    if loss.chunk_tokens < 1:
        _fail("loss.chunk_tokens", loss.chunk_tokens, "must be >= 1", "use e.g. 1024")
    if teacher.mode == "ema" and not 0.0 <= teacher.ema_decay < 1.0:
        _fail("teacher.ema_decay", teacher.ema_decay, "must be in [0, 1)", "use e.g. 0.99")
    _validate_lora(cfg)
    if rollout.temperature <= 0:
        _fail(
            "rollout.temperature",
            rollout.temperature,
            "must be > 0",
            "on-policy sampling needs a positive temperature",
        )
    if not 0.0 < rollout.top_p <= 1.0:
        _fail("rollout.top_p", rollout.top_p, "is outside (0, 1]", "use 1.0 to disable nucleus sampling")
    if rollout.top_k == 0 or rollout.top_k < -1:
        _fail("rollout.top_k", rollout.top_k, "must be -1 (off) or >= 1", "use -1 to disable top-k sampling")
    if rollout.n < 1:
        _fail("rollout.n", rollout.n, "must be >= 1", "sample at least one response per prompt")
    if rollout.max_new_tokens < 1:
        _fail("rollout.max_new_tokens", rollout.max_new_tokens, "must be >= 1", "use e.g. 1024")


def _validate_lora(cfg: Config) -> None:
    lora = cfg.lora
    if lora.rank < 0:
        _fail("lora.rank", lora.rank, "must be >= 0", "use 0 (no LoRA) or e.g. 64")
    if not lora.enabled:
        return
    if lora.alpha <= 0:
        _fail("lora.alpha", lora.alpha, "must be > 0", "use e.g. 2 x lora.rank")
    if not 0.0 <= lora.dropout < 1.0:
        _fail("lora.dropout", lora.dropout, "is outside [0, 1)", "use 0.0 for no dropout")
    unknown = sorted(set(lora.target_modules) - set(LORA_TARGETS))
    if unknown or not lora.target_modules:
        _fail(
            "lora.target_modules",
            list(lora.target_modules),
            f"holds unknown or no modules {unknown}",
            f"choose among {', '.join(LORA_TARGETS)}",
        )
    for fused in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
        chosen = [m for m in fused if m in lora.target_modules]
        if chosen and len(chosen) != len(fused):
            _fail(
                "lora.target_modules",
                list(lora.target_modules),
                f"holds {chosen} but not all of {list(fused)}, which megatron fuses into one layer",
                "target all of them or none",
            )
    if cfg.model.transformer_impl != "local":
        _fail(
            "model.transformer_impl",
            cfg.model.transformer_impl,
            "is not supported with LoRA (the TE spec fuses the pre-norms into linear_qkv/linear_fc1)",
            "use model.transformer_impl=local with lora.rank > 0",
        )


def _validate_baselines(cfg: Config) -> None:
    alg = cfg.algorithm
    for name in ("clip_low", "clip_high"):
        value = getattr(alg, name)
        if not 0.0 <= value < (1.0 if name == "clip_low" else float("inf")):
            _fail(f"algorithm.{name}", value, "is out of range", "use e.g. clip_low=0.2, clip_high=0.28")
    if alg.kl_coef < 0:
        _fail("algorithm.kl_coef", alg.kl_coef, "must be >= 0", "use 0 to turn the KL penalty off")
    if alg.refill_max_rounds < 1:
        _fail("algorithm.refill_max_rounds", alg.refill_max_rounds, "must be >= 1", "use e.g. 4")
    if alg.tis_cap is not None and alg.tis_cap <= 0:
        _fail("algorithm.tis_cap", alg.tis_cap, "must be > 0", "use e.g. 2.0, or null to turn it off")
    if not 0.0 <= alg.rlsd_lambda <= 1.0:
        _fail(
            "algorithm.rlsd_lambda",
            alg.rlsd_lambda,
            "is outside [0, 1]",
            "use e.g. 0.5 (the official default)",
        )
    if not 0.0 <= alg.rlsd_epsilon_w < 1.0:
        _fail(
            "algorithm.rlsd_epsilon_w",
            alg.rlsd_epsilon_w,
            "is outside [0, 1)",
            "use e.g. 0.2 (the official default)",
        )
    if alg.rlsd_lambda_decay_steps < 0:
        _fail(
            "algorithm.rlsd_lambda_decay_steps",
            alg.rlsd_lambda_decay_steps,
            "must be >= 0",
            "use e.g. 50 (the official default), or 0 to keep lambda constant",
        )
    if not 0.0 <= alg.position_w_min <= 1.0:
        _fail(
            "algorithm.position_w_min",
            alg.position_w_min,
            "is outside [0, 1]",
            "use e.g. 0.25 (the official default; 1 weighs every position alike)",
        )
    if alg.position_s <= 0:
        _fail("algorithm.position_s", alg.position_s, "must be > 0", "use e.g. 0.1 (the official default)")


def data_parallel_size(parallel: ParallelConfig, world_size: int) -> int:
    """The number of data-parallel replicas ``world_size`` processes form at this TP x PP."""
    return max(world_size // (parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size), 1)


def _validate_batch_and_engine(cfg: Config, world_size: int) -> None:
    """Rules that need the world size: rollouts per DP replica, engine placement."""
    par, tr, ro = cfg.parallel, cfg.trainer, cfg.rollout
    dp = data_parallel_size(par, world_size)
    rollouts = tr.prompts_per_step * ro.n
    if rollouts % dp:
        _fail(
            "trainer.prompts_per_step",
            tr.prompts_per_step,
            f"x rollout.n={ro.n} = {rollouts} rollouts do not split evenly over {dp} data-parallel replicas",
            f"use a multiple of {dp}",
        )
    vpp = par.virtual_pipeline_model_parallel_size
    pp = par.pipeline_model_parallel_size
    if vpp and rollouts // dp < interleaved_min_microbatches(pp, vpp):
        _fail(
            "trainer.prompts_per_step",
            tr.prompts_per_step,
            f"gives {rollouts // dp} rollouts per replica; the interleaved schedule at PP{pp} x VPP{vpp} "
            f"needs {interleaved_min_microbatches(pp, vpp)} microbatches (fewer put every pass of the "
            "first stage in warm-up, and the stages' sends no longer pair up)",
            "raise trainer.prompts_per_step",
        )
    placement = rollout_placement(ro, world_size)
    in_process = placement == "colocated" or (placement == "single" and ro.in_process is not False)
    if ro.weight_transport == "memory" and not in_process:
        _fail("rollout.weight_transport", "memory", "needs an in-process engine", "use auto or directory")


def _validate_placement(cfg: Config, world_size: int, hf: Mapping[str, Any]) -> None:
    ro = cfg.rollout
    placement = rollout_placement(ro, world_size)  # the layout itself is built once the rules hold
    k = ro.tensor_parallel_size
    if k < 1 or world_size % k:
        _fail(
            "rollout.tensor_parallel_size",
            k,
            f"does not divide the world size {world_size}",
            "use 1 or a divisor of the number of trainer processes",
        )
    if k > 1 and placement != "colocated":
        _fail(
            "rollout.tensor_parallel_size",
            k,
            f"needs rollout.placement=colocated (placement here: {placement})",
            "set rollout.tensor_parallel_size=1",
        )
    heads = hf.get("num_attention_heads")
    if heads is not None and heads % k:
        _fail(
            "rollout.tensor_parallel_size",
            k,
            f"does not divide num_attention_heads={heads}",
            "pick an engine TP that divides the head count",
        )
    engines = engine_layout(ro, world_size).num_engines
    if cfg.trainer.prompts_per_step % engines:
        _fail(
            "trainer.prompts_per_step",
            cfg.trainer.prompts_per_step,
            f"does not split evenly over {engines} colocated engines",
            f"use a multiple of {engines} or raise rollout.tensor_parallel_size",
        )
    if ro.in_process and placement == "rank0":
        _fail(
            "rollout.in_process",
            True,
            f"hangs at engine start with {world_size} trainer processes and placement rank0",
            "set it to null",
        )
    if ro.weight_transport == "directory" and placement == "colocated":
        _fail(
            "rollout.weight_transport",
            "directory",
            "is for an engine in its own process; colocated engines load from memory",
            "use auto, or rollout.placement=rank0",
        )
    if ro.sleep_level not in (0, 1, 2):
        _fail(
            "rollout.sleep_level",
            ro.sleep_level,
            "is unknown",
            "use 0 (never), 1 (KV cache) or 2 (+ weights)",
        )
    if not 0.0 < ro.gpu_memory_utilization <= 1.0:
        _fail(
            "rollout.gpu_memory_utilization", ro.gpu_memory_utilization, "is outside (0, 1]", "use e.g. 0.3"
        )


def _validate_lengths_and_eval(cfg: Config) -> None:
    ro, ev, data = cfg.rollout, cfg.eval, cfg.data
    if data.max_row_bytes < 1:
        _fail("data.max_row_bytes", data.max_row_bytes, "must be >= 1", "use e.g. 1048576 (1 MiB)")
    if data.max_prompt_tokens + ro.max_new_tokens > ro.max_model_len:
        _fail(
            "rollout.max_model_len",
            ro.max_model_len,
            f"is below data.max_prompt_tokens={data.max_prompt_tokens} + rollout.max_new_tokens={ro.max_new_tokens}",
            "raise it or shorten prompts/responses (vLLM would cut responses silently)",
        )
    teacher = cfg.teacher
    # which methods read teacher.context is theirs to say: Algorithm.check_config
    if teacher.context != "solution" and teacher.reason_first:
        _fail(
            "teacher.reason_first",
            teacher.reason_first,
            f"rationalises the reference solution, which teacher.context={teacher.context} does not read",
            "use one of them",
        )
    if teacher.reason_first:
        if teacher.reason_max_new_tokens < 1:
            _fail(
                "teacher.reason_max_new_tokens",
                teacher.reason_max_new_tokens,
                "must be >= 1",
                "use e.g. 4096",
            )
        reasoning_prompt = data.max_teacher_prompt_tokens or data.max_prompt_tokens
        if reasoning_prompt + teacher.reason_max_new_tokens > ro.max_model_len:
            _fail(
                "teacher.reason_max_new_tokens",
                teacher.reason_max_new_tokens,
                f"+ the teacher prompt limit {reasoning_prompt} exceeds rollout.max_model_len={ro.max_model_len}",
                "raise rollout.max_model_len or lower teacher.reason_max_new_tokens",
            )
        if teacher.reason_temperature is not None and teacher.reason_temperature <= 0:
            _fail(
                "teacher.reason_temperature",
                teacher.reason_temperature,
                "must be > 0",
                "use null for rollout's",
            )
    if ev.interval < 0:
        _fail("eval.interval", ev.interval, "must be >= 0", "use 0 to turn in-training evaluation off")
    if ev.k < 1:
        _fail("eval.k", ev.k, "must be >= 1", "sample at least one response per problem")
    if (ev.interval > 0 or ev.at_start) and not ev.benchmarks:
        _fail(
            "eval.benchmarks",
            list(ev.benchmarks),
            "is empty but evaluation is on",
            "list e.g. [aime24, aime25] or NAME=path.jsonl",
        )
    if (ev.interval > 0 or ev.at_start) and data.max_prompt_tokens + ev.max_new_tokens > ro.max_model_len:
        _fail(
            "eval.max_new_tokens",
            ev.max_new_tokens,
            f"+ data.max_prompt_tokens={data.max_prompt_tokens} exceeds rollout.max_model_len={ro.max_model_len}",
            "raise rollout.max_model_len or lower eval.max_new_tokens",
        )


def _validate_recompute(model: ModelConfig) -> None:
    if model.recompute_num_layers < 1:
        _fail("model.recompute_num_layers", model.recompute_num_layers, "must be >= 1", "use e.g. 1")
    recompute_keys = {"recompute_granularity", "recompute_method", "recompute_num_layers"}
    clash = sorted(recompute_keys & set(model.transformer_overrides))
    if clash:
        _fail(
            f"model.transformer_overrides.{clash[0]}",
            model.transformer_overrides[clash[0]],
            "duplicates a model field",
            f"set model.{clash[0]} instead",
        )


def _validate_training(cfg: Config) -> None:
    tr, model, runtime = cfg.trainer, cfg.model, cfg.runtime
    if tr.max_steps < 1:
        _fail("trainer.max_steps", tr.max_steps, "must be >= 1", "set the number of optimizer steps")
    if tr.prompts_per_step < 1:
        _fail("trainer.prompts_per_step", tr.prompts_per_step, "must be >= 1", "use e.g. 32")
    if tr.lr <= 0:
        _fail("trainer.lr", tr.lr, "must be > 0", "use e.g. 1e-6")
    if not 0 <= tr.min_lr <= tr.lr:
        _fail("trainer.min_lr", tr.min_lr, f"must be in [0, trainer.lr={tr.lr}]", "lower it")
    if tr.warmup_steps < 0 or tr.warmup_steps >= tr.max_steps:
        _fail(
            "trainer.warmup_steps",
            tr.warmup_steps,
            f"must be in [0, trainer.max_steps={tr.max_steps}]",
            "shorten the warmup",
        )
    _validate_recompute(model)
    if runtime.device_peak_tflops is not None and runtime.device_peak_tflops <= 0:
        _fail(
            "runtime.device_peak_tflops",
            runtime.device_peak_tflops,
            "must be > 0",
            "set the GPU's dense peak TFLOP/s, or null for the known H100/H200 figures",
        )
    if tr.microbatch_tokens < 2:
        _fail("trainer.microbatch_tokens", tr.microbatch_tokens, "must be >= 2", "use e.g. 8192")
    if tr.skip_first_tokens < 0:
        _fail(
            "trainer.skip_first_tokens",
            tr.skip_first_tokens,
            "must be >= 0",
            "use 0 to score every response token",
        )
    if cfg.checkpoint.save_interval < 1:
        _fail("checkpoint.save_interval", cfg.checkpoint.save_interval, "must be >= 1", "use e.g. 50")
    if cfg.logging.log_interval < 1:
        _fail("logging.log_interval", cfg.logging.log_interval, "must be >= 1", "use 1 to log every step")
    if cfg.eval.grading_workers < 1:
        _fail("eval.grading_workers", cfg.eval.grading_workers, "must be >= 1", "use 1 or more")
    if model.transformer_impl == "transformer_engine" and runtime.device == "cpu":
        _fail(
            "model.transformer_impl", "transformer_engine", "needs a GPU", "use local with runtime.device=cpu"
        )
    if tr.dry_run_world_size is not None and tr.dry_run_world_size < 1:
        _fail(
            "trainer.dry_run_world_size",
            tr.dry_run_world_size,
            "must be >= 1",
            "set it to the target cluster's GPU count (nodes x GPUs per node) or null",
        )
    if tr.dry_run_gpu_gib is not None and tr.dry_run_gpu_gib <= 0:
        _fail(
            "trainer.dry_run_gpu_gib",
            tr.dry_run_gpu_gib,
            "must be > 0",
            "set it to one GPU's memory in GiB (e.g. 80 for an H100, 141 for an H200) or null",
        )
    if tr.max_nonfinite_steps < 1:
        _fail("trainer.max_nonfinite_steps", tr.max_nonfinite_steps, "must be >= 1", "use e.g. 3")
    if cfg.checkpoint.keep_last < 1:
        _fail(
            "checkpoint.keep_last",
            cfg.checkpoint.keep_last,
            "must be >= 1",
            "keep at least the latest checkpoint",
        )


def validate(cfg: Config, *, world_size: int, hf_config: Mapping[str, Any] | None = None) -> None:
    """Check every cross-field rule; raise ``ConfigError`` on the first violation.

    The model's ``config.json`` is parsed here too, so an unsupported architecture or a TP that
    does not divide its heads fails before any process group starts.

    Args:
        cfg: the typed config.
        world_size: the number of processes the launcher started (no process group needed).
        hf_config: the model's ``config.json``; read from ``model.hf_path`` when omitted.
    """
    hf = read_hf_config(cfg.model.hf_path) if hf_config is None else hf_config
    _validate_choices(cfg)
    _validate_training(cfg)
    _validate_parallel(cfg, world_size, _model_spec(cfg.model.hf_path, hf))
    _validate_algorithm(cfg)
    _validate_baselines(cfg)
    _validate_lengths_and_eval(cfg)
    _validate_batch_and_engine(cfg, world_size)
    _validate_placement(cfg, world_size, hf)
