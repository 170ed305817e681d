"""Typed, frozen configuration and the one place where it is validated.

Hydra composes ``conf/`` at the entry point (``megaopsd/train.py``), which turns the result
into a plain dict and calls ``load_config``. Everything below the entry point receives these
dataclasses (or one section of them) and never touches OmegaConf.

``validate`` checks every cross-field rule before any process group exists; each failure is
a ``ConfigError`` whose message is one line naming the field, the problem and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from megaopsd.stages import FIRST, LAST, check_stages

if TYPE_CHECKING:  # importing megaopsd.models pulls in torch; validate imports it when it runs
    from megaopsd.models.hf_config import HFModelSpec

# Every choice is a Literal type on its field; ``_check_choice`` is the one place that checks it
# (when a dict is loaded and again in ``validate``, for configs built in code).
LossKind = Literal["jsd", "forward_kl", "reverse_kl", "topk", "topk_tail", "pg"]
TeacherMode = Literal["current", "fixed", "ema"]
Device = Literal["auto", "cpu", "cuda"]
DType = Literal["float32", "bfloat16"]
WeightTransport = Literal["auto", "memory", "directory"]
TransformerImpl = Literal["local", "transformer_engine"]
LrSchedule = Literal["constant", "cosine"]
Placement = Literal["colocated", "rank0"]
LoraInit = Literal["kaiming", "gaussian"]
AlgorithmName = Literal["opsd", "grpo", "sft"]
RecomputeGranularity = Literal["selective", "full"]
RecomputeMethod = Literal["uniform", "block"]
ClipMode = Literal["token", "entry"]  # token: a token's divergence; entry: each vocab entry's term
PromptStyle = Literal["opsd", "opsd_first_release", "compact", "minimal"]
ThinkPrefix = Literal["none", "open", "closed"]
ReasonCache = Literal["regenerate", "per_example"]

LOSS_KINDS: tuple[str, ...] = typing.get_args(LossKind)
CLIP_MODES: tuple[str, ...] = typing.get_args(ClipMode)
TEACHER_MODES: tuple[str, ...] = typing.get_args(TeacherMode)
DEVICES: tuple[str, ...] = typing.get_args(Device)
DTYPES: tuple[str, ...] = typing.get_args(DType)
WEIGHT_TRANSPORTS: tuple[str, ...] = typing.get_args(WeightTransport)
PLACEMENTS: tuple[str, ...] = typing.get_args(Placement)
ADD_A_MODEL = "use a Qwen3, Qwen2/2.5 or Llama 3.x model (docs/adding-a-model-family.md)"
REQUIRED = "???"  # a required field in the Hydra defaults tree (OmegaConf's "missing" marker)


class ConfigError(ValueError):
    """An invalid configuration; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    hf_path: str  # a Hugging Face model directory (config.json, weights, tokenizer)
    dtype: DType = "float32"  # parameter dtype; bfloat16 uses Megatron mixed precision
    make_vocab_size_divisible_by: int = 128  # Megatron pads the vocabulary to a multiple of this x TP
    transformer_impl: TransformerImpl = "local"  # local | transformer_engine (GPU, needs TE installed)
    # Activation recompute: null (keep activations) | selective (attention core) | full (whole
    # layers, recomputed in backward). full: recompute_num_layers layers per group (uniform) or
    # the first recompute_num_layers layers of each stage (block).
    recompute_granularity: RecomputeGranularity | None = None
    recompute_method: RecomputeMethod = "uniform"
    recompute_num_layers: int = 1
    # Further megatron TransformerConfig fields, applied last (e.g. {cross_entropy_loss_fusion: true}).
    transformer_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    # Uneven pipeline stages (megatron-core's own options): layers on the first / last stage;
    # the stages in between share the rest evenly. None: every stage gets the same number.
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False  # DP gradient reduce-scatter/all-reduce overlapped with backward
    overlap_param_gather: bool = False  # distributed optimizer: parameter all-gather in bucket order


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    device: Device = "auto"  # auto | cpu | cuda
    cpu_emulation: bool = True  # CUDA-call emulation for megatron-core on CPU (never used on GPU)
    cpu_threads: int = 1  # torch intra-op threads per rank on CPU; 0 keeps torch's default
    seed: int = 1234
    distributed_timeout_minutes: int = 30
    # Dense peak TFLOP/s of one GPU for perf/mfu; None: known H100/H200 figures for model.dtype.
    device_peak_tflops: float | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
    kind: LossKind = "jsd"  # jsd | forward_kl | reverse_kl | topk | topk_tail | pg
    beta: float = 0.5  # JSD mixture weight: 0 = forward KL(p_T || p_S), 1 = reverse KL(p_S || p_T)
    temperature: float = 1.0  # divides teacher and student logits before the softmax
    top_k: int = 32  # used by topk and topk_tail
    clip: float | None = None  # divergence cap (no gradient above it); what it caps: clip_mode
    # token: a token's whole divergence; entry: each vocabulary entry's pointwise term before the
    # sum over the vocabulary (the official OPSD --jsd_token_clip; the loss can go negative)
    clip_mode: ClipMode = "token"
    chunk_tokens: int = 1024  # tokens per chunk in the vocab-parallel loss


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlgorithmConfig:
    # opsd: the divergence to the self-teacher (loss.*, teacher.*); grpo and sft are the baselines on
    # the same schedule with the student stream only (docs/baselines.md)
    name: AlgorithmName = "opsd"
    normalize_std: bool = True  # grpo: divide group-centred rewards by the group std (False: Dr. GRPO)
    clip_low: float = 0.2  # grpo: the ratio's lower bound is 1 - clip_low
    clip_high: float = 0.28  # grpo: the ratio's upper bound is 1 + clip_high (clip-higher)
    kl_coef: float = 0.0  # grpo: k3 KL to the initial weights (a frozen copy); 0 builds no copy
    dynamic_sampling: bool = True  # grpo: drop groups whose rewards are all equal
    tis_cap: float | None = None  # grpo: truncated IS weight cap for the engine/trainer gap; None off
    # sft: the prompts the reference solution follows: the student's, or both the student's and
    # the teacher's (a warm start that also teaches a self-teacher to read its privileged context)
    sft_prompts: Literal["student", "both"] = "student"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    mode: TeacherMode = "fixed"  # current | fixed | ema
    ema_decay: float = 0.99
    # Reason-first (the official --reason_first): the rollout engine first writes the teacher's
    # rationalisation of the reference solution; the teacher then scores the response after it.
    reason_first: bool = False
    reason_max_new_tokens: int = 4096  # the rationalisation's length limit (official default)
    reason_temperature: float | None = None  # None: rollout.temperature
    reason_top_p: float | None = None  # None: rollout.top_p
    reason_top_k: int | None = None  # None: rollout.top_k
    reason_cache: ReasonCache = "regenerate"  # regenerate: every use (official)


LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    rank: int = 0  # adapter rank r; 0 trains every weight (no LoRA)
    alpha: float = 16.0  # the update is (alpha / rank) * B @ A
    dropout: float = 0.0  # dropout on the adapter input (default RNG stream, same on TP ranks)
    target_modules: tuple[str, ...] = LORA_TARGETS  # HF module names (q_proj .. down_proj)
    init: LoraInit = (
        "kaiming"  # A: kaiming (uniform +-1/sqrt(fan_in), PEFT's default) | gaussian (std 1/r); B = 0
    )
    seed: int = 0  # A's init stream (per layer and module, independent of the layout)

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    temperature: float = 1.1
    top_p: float = 0.95
    top_k: int = 20  # -1 disables top-k sampling
    n: int = 1  # responses per prompt
    max_new_tokens: int = 1024
    max_model_len: int = 4096
    kv_cache_gib: float = 1.0
    seed: int = 0
    in_process: bool | None = None  # None: in-process engine for one trainer process, else its own process
    dtype: DType | None = None  # engine dtype; None follows model.dtype
    weight_transport: WeightTransport = "auto"  # auto | memory | directory
    weight_bucket_mb: int = 512
    weight_sync_dir: str | None = None  # directory transport; None uses /dev/shm
    # CPU, colocated, one host: the refit moves shards through /dev/shm instead of gloo (loopback TCP)
    shared_memory_export: bool = True
    # Where engines live with more than one trainer process: colocated (a vLLM worker in every
    # trainer process, world / tensor_parallel_size engines) or rank0 (one engine in its own
    # process). None: colocated. A single trainer process always keeps one in-process engine.
    placement: Placement | None = None
    tensor_parallel_size: int = 1  # each colocated engine's TP (ranks r*k .. r*k+k-1 form one engine)
    sleep_level: int = 1  # CUDA: free the KV cache (1) or weights too (2) while training; 0 never sleeps
    gpu_memory_utilization: float = 0.3  # CUDA: the engine's share of each GPU (weights + KV cache)
    enforce_eager: bool | None = None  # None: eager on CPU, CUDA graphs on GPU


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    train_files: tuple[str, ...] = ()
    problem_key: str = "problem"
    solution_key: str = "solution"
    shuffle_seed: int = 0
    strict: bool = False
    max_row_bytes: int = 1 << 20  # a longer jsonl line (or parquet row's text) is skipped as row_too_long
    max_prompt_tokens: int = 2048
    max_teacher_prompt_tokens: int | None = None  # None: same as max_prompt_tokens
    student_enable_thinking: bool = True
    teacher_enable_thinking: bool = True
    # opsd: the current official OPSD wording; opsd_first_release: its first release's (docs/prompts.md)
    prompt_style: PromptStyle = "opsd"
    # appended to the rendered teacher prompt: none | open ("<think>\n") | closed (an empty think block)
    teacher_think_prefix: ThinkPrefix = "none"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    max_steps: int = 100
    prompts_per_step: int = 32
    lr: float = 1e-6
    min_lr: float = 0.0
    warmup_steps: int = 0
    lr_schedule: LrSchedule = "constant"  # constant | cosine
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    microbatch_tokens: int = 8192  # padded (student + teacher) tokens per microbatch
    skip_first_tokens: int = 0  # leave the first k response tokens of every rollout out of the loss
    max_nonfinite_steps: int = 3  # this many non-finite steps in a row: save and stop
    dry_run: bool = False  # validate, print the layout and a memory estimate, load nothing
    # The GPU count the dry run plans for (e.g. nodes x GPUs per node); None: this launch's world size.
    dry_run_world_size: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    dir: str = "outputs/checkpoints"
    save_interval: int = 50
    keep_last: int = 2
    resume: bool = True  # continue from <dir>/latest when it exists


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    tensorboard_dir: str = "outputs/tensorboard"
    log_interval: int = 1
    text_sample_interval: int = 5  # write a rollout text sample every N steps (0: never)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    interval: int = 0  # evaluate every N steps through the live rollout engine; 0 = off
    at_start: bool = False  # also evaluate the initial weights (logged at step 0)
    benchmarks: tuple[str, ...] = ()  # NAME (hub) or NAME=path.jsonl: aime24, aime25, hmmt25, math500
    k: int = 4  # samples per problem
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int = 0
    enable_thinking: bool = True
    limit: int | None = None  # first N problems of each benchmark
    grading_timeout_s: float = 10.0
    grading_workers: int = 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig
    parallel: ParallelConfig = ParallelConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    loss: LossConfig = LossConfig()
    teacher: TeacherConfig = TeacherConfig()
    lora: LoraConfig = LoraConfig()
    rollout: RolloutConfig = RolloutConfig()
    data: DataConfig = DataConfig()
    trainer: TrainerConfig = TrainerConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    eval: EvalConfig = EvalConfig()


