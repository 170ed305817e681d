"""The configuration's schema: frozen dataclasses, one per section, and their choices.

Everything below the entry point receives these dataclasses (or one section of them) and never
touches OmegaConf. Defaults live here once; ``conf/`` holds only what differs from them.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

# Every choice is a Literal type on its field; ``check_literal`` is the one place that checks it
# (when a dict is loaded and again in ``validate``, for configs built in code).
LossKind = Literal["jsd", "forward_kl", "reverse_kl", "topk", "topk_tail", "pg"]
TeacherMode = Literal["current", "fixed", "ema"]
AttentionBackend = Literal["sdpa", "unfused"]
TeacherContextName = Literal["solution", "successful_rollout"]
Device = Literal["auto", "cpu", "cuda"]
DType = Literal["float32", "bfloat16"]
WeightTransport = Literal["auto", "memory", "directory"]
TransformerImpl = Literal["local", "transformer_engine"]
LrSchedule = Literal["constant", "cosine"]
Placement = Literal["colocated", "rank0"]
LoraInit = Literal["kaiming", "gaussian"]
AlgorithmName = Literal["opsd", "grpo", "sft", "rlsd", "pw_opsd"]
RecomputeGranularity = Literal["selective", "full"]
RecomputeMethod = Literal["uniform", "block"]
# torch: the reference operations (CPU); compiled: fused torch.compile chunk bodies; auto: compiled
# on CUDA where Triton is usable (megaopsd/runtime/kernels.py), torch otherwise
LossImplementation = Literal["auto", "torch", "compiled"]
ClipMode = Literal["token", "entry"]  # token: a token's divergence; entry: each vocab entry's term
PromptStyle = Literal["opsd", "opsd_first_release", "compact", "minimal"]
ThinkPrefix = Literal["none", "open", "closed"]
Refill = Literal["refill"]
ReasonCache = Literal["regenerate", "per_example"]

LOSS_KINDS: tuple[str, ...] = typing.get_args(LossKind)
CLIP_MODES: tuple[str, ...] = typing.get_args(ClipMode)
LOSS_IMPLEMENTATIONS: tuple[str, ...] = typing.get_args(LossImplementation)
TEACHER_MODES: tuple[str, ...] = typing.get_args(TeacherMode)
DEVICES: tuple[str, ...] = typing.get_args(Device)
DTYPES: tuple[str, ...] = typing.get_args(DType)
WEIGHT_TRANSPORTS: tuple[str, ...] = typing.get_args(WeightTransport)
PLACEMENTS: tuple[str, ...] = typing.get_args(Placement)
ADD_A_MODEL = "use a Qwen3, Qwen2/2.5 or Llama 3.x model (docs/adding-a-model-family.md)"
REQUIRED = "???"  # a required field in the Hydra defaults tree (OmegaConf's "missing" marker)


class ConfigError(ValueError):
    """An invalid configuration; the message names the field and the fix."""


def fail(field: str, value: Any, problem: str, fix: str) -> typing.NoReturn:
    """Raise the one-line ``ConfigError``: the field, its value, the problem and the fix."""
    raise ConfigError(f"config: {field}={value!r} {problem}; {fix}")


def check_literal(field: str, value: Any, annotation: Any) -> None:
    """``value`` must be one of the field's Literal choices (or None where the field allows it)."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) is not typing.Literal else ()
    if (value is None and type(None) in options) or (isinstance(value, bool) and bool in options):
        return
    literal = next((o for o in options if typing.get_origin(o) is typing.Literal), annotation)
    choices = typing.get_args(literal)
    if value not in choices:
        fail(field, value, "is unknown", f"use one of {', '.join(map(str, choices))}")


