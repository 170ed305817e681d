"""``trainer.dry_run=true``: the layout a config asks for, a per-GPU memory estimate per phase,
and a verdict (``fits`` / ``does not fit``, with the cheapest change that makes it fit).

    python -m megaopsd.train recipe=qwen3_8b model.hf_path=/models/Qwen3-8B trainer.dry_run=true

Only the model's ``config.json`` is read. The target size is ``trainer.dry_run_world_size``
(the recipes carry their cluster's GPU count), so a laptop can plan a cluster job; without it
the launch's own world size is used. The verdict is for ``trainer.dry_run_gpu_gib`` GiB per GPU
(default: the visible GPU's memory; on a machine without one, no verdict unless it is set).

The memory estimate is a sum of named parts, each from one function in ``MEMORY_PARTS``
(``part(cfg, plan) -> {name: GiB}``), for the most loaded pipeline stage. The trainer's state,
the training step's working set (activations, logits, the loss) and the colocated engine are
one function each; a component that adds memory on every GPU adds its function to the tuple and
the printout, the phases and the verdict include it. The activation model is counted from
what autograd keeps in megatron-core's local layer (``layer_activation_bytes``); its error
against measured peaks is in ``docs/memory.md``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any

from megaopsd.algorithm.methods import algorithm_class
from megaopsd.config import Config, ConfigError, data_parallel_size, engine_layout, read_hf_config, validate
from megaopsd.config.hf_spec import HFModelSpec, load_hf_config
from megaopsd.stages import stage_layer_counts

GIB = 1 << 30
STEP_PARTS = ("activations", "logits and loss", "other transients")
# A phase fits when it needs at most this share of the GPU: the rest is for the CUDA context,
# NCCL's buffers and the caching allocator's fragmentation (none of which the estimate counts).
FIT_SHARE = 0.9
# fp32 [chunk_tokens, vocab shard] work buffers the vocab-parallel loss holds at once, in its
# forward and in its backward, by kind (named buffers of ``megaopsd.loss.sharded.Scratch``;
# tests/unit/test_dry_run.py counts them on the real loss).
LOSS_CHUNK_BUFFERS = {
    "jsd": (6, 5),
    "forward_kl": (5, 4),
    "reverse_kl": (5, 4),
    "topk": (5, 1),
    "topk_tail": (5, 2),
    "pg": (5, 2),
}
ENTRY_CLIP_BUFFERS = 2  # loss.clip_mode=entry adds the clipped terms and their coefficients
LORA_RANK = 1000  # the verdict suggests LoRA after every other change and pair of changes


@dataclasses.dataclass(frozen=True, kw_only=True)
class DryRunPlan:
    """The numbers of a planned run: model shape from config.json, and the parallel layout."""

    spec: HFModelSpec
    world_size: int
    tp: int
    pp: int
    dp: int
    stage_layers: tuple[int, ...]  # decoder layers per pipeline stage, first to last
    teacher_stream: bool  # the algorithm runs a teacher (or reference) forward beside the student's
    # mixture of experts: the experts are dealt over EP, each split over expert TP, and replicated
    # over expert DP (world / (EP x expert TP x PP)), which shards their optimizer state
    ep: int = 1
    etp: int = 1
    edp: int = 1

    @classmethod
    def of(cls, cfg: Config, world_size: int) -> DryRunPlan:
        spec = load_hf_config(read_hf_config(cfg.model.hf_path))
        par = cfg.parallel
        tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
        counts = stage_layer_counts(
            spec.num_layers,
            pp,
            par.num_layers_in_first_pipeline_stage,
            par.num_layers_in_last_pipeline_stage,
        )
        return cls(
            spec=spec,
            world_size=world_size,
            tp=tp,
            pp=pp,
            dp=data_parallel_size(par, world_size),
            stage_layers=tuple(counts),
            teacher_stream=algorithm_class(cfg.algorithm.name).uses_teacher(cfg),
            ep=par.expert_model_parallel_size,
            etp=par.expert_tensor_parallel_size,
            edp=max(world_size // (par.expert_model_parallel_size * par.expert_tensor_parallel_size * pp), 1),
        )

    def _layer_params(self) -> tuple[int, int]:
        """(dense, expert) parameters of one decoder layer, whole: attention, norms and the MLP
        or the router; the experts of an MoE layer."""
        spec = self.spec
        h = spec.hidden_size
        attention = h * spec.head_dim * (2 * spec.num_attention_heads + 2 * spec.num_query_groups)
        if spec.moe is None:
            return attention + 3 * h * spec.ffn_hidden_size + 2 * h, 0
        moe = spec.moe
        return attention + moe.num_experts * h + 2 * h, moe.num_experts * 3 * h * moe.expert_ffn_hidden_size

    def stage_expert_params(self) -> list[float]:
        """Expert parameters each pipeline stage holds per rank (its EP share, split over expert TP)."""
        _, experts = self._layer_params()
        return [layers * experts / (self.ep * self.etp) for layers in self.stage_layers]

    def stage_params(self) -> list[float]:
        """Parameters each pipeline stage holds per rank (embedding on the first, output layer on
        the last): the dense ones per TP rank, the experts per EP x expert-TP rank."""
        spec = self.spec
        h, vocab = spec.hidden_size, spec.vocab_size
        per_layer, _ = self._layer_params()
        embedding = vocab * h
        # With tied embeddings one tensor serves both ends on a single stage; with PP the last
        # stage keeps its own copy of the output layer.
        output = 0 if spec.tie_word_embeddings and self.pp == 1 else vocab * h
        params = []
        for stage, (layers, experts) in enumerate(
            zip(self.stage_layers, self.stage_expert_params(), strict=True)
        ):
            count = layers * per_layer
            count += embedding if stage == 0 else 0
            count += output + h if stage == self.pp - 1 else 0
            params.append(count / self.tp + experts)
        return params

    def total_params(self) -> float:
        """Every parameter of the model, once (what a whole-model engine holds)."""
        dense, experts = self._layer_params()
        spec = self.spec
        ends = spec.vocab_size * spec.hidden_size * (1 if spec.tie_word_embeddings else 2) + spec.hidden_size
        return spec.num_layers * (dense + experts) + ends


@dataclasses.dataclass(frozen=True, kw_only=True)
class MicrobatchShape:
    """The largest microbatch ``trainer.microbatch_tokens`` admits, per stream.

    The budget counts padded student + teacher tokens. The bound fills it with rollouts at the
    longest prompt and response, fractionally: shorter rollouts pack more sequences but never
    more student tokens, scored rows or attention-score entries per budget token (each share
    grows with the response length when the teacher prompt is at least the student's), and
    padding counts against the budget. A rollout longer than the budget is a microbatch alone.
    """

    sequences: float  # rollouts in the microbatch
    student_len: int  # longest student sequence (prompt + response)
    teacher_len: int  # longest teacher sequence; 0 without a teacher stream
    response_len: int  # scored rows per rollout and stream

    @classmethod
    def of(cls, cfg: Config, *, teacher_stream: bool) -> MicrobatchShape:
        data, response = cfg.data, cfg.rollout.max_new_tokens
        student = data.max_prompt_tokens + response
        teacher_prompt = data.max_teacher_prompt_tokens or data.max_prompt_tokens
        if algorithm_class(cfg.algorithm.name).teacher_reads_student_prompt:
            teacher_prompt = data.max_prompt_tokens  # GRPO's reference scores the student's own sequence
        elif cfg.teacher.reason_first:  # the teacher reads its rationalisation too
            teacher_prompt += cfg.teacher.reason_max_new_tokens
        teacher = teacher_prompt + response if teacher_stream else 0
        sequences = max(cfg.trainer.microbatch_tokens / (student + teacher), 1.0)
        return cls(sequences=sequences, student_len=student, teacher_len=teacher, response_len=response)

    @property
    def student_tokens(self) -> float:
        return self.sequences * self.student_len

    @property
    def teacher_tokens(self) -> float:
        return self.sequences * self.teacher_len

    @property
    def rows(self) -> float:
        return self.sequences * self.response_len


def activation_bytes(cfg: Config) -> int:
    """Bytes per activation element: the model dtype (bf16 runs keep bf16 activations)."""
    return 2 if cfg.model.dtype == "bfloat16" else 4


def attention_kind(cfg: Config) -> str:
    """``unfused`` (megatron's local attention: the score matrix is materialised) or ``flash``
    (a fused kernel that keeps only its inputs, output and per-row log-sum-exp: SDPA, TE)."""
    if cfg.model.transformer_impl == "local" and cfg.model.attention_backend == "unfused":
        return "unfused"
    return "flash"


def layer_activation_bytes(
    plan: DryRunPlan,
    *,
    seq_len: int,
    act_bytes: int,
    sequence_parallel: bool,
    recompute: str | None,
    fused_norm: bool,
    attention: str = "unfused",
    fused_swiglu: bool = False,
) -> float:
    """Bytes autograd keeps per token for one decoder layer, per TP rank.

    Counted from the tensors the backward of megatron-core's local layer holds, in units of the
    hidden size h, the query width q = heads x head_dim, the key/value width kv, the FFN width
    f (all per TP rank), the sequence length s and the activation dtype's bytes act:

        linear inputs  (2 h + q + f) x act     of QKV, FC1 (h / TP with sequence parallel), proj, FC2
        SwiGLU         4 f x act               FC1's output, SiLU's output, the second half
                       fused: 2 f x act        FC1's output only (megatron's SwiGLUFunction)
        attention      unfused: (q + 2 q) x act + heads x s x (4 + act, or 4 in float32)
                         the query after rope, the keys and values repeated to every head,
                         the softmax output in float32 and its copy in the activation dtype
                       flash: (q + kv) x act + heads x 4
                         the query and key after rope, the per-row log-sum-exp (the value is
                         a view of the QKV output, the output is the projection's input)
        norms          ``_norm_bytes``

    ``recompute``: None, ``selective`` (the attention core recomputed: the checkpoint keeps the
    query and key after rope and the value instead) or ``full`` (the caller keeps one layer
    input per recompute group; this function then gives the layer recomputed in backward).
    """
    spec, tp = plan.spec, plan.tp
    heads = spec.num_attention_heads // tp
    q = heads * spec.head_dim
    kv = max(spec.num_query_groups // tp, 1) * spec.head_dim
    f = mlp_width(plan)
    h = spec.hidden_size / tp if sequence_parallel else spec.hidden_size
    linear_inputs = (2 * h + q + f) * act_bytes + moe_dispatch_bytes(plan, act_bytes)
    swiglu = (2 if fused_swiglu else 4) * f * act_bytes
    # the value is a view of the QKV output: it keeps the whole output alive unless the norms do
    qkv_output = 0 if _keeps_qkv_output(act_bytes, fused_norm) else (q + 2 * kv) * act_bytes
    if recompute == "selective":
        attention_bytes = (q + kv) * act_bytes + qkv_output
    elif attention == "flash":
        attention_bytes = (q + kv) * act_bytes + qkv_output + heads * 4
    else:
        repeated = 2 * q if heads > kv // spec.head_dim else 2 * kv
        softmax = heads * seq_len * (4 + act_bytes if act_bytes < 4 else 4)
        attention_bytes = (q + repeated) * act_bytes + softmax
    return linear_inputs + swiglu + attention_bytes + _norm_bytes(h, q, kv, act_bytes, fused_norm)


def layer_backward_bytes(
    plan: DryRunPlan, *, seq_len: int, act_bytes: int, attention: str = "unfused"
) -> float:
    """What one layer's backward allocates per token beyond the kept activations: the gradients
    of the attention probabilities and scores (unfused attention only) and of the SwiGLU input."""
    heads = plan.spec.num_attention_heads / plan.tp
    scores = heads * seq_len * _score_entry_bytes(act_bytes, attention)
    return scores + 2 * mlp_width(plan) * act_bytes


def mlp_width(plan: DryRunPlan) -> float:
    """The MLP width one token occupies per rank: the FFN / TP, or for a mixture of experts its
    top-k experts' width / expert TP (EP's all-to-all brings each rank, on average, as many
    token-expert pairs as its own tokens chose)."""
    moe = plan.spec.moe
    if moe is None:
        return plan.spec.ffn_hidden_size / plan.tp
    return moe.experts_per_token * moe.expert_ffn_hidden_size / plan.etp


def moe_dispatch_bytes(plan: DryRunPlan, act_bytes: int) -> float:
    """Per token, what an MoE layer keeps beyond the experts' inputs: the router's float32 logits
    and probabilities over the experts, and the top-k copies of the token the dispatcher
    permutes (the experts' outputs are unpermuted into a second such buffer). An estimate: unlike
    the dense layer's, not yet held against autograd."""
    moe = plan.spec.moe
    if moe is None:
        return 0.0
    return 2 * moe.num_experts * 4 + 2 * moe.experts_per_token * plan.spec.hidden_size * act_bytes


def _score_entry_bytes(act_bytes: int, attention: str) -> int:
    """Bytes per attention-score entry while one layer's scores are live: the scores, their
    float32 softmax (and, below float32, the copy it starts from); none for a flash kernel."""
    if attention == "flash":
        return 0
    return act_bytes + 8 if act_bytes < 4 else 8


def _keeps_qkv_output(act_bytes: int, fused_norm: bool) -> bool:
    """Whether the key norm keeps the whole QKV output (its input is a view of it): true unless
    an upcasting composite norm copies the key first."""
    return fused_norm or act_bytes == 4


def _norm_bytes(h: float, q: float, kv: float, act_bytes: int, fused_norm: bool) -> float:
    """The two RMSNorms (width h) and the query / key norms (Qwen3's q_norm, k_norm).

    A fused RMSNorm (CUDA) keeps its input; torch's composite one (CPU) keeps the input and the
    normalised value, both in float32 (copies when the activations are bf16)."""
    if fused_norm:
        return (2 * h + q + (q + 2 * kv)) * act_bytes
    if act_bytes == 4:
        return (2 * h + q + (q + 2 * kv)) * 4 + (2 * h + q + kv) * 4
    return 2 * (2 * h + q + kv) * 4


def stage_activation_gib(
    cfg: Config, plan: DryRunPlan, stage: int, shape: MicrobatchShape
) -> tuple[float, float]:
    """Activations the student stream keeps on ``stage`` with every microbatch in flight, and
    the most one layer's backward adds (with full recompute: the layer group recomputed first).

    The 1F1B schedule holds PP - stage microbatches on a stage; the interleaved one holds
    (PP - stage - 1) x 2 + (VPP - 1) x PP + 1 model-chunk microbatches of layers / VPP each."""
    mc, par = cfg.model, cfg.parallel
    layers = plan.stage_layers[stage]
    act = activation_bytes(cfg)
    tokens = shape.student_tokens
    attention = attention_kind(cfg)
    on_gpu = cfg.runtime.device != "cpu"
    common = dict(
        act_bytes=act,
        sequence_parallel=par.sequence_parallel,
        fused_norm=on_gpu,
        attention=attention,
        fused_swiglu=mc.swiglu_fusion(on_gpu=on_gpu),
    )
    layer = layer_activation_bytes(plan, seq_len=shape.student_len, recompute=None, **common) * tokens
    recomputed = 0.0
    if mc.recompute_granularity == "selective":
        selective = layer_activation_bytes(plan, seq_len=shape.student_len, recompute="selective", **common)
        kept = layers * tokens * selective
    elif mc.recompute_granularity == "full":
        hidden = (plan.spec.hidden_size / plan.tp if par.sequence_parallel else plan.spec.hidden_size) * act
        n = min(mc.recompute_num_layers, layers)
        if mc.recompute_method == "uniform":  # one input per group of n layers; a group at a time in backward
            kept, recomputed = math.ceil(layers / n) * hidden * tokens, n * layer
        else:  # block: the first n layers of the stage recomputed, the others keep everything
            kept, recomputed = n * hidden * tokens + (layers - n) * layer, (layer if n else 0.0)
    else:
        kept = layers * layer
    recomputed += (
        layer_backward_bytes(plan, seq_len=shape.student_len, act_bytes=act, attention=attention) * tokens
    )
    vpp = par.virtual_pipeline_model_parallel_size
    if vpp:
        in_flight = ((plan.pp - stage - 1) * 2 + (vpp - 1) * plan.pp + 1) / vpp
    else:
        in_flight = plan.pp - stage
    return in_flight * kept / GIB, recomputed / GIB


def loss_working_set_gib(cfg: Config, plan: DryRunPlan, shape: MicrobatchShape) -> float:
    """The last stage's logits and loss at their peak: both streams' scored rows, and then the
    larger of the forward's chunk buffers and the backward's (the student's logit gradient and
    its chunk buffers)."""
    vocab = plan.spec.vocab_size / plan.tp
    act = activation_bytes(cfg)
    logits = (2 if plan.teacher_stream else 1) * shape.rows * vocab * act
    forward, backward = LOSS_CHUNK_BUFFERS[cfg.loss.kind]
    if cfg.loss.clip_mode == "entry" and cfg.loss.clip is not None:
        forward, backward = forward + ENTRY_CLIP_BUFFERS, backward + ENTRY_CLIP_BUFFERS
    if not algorithm_class(cfg.algorithm.name).divergence_loss:
        forward, backward = 5, 2  # the policy / cross-entropy losses (GRPO, RLSD, SFT): log-softmax chunks
    chunk = min(cfg.loss.chunk_tokens, shape.rows) * vocab * 4
    peak = max(forward * chunk, shape.rows * vocab * act + backward * chunk)
    return (logits + peak) / GIB


def teacher_forward_gib(cfg: Config, plan: DryRunPlan, shape: MicrobatchShape) -> float:
    """The teacher stream's largest transient (no grad): one layer's attention scores in flight.

    Unfused attention materialises heads x s x s scores per sequence, then a float32 copy and
    the float32 softmax, one layer at a time."""
    if not plan.teacher_stream:
        return 0.0
    heads = plan.spec.num_attention_heads / plan.tp
    per_entry = _score_entry_bytes(activation_bytes(cfg), attention_kind(cfg))
    return heads * shape.teacher_len * shape.teacher_tokens * per_entry / GIB


def lora_params(spec: HFModelSpec, lora) -> int:
    """Adapter elements of one decoder layer: rank x (in + out) of every targeted module."""
    h, ffn = spec.hidden_size, spec.ffn_hidden_size
    q, kv = spec.num_attention_heads * spec.head_dim, spec.num_query_groups * spec.head_dim
    sizes = {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, ffn),
        "up_proj": (h, ffn),
        "down_proj": (ffn, h),
    }
    return sum(lora.rank * sum(sizes[name]) for name in lora.target_modules)


def trainer_memory_gib(cfg: Config, plan: DryRunPlan) -> dict[str, float]:
    """The trainer's state on the largest stage: weights, grads, Adam, the teacher and its EMA.

    With LoRA the adapters train alone (grads and Adam on them only; upper bound: TP splits one
    factor of each) and the fixed teacher is the base with the adapters off (no copy); the EMA
    teacher is a float32 average of the adapters. A full-parameter EMA teacher of a bf16 model
    is a bf16 module plus a float32 shadow of every parameter.
    """
    per_stage = plan.stage_params()
    params = max(per_stage)
    experts = plan.stage_expert_params()[per_stage.index(params)]
    weight_bytes = 2 if cfg.model.dtype == "bfloat16" else 4
    adam = 8 + (4 if cfg.model.dtype == "bfloat16" else 0)  # exp_avg + exp_avg_sq (+ fp32 master)
    distributed = cfg.parallel.use_distributed_optimizer
    # the experts' optimizer state shards over their own data-parallel replicas
    optimizer_elements = (params - experts) / (plan.dp if distributed else 1) + experts / (
        plan.edp if distributed else 1
    )
    trained, extra = params, 0.0
    # the teacher section sets the teacher (OPSD, RLSD); GRPO's KL reference is always a frozen copy
    mode = "fixed" if algorithm_class(cfg.algorithm.name).teacher_reads_student_prompt else cfg.teacher.mode
    teacher = params * weight_bytes if plan.teacher_stream and mode != "current" else 0.0
    ema = plan.teacher_stream and mode == "ema"
    shadow = params * 4 if ema and weight_bytes != 4 else 0.0
    if cfg.lora.enabled:
        trained = extra = lora_params(plan.spec, cfg.lora) * max(plan.stage_layers)
        optimizer_elements = trained / (plan.dp if distributed else 1)
        teacher = trained * 4 if ema else 0.0
        shadow = 0.0
    return {
        "weights": (params + extra) * weight_bytes / GIB,
        "grads (fp32)": trained * 4 / GIB,
        "optimizer": optimizer_elements * adam / GIB,
        "teacher copy": teacher / GIB,
        "EMA shadow (fp32)": shadow / GIB,
    }


def step_memory_gib(cfg: Config, plan: DryRunPlan) -> dict[str, float]:
    """The training step's working set on its worst stage.

    ``activations``: what the student stream keeps for backward (every microbatch in flight);
    ``logits and loss``: the last stage's, at the start of backward; ``other transients``: what
    the peak needs beyond the loss when something else is larger at another moment (one layer
    group recomputed in backward, the teacher's attention scores in its forward)."""
    shape = MicrobatchShape.of(cfg, teacher_stream=plan.teacher_stream)
    teacher = teacher_forward_gib(cfg, plan, shape)
    best = (0.0, 0.0, 0.0)
    for stage in range(plan.pp):
        kept, recomputed = stage_activation_gib(cfg, plan, stage, shape)
        last = stage == plan.pp - 1
        loss = loss_working_set_gib(cfg, plan, shape) if last else 0.0
        other = max(recomputed, teacher, loss) - loss
        if kept + loss + other > sum(best):
            best = (kept, loss, other)
    return dict(zip(STEP_PARTS, best))


def engine_memory_gib(cfg: Config, plan: DryRunPlan) -> dict[str, float]:
    """The colocated engine on each GPU: its weights (full model / engine TP) and KV cache.

    vLLM takes ``rollout.gpu_memory_utilization`` of the GPU (``trainer.dry_run_gpu_gib``, or
    80 GiB when unknown) for weights and KV cache. During generation it holds both next to the
    trainer's state; while the trainer trains it sleeps (level 1 moves its weights to host
    memory and frees the KV cache, level 2 discards both; level 0 keeps both), which
    ``estimate_memory_gib`` accounts per phase.
    """
    ro = cfg.rollout
    if engine_layout(ro, plan.world_size).placement == "rank0":
        return {"engine weights": 0.0, "engine KV cache": 0.0}
    engine_bytes = 2 if (ro.dtype or cfg.model.dtype) == "bfloat16" else 4
    weights = plan.total_params() * engine_bytes / ro.tensor_parallel_size / GIB
    kv = max(ro.gpu_memory_utilization * (gpu_memory_gib(cfg) or 80.0) - weights, 0.0)
    return {"engine weights": weights, "engine KV cache": kv}


# Every part of the per-GPU memory estimate; see the module docstring.
MEMORY_PARTS: tuple[Callable[[Config, DryRunPlan], dict[str, float]], ...] = (
    trainer_memory_gib,
    step_memory_gib,
    engine_memory_gib,
)
ENGINE_PARTS = ("engine weights", "engine KV cache")


def estimate_memory_gib(cfg: Config, world_size: int) -> dict[str, float]:
    """Per-GPU memory by part, per phase (generation / training), and ``total`` (the larger)."""
    plan = DryRunPlan.of(cfg, world_size)
    estimate: dict[str, float] = {}
    for part in MEMORY_PARTS:
        estimate.update(part(cfg, plan))
    engine = sum(estimate.get(name, 0.0) for name in ENGINE_PARTS)
    step = sum(estimate.get(name, 0.0) for name in STEP_PARTS)
    state = sum(estimate.values()) - engine - step
    asleep = engine if cfg.rollout.sleep_level == 0 else 0.0
    estimate["during generation"] = state + engine
    estimate["during training"] = state + step + asleep
    estimate["total"] = max(estimate["during generation"], estimate["during training"])
    return estimate


def gpu_memory_gib(cfg: Config) -> float | None:
    """The GPU memory the verdict is for: ``trainer.dry_run_gpu_gib``, else the visible GPU's."""
    if cfg.trainer.dry_run_gpu_gib is not None:
        return cfg.trainer.dry_run_gpu_gib
    import torch

    if cfg.runtime.device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GIB
    return None


Change = dict[str, dict[str, Any]]  # section -> {field: value}


def _replace(cfg: Config, change: Change) -> Config:
    return dataclasses.replace(
        cfg, **{name: dataclasses.replace(getattr(cfg, name), **fields) for name, fields in change.items()}
    )


def _label(change: Change) -> str:
    return " ".join(
        f"{section}.{field}={str(value).lower() if isinstance(value, bool) else value}"
        for section, fields in change.items()
        for field, value in fields.items()
    )


def _candidate_changes(cfg: Config, world_size: int) -> list[Change]:
    """Changes that lower the memory, cheapest first (in throughput lost or GPUs needed)."""
    par, mc, tr, ro = cfg.parallel, cfg.model, cfg.trainer, cfg.rollout
    out: list[Change] = []
    if not par.use_distributed_optimizer and data_parallel_size(par, world_size) > 1:
        out.append({"parallel": {"use_distributed_optimizer": True}})
    if ro.sleep_level == 0:
        out.append({"rollout": {"sleep_level": 1}})
    shape = MicrobatchShape.of(cfg, teacher_stream=algorithm_class(cfg.algorithm.name).uses_teacher(cfg))
    one_rollout = shape.student_len + shape.teacher_len  # a smaller budget still holds one rollout
    tokens = tr.microbatch_tokens // 2
    while tokens > one_rollout:
        out.append({"trainer": {"microbatch_tokens": tokens}})
        tokens //= 2
    if one_rollout < tr.microbatch_tokens:
        out.append({"trainer": {"microbatch_tokens": one_rollout}})
    if mc.recompute_granularity is None:
        out.append({"model": {"recompute_granularity": "selective"}})
    if mc.recompute_granularity != "full":
        out.append(
            {
                "model": {
                    "recompute_granularity": "full",
                    "recompute_method": "uniform",
                    "recompute_num_layers": 1,
                }
            }
        )
    out += [
        {"rollout": {"gpu_memory_utilization": share}}
        for share in (0.25, 0.2, 0.15, 0.1)
        if share < ro.gpu_memory_utilization
    ]
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    out.append({"parallel": {"tensor_model_parallel_size": 2 * tp, "sequence_parallel": True}})
    out.append({"parallel": {"pipeline_model_parallel_size": 2 * pp}})
    if not cfg.lora.enabled:
        lora = {"rank": 64, "alpha": 128.0}  # the released OPSD runs' adapters
        if DryRunPlan.of(cfg, world_size).spec.moe is not None:  # experts take no adapters
            lora["target_modules"] = ("q_proj", "k_proj", "v_proj", "o_proj")
        out.append({"lora": lora})
    if par.expert_model_parallel_size < world_size // pp:
        out.append({"parallel": {"expert_model_parallel_size": 2 * par.expert_model_parallel_size}})
    return out


def _valid(cfg: Config, world_size: int) -> bool:
    try:
        validate(cfg, world_size=world_size)
        algorithm_class(cfg.algorithm.name).check_config(
            cfg, dp_size=data_parallel_size(cfg.parallel, world_size)
        )
    except ConfigError:
        return False
    return True


def _merge(changes: list[Change]) -> Change | None:
    """The changes together; None when two of them set the same field."""
    merged: Change = {}
    for change in changes:
        for section, fields in change.items():
            if fields.keys() & merged.get(section, {}).keys():
                return None
            merged.setdefault(section, {}).update(fields)
    return merged


def cheapest_fit(cfg: Config, world_size: int, gpu_gib: float) -> tuple[str, dict[str, float]] | None:
    """The cheapest change after which both phases fit, from single changes and pairs that set
    different fields. Cost: a change's rank in ``_candidate_changes`` (a pair: both ranks plus
    one); LoRA changes the method (adapters instead of every weight), so it ranks last. Returns
    the overrides and the new estimate; None when nothing tried is enough."""
    limit = FIT_SHARE * gpu_gib
    candidates = [c for c in _candidate_changes(cfg, world_size) if _valid(_replace(cfg, c), world_size)]
    rank = [LORA_RANK if "lora" in c else i for i, c in enumerate(candidates)]
    trials = [(rank[i], (i,)) for i in range(len(candidates))]
    trials += [(rank[i] + rank[j] + 1, (i, j)) for i, j in itertools.combinations(range(len(candidates)), 2)]
    for _, picked in sorted(trials):
        change = _merge([candidates[i] for i in picked])
        if change is None or not _valid(changed := _replace(cfg, change), world_size):
            continue
        estimate = estimate_memory_gib(changed, world_size)
        if estimate["total"] <= limit:
            return _label(change), estimate
    return None


def verdict_lines(cfg: Config, world_size: int, estimate: Mapping[str, float]) -> list[str]:
    """``fits`` / ``does not fit`` per phase, and the cheapest change when something does not."""
    gpu = gpu_memory_gib(cfg)
    if gpu is None:
        return ["verdict: none (no GPU here); set trainer.dry_run_gpu_gib to the target GPU's memory in GiB"]
    limit = FIT_SHARE * gpu
    lines = [
        f"verdict for {gpu:g} GiB GPUs (a phase fits in {limit:.1f} GiB; the rest is CUDA context and fragmentation):"
    ]
    for phase in ("generation", "training"):
        need = estimate[f"during {phase}"]
        lines.append(f"  {phase}: {'fits' if need <= limit else 'does not fit'} ({need:.1f} GiB)")
    share = cfg.rollout.gpu_memory_utilization * gpu
    if estimate.get("engine weights", 0.0) > share:
        lines.append(
            f"  engine: its weights ({estimate['engine weights']:.1f} GiB) exceed its share "
            f"rollout.gpu_memory_utilization={cfg.rollout.gpu_memory_utilization:g} of the GPU ({share:.1f} GiB), "
            "so vLLM cannot start; raise the share or rollout.tensor_parallel_size"
        )
    if estimate["total"] > limit:
        fix = cheapest_fit(cfg, world_size, gpu)
        if fix is None:
            lines.append(
                "  no single change or pair of changes tried makes it fit (smaller microbatches, recompute, "
                "the distributed optimizer, engine sleep and memory share, TP or PP x2, LoRA): "
                "use more GPUs per model replica or a smaller model"
            )
        else:
            name, changed = fix
            lines.append(f"  cheapest change that fits: {name} (then {changed['total']:.1f} GiB)")
    return lines


def describe_layout(cfg: Config, world_size: int) -> str:
    """One line per fact about the parallel layout this config asks for."""
    plan = DryRunPlan.of(cfg, world_size)
    par, spec = cfg.parallel, plan.spec
    vpp = par.virtual_pipeline_model_parallel_size
    lines = [
        f"model: {spec.architecture} from {cfg.model.hf_path} "
        f"({spec.num_layers} layers, hidden {spec.hidden_size}, vocab {spec.vocab_size})",
        f"world size {world_size} = TP {plan.tp} x PP {plan.pp} x DP {plan.dp}"
        + (f", VPP {vpp}" if vpp else "")
        + (", sequence parallel" if par.sequence_parallel else ""),
    ]
    if plan.pp > 1:
        lines.append("layers per pipeline stage: " + " + ".join(map(str, plan.stage_layers)))
    if spec.moe is not None:
        moe = spec.moe
        lines.append(
            f"experts: {moe.num_experts} per layer, {moe.experts_per_token} per token, width "
            f"{moe.expert_ffn_hidden_size}; EP {plan.ep} x expert TP {plan.etp} x expert DP {plan.edp}: "
            f"{moe.num_experts // plan.ep} experts per GPU; {plan.total_params() / 1e9:.1f}B parameters in all"
        )
    clip = f", {cfg.loss.clip_mode} clip {cfg.loss.clip:g}" if cfg.loss.clip is not None else ""
    lines.append(f"loss {cfg.loss.kind} (beta {cfg.loss.beta}{clip}), teacher {cfg.teacher.mode}")
    shape = MicrobatchShape.of(cfg, teacher_stream=plan.teacher_stream)
    recompute = cfg.model.recompute_granularity or "none"
    lines.append(
        f"largest microbatch: {shape.sequences:.2f} rollouts of student {shape.student_len}"
        + (f" + teacher {shape.teacher_len}" if shape.teacher_len else "")
        + f" tokens ({cfg.trainer.microbatch_tokens} per microbatch), recompute {recompute}"
    )
    return "\n".join(lines)


def dry_run_report(cfg: Config, world_size: int) -> str:
    """What ``trainer.dry_run=true`` prints: the layout, the memory estimate per GPU, the verdict."""
    lines = [describe_layout(cfg, world_size)]
    estimate = estimate_memory_gib(cfg, world_size)
    for name, value in estimate.items():
        lines.append(f"  {name:<22}{value:8.2f} GiB per GPU")
    lines += verdict_lines(cfg, world_size, estimate)
    return "\n".join(lines)