# ----------------------------------------------------------------------------- building


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a field annotation; convert lists to tuples and ints to floats."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        _check_choice(where, value, annotation)
        return value
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        others = [option for option in options if option is not type(None)]
        if len(others) == 1:  # an optional field: the one type's own message is the clearest
            return _coerce(value, others[0], where)
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError:
                pass
        raise ConfigError(f"config: {where}={value!r} has the wrong type; expected {annotation}")
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"config: {where}={value!r} must be a mapping with string keys")
        return dict(value)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"config: {where}={value!r} must be a list")
        (item_type, _ellipsis) = typing.get_args(annotation)
        return tuple(_coerce(item, item_type, f"{where}[{i}]") for i, item in enumerate(value))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"config: {where}={value!r} must be true or false")
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"config: {where}={value!r} must be an integer")
    if not isinstance(value, annotation):
        raise ConfigError(
            f"config: {where}={value!r} must be of type {annotation.__name__}, not {type(value).__name__}"
        )
    return value


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"config: unknown key {prefix}{unknown[0]}; known keys here are {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, field in fields.items():
        path = f"{where}.{name}" if where else name
        if name not in data or data[name] == REQUIRED:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ConfigError(f"config: {path} is required; set it, e.g. {path}=...")
            continue
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(data[name], Mapping):
                raise ConfigError(f"config: {path} must be a section (mapping), got {data[name]!r}")
            kwargs[name] = _build(annotation, data[name], path)
        else:
            kwargs[name] = _coerce(data[name], annotation, path)
    return cls(**kwargs)