def check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    """The same check for code outside the config (e.g. engine settings built directly)."""
    check_literal(field, value, Literal[choices])


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    hf_path: str  # a Hugging Face model directory (config.json, weights, tokenizer)
    dtype: DType = "float32"  # parameter dtype; bfloat16 uses Megatron mixed precision
    make_vocab_size_divisible_by: int = 128  # Megatron pads the vocabulary to a multiple of this x TP
    transformer_impl: TransformerImpl = "local"  # local | transformer_engine (GPU, needs TE installed)
    # The local spec's core attention: sdpa (torch's fused scaled_dot_product_attention kernels)
    # | unfused (megatron's own: materialises the s x s scores; the reference). TE has its own.
    attention_backend: AttentionBackend = "sdpa"
    # Activation recompute: null (keep activations) | selective (attention core) | full (whole
    # layers, recomputed in backward). full: recompute_num_layers layers per group (uniform) or
    # the first recompute_num_layers layers of each stage (block).
    recompute_granularity: RecomputeGranularity | None = None
    # uniform: groups of recompute_num_layers layers | block: the first N of each stage
    recompute_method: RecomputeMethod = "uniform"
    recompute_num_layers: int = 1  # layers per recompute group (uniform) or recomputed per stage (block)
    # Mixture-of-experts models: the student's load-balancing loss coefficient; None: the model's
    # router_aux_loss_coef (config.json). The teacher stream never adds it.
    moe_aux_loss_coeff: float | None = None
    # Further megatron TransformerConfig fields, applied last (e.g. {cross_entropy_loss_fusion: true}).
    transformer_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    def swiglu_fusion(self, on_gpu: bool) -> bool:
        """Whether megatron's fused SwiGLU runs (``bias_activation_fusion``: one torch.compile'd
        kernel each way, FC1's output the only tensor kept for backward): on GPUs and with TE,
        unless ``transformer_overrides`` sets ``bias_activation_fusion``. Off on CPU by default,
        where each new shape would cost seconds of C++ compiling."""
        default = on_gpu or self.transformer_impl == "transformer_engine"
        return bool(self.transformer_overrides.get("bias_activation_fusion", default))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1  # TP: ranks that split every layer (divides the head counts)
    pipeline_model_parallel_size: int = 1  # PP: pipeline stages (the layers split across ranks)
    # VPP: model chunks per stage (interleaved schedule); None: off
    virtual_pipeline_model_parallel_size: int | None = None
    # Uneven pipeline stages (megatron-core's own options): layers on the first / last stage;
    # the stages in between share the rest evenly. None: every stage gets the same number.
    num_layers_in_first_pipeline_stage: int | None = None
    num_layers_in_last_pipeline_stage: int | None = None  # layers on the last stage; None: an even share
    sequence_parallel: bool = False  # split norms/dropout activations over TP ranks (needs TP > 1)
    # Mixture-of-experts models only: EP, the ranks the experts of every layer are dealt over
    # (divides the expert count), and expert TP, the ranks each expert's linears split over
    # (megatron's default would be TP; 1 is what MoE training commonly uses).
    expert_model_parallel_size: int = 1  # EP: ranks each MoE layer's experts are dealt over
    expert_tensor_parallel_size: int = 1  # expert TP: ranks each expert's linears split over
    use_distributed_optimizer: bool = False  # shard Adam state and fp32 master weights over DP (ZeRO-1)
    overlap_grad_reduce: bool = False  # DP gradient reduce-scatter/all-reduce overlapped with backward
    overlap_param_gather: bool = False  # distributed optimizer: parameter all-gather in bucket order


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
    device: Device = "auto"  # auto | cpu | cuda
    cpu_emulation: bool = True  # CUDA-call emulation for megatron-core on CPU (never used on GPU)
    cpu_threads: int = 1  # torch intra-op threads per rank on CPU; 0 keeps torch's default
    seed: int = 1234  # seeds model init, dropout and data order (RNG states are checkpointed)
    distributed_timeout_minutes: int = 30  # collective timeout of the process groups
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
    implementation: LossImplementation = "auto"  # see LossImplementation


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlgorithmConfig:
    # opsd: the divergence to the self-teacher (loss.*, teacher.*); grpo and sft are the baselines on
    # the same schedule with the student stream only (docs/baselines.md); rlsd: GRPO with the
    # self-teacher (teacher.*) setting per-token magnitudes; pw_opsd: OPSD with each token's
    # divergence weighted by its position in the response (docs/variants.md)
    name: AlgorithmName = "opsd"
    normalize_std: bool = True  # grpo: divide group-centred rewards by the group std (False: Dr. GRPO)
    clip_low: float = 0.2  # grpo: the ratio's lower bound is 1 - clip_low
    clip_high: float = 0.28  # grpo: the ratio's upper bound is 1 + clip_high (clip-higher)
    kl_coef: float = 0.0  # grpo: k3 KL to the initial weights (a frozen copy); 0 builds no copy
    # grpo: true drops groups whose rewards are all equal (the step trains on fewer); refill also
    # generates from the next prompts until prompts_per_step mixed groups are found
    dynamic_sampling: bool | Refill = True
    refill_max_rounds: int = 4  # grpo, dynamic_sampling=refill: generation rounds per step at most
    tis_cap: float | None = None  # grpo: truncated IS weight cap for the engine/trainer gap; None off
    # rlsd (GRPO whose per-token advantage magnitudes come from the self-teacher, docs/variants.md):
    # A_t = A x ((1 - lambda) + lambda x clip(exp(sign(A) x (log p_teacher - log p_student)), 1 +- eps_w))
    rlsd_lambda: float = 0.5  # rlsd: the teacher-weighted share of the advantage at step 0 (official)
    rlsd_lambda_decay_steps: int = 50  # rlsd: lambda falls linearly to 0 over this many steps; 0 keeps it
    rlsd_epsilon_w: float = 0.2  # rlsd: the token weight stays in [1 - eps_w, 1 + eps_w] (official)
    # pw_opsd (position-weighted OPSD, docs/variants.md): each token's divergence is weighted by
    # w = w_min + (1 - w_min) x sigmoid((u - tau) / s), u = (i - 0.5) / L its relative position
    position_w_min: float = 0.25  # pw_opsd: the weight's floor, for the first tokens (official)
    position_tau: float = 0.30  # pw_opsd: the sigmoid's midpoint, a fraction of the response (official)
    position_s: float = 0.10  # pw_opsd: the sigmoid's width (official)
    # pw_opsd: sequence averages each response's weighted tokens, then the responses (official);
    # token averages over every token of the step, as the other methods do
    position_reduction: Literal["sequence", "token"] = "sequence"
    # sft: the prompts the reference solution follows: the student's, or both the student's and
    # the teacher's (a warm start that also teaches a self-teacher to read its privileged context)
    sft_prompts: Literal["student", "both"] = "student"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    mode: TeacherMode = "fixed"  # current | fixed | ema
    # What the teacher reads beside the problem: solution (the reference solution, OPSD) |
    # successful_rollout (another verified rollout of the same prompt, SDPO; docs/variants.md)
    context: TeacherContextName = "solution"
    ema_decay: float = 0.99  # ema: teacher <- decay * teacher + (1 - decay) * student after every step
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
    init: LoraInit = (  # A: kaiming (uniform +-1/sqrt(fan_in), PEFT default) | gaussian (std 1/r); B = 0
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
    temperature: float = 1.1  # sampling temperature (logprobs for the loss are at temperature 1)
    top_p: float = 0.95  # nucleus sampling; 1.0 disables it
    top_k: int = 20  # -1 disables top-k sampling
    n: int = 1  # responses per prompt
    max_new_tokens: int = 1024  # longest response; a longer one is cut (finish_reason length)
    max_model_len: int = 4096  # the engine's context: prompt + response tokens
    kv_cache_gib: float = 1.0  # CPU engines: KV cache size (CUDA uses gpu_memory_utilization)
    seed: int = 0  # sampling seed (per step and request, so rollouts are reproducible)
    in_process: bool | None = None  # None: in-process engine for one trainer process, else its own process
    dtype: DType | None = None  # engine dtype; None follows model.dtype
    weight_transport: WeightTransport = "auto"  # auto | memory | directory
    weight_bucket_mb: int = 512  # weight sync: tensors per transfer bucket
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
    train_files: tuple[str, ...] = ()  # jsonl/parquet files, hub ids, hub-layout dirs; NAME:split
    problem_key: str = "problem"  # the column holding the problem
    solution_key: str = "solution"  # the column holding the reference solution
    shuffle_seed: int = 0  # order of the prompt stream (resumes at the same position)
    strict: bool = False  # reject the run at the first bad row (file and line) instead of counting it
    max_row_bytes: int = 1 << 20  # a longer jsonl line (or parquet row's text) is skipped as row_too_long
    # student prompts longer than this are skipped (data/skipped_student_prompt_too_long)
    max_prompt_tokens: int = 2048
    max_teacher_prompt_tokens: int | None = None  # None: same as max_prompt_tokens
    student_enable_thinking: bool = True  # the chat template's enable_thinking for the student prompt
    teacher_enable_thinking: bool = True  # the chat template's enable_thinking for the teacher prompt
    # opsd: the current official OPSD wording; opsd_first_release: its first release's (docs/prompts.md)
    prompt_style: PromptStyle = "opsd"
    # appended to the rendered teacher prompt: none | open ("<think>\n") | closed (an empty think block)
    teacher_think_prefix: ThinkPrefix = "none"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    max_steps: int = 100  # optimizer steps of the run
    prompts_per_step: int = 32  # prompts per step over all replicas (x rollout.n rollouts)
    lr: float = 1e-6  # peak learning rate (Adam)
    min_lr: float = 0.0  # cosine: the floor the schedule decays to
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    lr_schedule: LrSchedule = "constant"  # constant | cosine
    weight_decay: float = 0.0  # decoupled weight decay (AdamW)
    clip_grad: float = 1.0  # global gradient-norm clip; 0 disables it
    microbatch_tokens: int = 8192  # padded (student + teacher) tokens per microbatch
    skip_first_tokens: int = 0  # leave the first k response tokens of every rollout out of the loss
    max_nonfinite_steps: int = 3  # this many non-finite steps in a row: save and stop
    dry_run: bool = False  # validate, print the layout and a memory estimate, load nothing
    # The GPU count the dry run plans for (e.g. nodes x GPUs per node); None: this launch's world size.
    dry_run_world_size: int | None = None
    # The GPU memory the dry run's verdict is for, in GiB; None: the visible GPU's, else no verdict.
    dry_run_gpu_gib: float | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    dir: str = "outputs/checkpoints"  # iter_NNNNNNN/ directories and the latest pointer
    save_interval: int = 50  # save every N steps (and at the last step)
    keep_last: int = 2  # complete checkpoints kept; older ones are removed
    resume: bool = True  # continue from <dir>/latest when it exists


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    tensorboard_dir: str = "outputs/tensorboard"  # event files (README, Metrics)
    log_interval: int = 1  # log scalars and the status line every N steps
    text_sample_interval: int = 5  # write a rollout text sample every N steps (0: never)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    interval: int = 0  # evaluate every N steps through the live rollout engine; 0 = off
    at_start: bool = False  # also evaluate the initial weights (logged at step 0)
    benchmarks: tuple[str, ...] = ()  # NAME (hub) or NAME=path.jsonl: aime24, aime25, hmmt25, math500
    k: int = 4  # samples per problem
    max_new_tokens: int = 1024  # longest evaluated response
    temperature: float = 1.0  # evaluation sampling temperature
    top_p: float = 1.0  # evaluation nucleus sampling
    top_k: int = -1  # evaluation top-k; -1 disables it
    seed: int = 0  # evaluation sampling seed
    enable_thinking: bool = True  # the chat template's enable_thinking for evaluation prompts
    limit: int | None = None  # first N problems of each benchmark
    grading_timeout_s: float = 10.0  # math-verify time limit per answer (its worker is killed after it)
    grading_workers: int = 1  # grading worker processes


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