def load_config(data: Mapping[str, Any]) -> Config:
    """Build the typed config from a plain (resolved) dict; keys outside the schema are errors.

    Top-level keys that only serve interpolation in ``conf/`` (``run_name``, ``output_dir``)
    and Hydra's own section are ignored.
    """
    sections = {k: v for k, v in data.items() if k not in ("hydra", "run_name", "output_dir")}
    return _build(Config, sections, "")


def default_tree() -> dict[str, Any]:
    """Every section's dataclass defaults as a plain dict (tuples as lists, required as ``???``).

    ``megaopsd/train.py`` gives it to Hydra as the base config ``megaopsd_defaults``; the files
    in ``conf/`` then hold only what differs from it (a test keeps it that way).
    """

    def section(cls: type) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.default is not dataclasses.MISSING:
                value = field.default
                out[field.name] = list(value) if isinstance(value, tuple) else value
            else:
                out[field.name] = REQUIRED
        return out

    hints = typing.get_type_hints(Config)
    return {field.name: section(hints[field.name]) for field in dataclasses.fields(Config)}


# ----------------------------------------------------------------------------- validation


def _fail(field: str, value: Any, problem: str, fix: str) -> typing.NoReturn:
    raise ConfigError(f"config: {field}={value!r} {problem}; {fix}")


def _check_choice(field: str, value: Any, annotation: Any) -> None:
    """``value`` must be one of the field's Literal choices (or None where the field allows it)."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) is not typing.Literal else ()
    if value is None and type(None) in options:
        return
    literal = next((o for o in options if typing.get_origin(o) is typing.Literal), annotation)
    choices = typing.get_args(literal)
    if value not in choices:
        _fail(field, value, "is unknown", f"use one of {', '.join(map(str, choices))}")


def check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    """The same check for code outside the config (e.g. engine settings built directly)."""
    _check_choice(field, value, Literal[choices])


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
                _check_choice(f"{section.name}.{field.name}", getattr(value, field.name), annotation)


def read_hf_config(hf_path: str) -> dict[str, Any]:
    """The model's ``config.json``, with a clear error if the directory is not a model."""
    config_file = Path(hf_path) / "config.json"
    if not config_file.is_file():
        _fail("model.hf_path", hf_path, "has no config.json", "point it at a Hugging Face model directory")
    return json.loads(config_file.read_text())


def _model_spec(hf_path: str, hf: Mapping[str, Any]) -> HFModelSpec:
    """The parsed model config; an architecture or option megaopsd cannot build is a config error."""
    from megaopsd.models.hf_config import UnsupportedModelError, load_hf_config

    try:
        return load_hf_config(hf)
    except UnsupportedModelError as err:
        _fail("model.hf_path", hf_path, f"holds a model megaopsd cannot build ({err})", ADD_A_MODEL)
    except KeyError as err:
        _fail("model.hf_path", hf_path, f"has a config.json without {err}", "point it at a causal-LM model")


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
    from megaopsd.models.hf_config import tensor_parallel_problem

    problem = tensor_parallel_problem(spec, tp)
    if problem is not None:
        _fail("parallel.tensor_model_parallel_size", tp, problem, "pick a TP that divides both head counts")
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
    if alg.name == "grpo" and cfg.rollout.n < 2:
        _fail("rollout.n", cfg.rollout.n, "gives GRPO groups of one", "use rollout.n >= 2 (e.g. 8)")
    for name in ("clip_low", "clip_high"):
        value = getattr(alg, name)
        if not 0.0 <= value < (1.0 if name == "clip_low" else float("inf")):
            _fail(f"algorithm.{name}", value, "is out of range", "use e.g. clip_low=0.2, clip_high=0.28")
    if alg.kl_coef < 0:
        _fail("algorithm.kl_coef", alg.kl_coef, "must be >= 0", "use 0 to turn the KL penalty off")
    if alg.tis_cap is not None and alg.tis_cap <= 0:
        _fail("algorithm.tis_cap", alg.tis_cap, "must be > 0", "use e.g. 2.0, or null to turn it off")
    if alg.name == "sft" and cfg.trainer.skip_first_tokens:
        _fail(
            "trainer.skip_first_tokens",
            cfg.trainer.skip_first_tokens,
            "does not apply to sft",
            "set it to 0 (sft trains on the whole reference solution)",
        )


def _validate_batch_and_engine(cfg: Config, world_size: int) -> None:
    """Rules that need the world size: rollouts per DP replica, engine placement."""
    par, tr, ro = cfg.parallel, cfg.trainer, cfg.rollout
    dp = max(world_size // (par.tensor_model_parallel_size * par.pipeline_model_parallel_size), 1)
    rollouts = tr.prompts_per_step * ro.n
    if rollouts % dp:
        _fail(
            "trainer.prompts_per_step",
            tr.prompts_per_step,
            f"x rollout.n={ro.n} = {rollouts} rollouts do not split evenly over {dp} data-parallel replicas",
            f"use a multiple of {dp}",
        )
    if cfg.algorithm.name in ("grpo", "sft") and tr.prompts_per_step % dp:
        _fail(
            "trainer.prompts_per_step",
            tr.prompts_per_step,
            f"does not split evenly over {dp} data-parallel replicas ({cfg.algorithm.name} keeps prompts whole)",
            f"use a multiple of {dp}",
        )
    vpp = par.virtual_pipeline_model_parallel_size
    if vpp and rollouts // dp < par.pipeline_model_parallel_size:
        _fail(
            "trainer.prompts_per_step",
            tr.prompts_per_step,
            f"gives {rollouts // dp} rollouts per replica; the interleaved schedule needs at least "
            f"pipeline_model_parallel_size={par.pipeline_model_parallel_size} microbatches",
            "raise trainer.prompts_per_step",
        )
    placement = rollout_placement(ro, world_size)
    in_process = placement == "colocated" or (placement == "single" and ro.in_process is not False)
    if ro.weight_transport == "memory" and not in_process:
        _fail("rollout.weight_transport", "memory", "needs an in-process engine", "use auto or directory")


def rollout_placement(cfg: RolloutConfig, world_size: int) -> str:
    """``single`` (one process, in-process engine), ``colocated`` or ``rank0``."""
    if world_size == 1:
        return "single"
    return cfg.placement or "colocated"


def _validate_placement(cfg: Config, world_size: int, hf: Mapping[str, Any]) -> None:
    ro = cfg.rollout
    placement = rollout_placement(ro, world_size)
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
    engines = world_size // k if placement == "colocated" else 1
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


def target_world_size(cfg: Config) -> int:
    """The world size to validate against: ``trainer.dry_run_world_size`` for a dry run that
    names one (planning a cluster job from a laptop), else this launch's world size."""
    if cfg.trainer.dry_run and cfg.trainer.dry_run_world_size is not None:
        return cfg.trainer.dry_run_world_size
    return world_size_from_env()


def world_size_from_env() -> int:
    """The number of processes in this launch, read without starting a process group."""
    from megaopsd.runtime.distributed import read_launch_env

    return read_launch_env(os.environ).world_size
