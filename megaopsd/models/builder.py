"""Build megatron-core GPTModel chunks from a Hugging Face config.

One ``GPTModel`` per virtual pipeline chunk on this rank (a list of one without VPP). The
model returns vocab-parallel logits ``[b, s, padded_vocab / TP]`` (``parallel_output=True``);
the columns at and above the true vocabulary size are padding that the loss code masks.

    spec = load_hf_config(model_cfg.hf_path)
    chunks = build_model_chunks(spec, model_cfg, runtime.parallel)

The local (pure megatron-core) layer spec runs everywhere; ``transformer_impl=
"transformer_engine"`` selects the TE spec, importing Transformer Engine only then.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from megaopsd.config import ModelConfig
from megaopsd.config.hf_spec import HFModelSpec, check_tensor_parallel
from megaopsd.models.norm import fuse_norms
from megaopsd.models.rope import apply_rope_override, megatron_handles_scaling
from megaopsd.runtime.distributed import collective_device
from megaopsd.runtime.kernels import compiles_kernels_for
from megaopsd.runtime.parallel import ParallelState

if TYPE_CHECKING:  # megatron imports stay lazy: importing megatron.core costs seconds
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_config import TransformerConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def padded_vocab_size(vocab_size: int, tp_size: int, make_vocab_size_divisible_by: int = 128) -> int:
    """The vocabulary size Megatron allocates: rounded up to a multiple of ``divisible_by x TP``.

    Args:
        vocab_size: the true vocabulary size (HF ``vocab_size``).
        tp_size: tensor-parallel size; every TP rank gets an equal slice of the padded rows.
        make_vocab_size_divisible_by: ``ModelConfig.make_vocab_size_divisible_by``.
    """
    multiple = make_vocab_size_divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


def vocab_sizes(spec: HFModelSpec, model_cfg: ModelConfig, tp_size: int) -> tuple[int, int]:
    """``(true_vocab_size, padded_vocab_size)`` for a model at tensor-parallel size ``tp_size``."""
    return spec.vocab_size, padded_vocab_size(
        spec.vocab_size, tp_size, model_cfg.make_vocab_size_divisible_by
    )


def params_dtype(model_cfg: ModelConfig) -> torch.dtype:
    """The torch dtype of ``ModelConfig.dtype``."""
    if model_cfg.dtype not in _DTYPES:
        raise ValueError(f"model.dtype={model_cfg.dtype!r} is unknown; use one of {', '.join(_DTYPES)}")
    return _DTYPES[model_cfg.dtype]


def transformer_config(
    spec: HFModelSpec,
    model_cfg: ModelConfig,
    parallel: ParallelState,
    overrides: Mapping[str, Any] | None = None,
) -> TransformerConfig:
    """The megatron ``TransformerConfig`` for this model and layout.

    Args:
        spec: the parsed HF config.
        model_cfg: dtype and implementation choices.
        parallel: this rank's parallel layout.
        overrides: extra TransformerConfig fields (e.g. recompute settings), applied last.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_tensor_parallel(spec, parallel.tp_size)
    dtype = params_dtype(model_cfg)
    # Most fused kernels need TE or apex; the local spec runs them unfused. The SwiGLU fusion is
    # megatron's own (torch.compile): on GPUs (``ModelConfig.swiglu_fusion``).
    fused = model_cfg.transformer_impl == "transformer_engine"
    kwargs: dict[str, Any] = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_norm,
        # HF decoder configs carry only attention dropout (applied in training, as here);
        # its random masks come from megatron's RNG tracker, which checkpoints restore.
        hidden_dropout=0.0,
        attention_dropout=float(spec.raw.get("attention_dropout", 0.0)),
        attention_softmax_in_fp32=True,
        init_method_std=float(spec.raw.get("initializer_range", 0.02)),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        tensor_model_parallel_size=parallel.tp_size,
        pipeline_model_parallel_size=parallel.pp_size,
        virtual_pipeline_model_parallel_size=parallel.vpp_size,
        # megatron places and numbers the layers of uneven stages itself (layer_number includes
        # the offset), so conversion and checkpoints follow without arithmetic of ours.
        num_layers_in_first_pipeline_stage=parallel.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=parallel.num_layers_in_last_pipeline_stage,
        sequence_parallel=parallel.sequence_parallel,
        bias_activation_fusion=model_cfg.swiglu_fusion(on_gpu=compiles_kernels_for(collective_device())),
        masked_softmax_fusion=fused,
        bias_dropout_fusion=fused,
        apply_rope_fusion=fused,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
    if parallel.pp_size > 1:
        # The paired teacher/student schedule sends tensors of varying length between stages;
        # megatron refuses variable_seq_lengths with the default (allgather) token dispatcher,
        # even for dense models.
        kwargs.update(variable_seq_lengths=True, moe_token_dispatcher_type="alltoall")
    if spec.moe is not None:
        kwargs.update(moe_config(spec, model_cfg, parallel))
    kwargs.update(overrides or {})
    return TransformerConfig(**kwargs)


def moe_config(spec: HFModelSpec, model_cfg: ModelConfig, parallel: ParallelState) -> dict[str, Any]:
    """TransformerConfig fields of a mixture-of-experts model (Qwen3-MoE routing, see ``MoESpec``).

    Hugging Face takes the softmax over all experts, keeps the top k and (``norm_topk_prob``)
    renormalises them: that is megatron's softmax over the top-k logits (``pre_softmax``
    False); without the renormalisation it is megatron's ``pre_softmax``. The router runs in
    the model's dtype, as in Hugging Face and vLLM. The load-balancing loss is the switch
    ``aux_loss`` with ``model.moe_aux_loss_coeff`` (None: the model's ``router_aux_loss_coef``).
    """
    moe = spec.moe
    assert moe is not None
    coeff = model_cfg.moe_aux_loss_coeff
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.experts_per_token,
        moe_ffn_hidden_size=moe.expert_ffn_hidden_size,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not moe.norm_topk_prob,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=moe.router_aux_loss_coef if coeff is None else coeff,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=model_cfg.transformer_impl == "transformer_engine",
        expert_model_parallel_size=parallel.ep_size,
        expert_tensor_parallel_size=parallel.etp_size,
    )


def megatron_overrides(model_cfg: ModelConfig) -> dict[str, Any]:
    """TransformerConfig fields from the config: activation recompute, then ``transformer_overrides``.

    Raises:
        ValueError: an override names no TransformerConfig field.
    """
    import dataclasses

    from megatron.core.transformer.transformer_config import TransformerConfig

    known = {field.name for field in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(model_cfg.transformer_overrides) - known)
    if unknown:
        raise ValueError(
            f"model.transformer_overrides.{unknown[0]} is not a megatron TransformerConfig field; "
            "check the name against megatron/core/transformer/transformer_config.py"
        )
    overrides: dict[str, Any] = {}
    if model_cfg.recompute_granularity is not None:
        overrides["recompute_granularity"] = model_cfg.recompute_granularity
        if model_cfg.recompute_granularity == "full":
            overrides["recompute_method"] = model_cfg.recompute_method
            overrides["recompute_num_layers"] = model_cfg.recompute_num_layers
    return overrides | dict(model_cfg.transformer_overrides)


def layer_spec(spec: HFModelSpec, transformer_impl: str, attention_backend: str = "sdpa") -> ModuleSpec:
    """The megatron ``ModuleSpec`` of one decoder layer for ``transformer_impl``; the local spec's
    core attention is ``attention_backend`` (``sdpa``: ``SdpaAttention``; ``unfused``: megatron's)."""
    from megatron.core.models.gpt import gpt_layer_specs

    num_experts = spec.moe.num_experts if spec.moe is not None else None
    if transformer_impl == "local":
        # MoE layers: megatron's SequentialMLP experts (one plain MLP per local expert)
        local = gpt_layer_specs.get_gpt_layer_local_spec(
            num_experts=num_experts, qk_layernorm=spec.qk_norm, normalization="RMSNorm"
        )
        if attention_backend == "sdpa":
            from megaopsd.models.attention import SdpaAttention

            local.submodules.self_attention.submodules.core_attention = SdpaAttention
        elif attention_backend != "unfused":
            raise ValueError(f"model.attention_backend={attention_backend!r} is unknown; use sdpa or unfused")
        return local
    if transformer_impl == "transformer_engine":
        try:
            import transformer_engine  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(
                "model.transformer_impl=transformer_engine needs Transformer Engine "
                "(pip install 'megaopsd[gpu]' on a CUDA machine); use transformer_impl=local otherwise"
            ) from exc
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=num_experts is not None, qk_layernorm=spec.qk_norm
        )
    raise ValueError(
        f"model.transformer_impl={transformer_impl!r} is unknown; use local or transformer_engine"
    )


def mark_expert_params(model: torch.nn.Module) -> None:
    """Give the experts megatron's expert-parallel treatment at every EP size, EP1 included.

    Megatron marks expert parameters ``allreduce=False`` only when EP > 1; they then get their
    own gradient buffers (reduced over the expert-data-parallel group, which is the
    data-parallel group at EP1) and their own optimizer in a chain after the dense one. Marked
    at EP1 too, a run's optimizer state has the same structure at every EP, so a checkpoint
    written at EP2 resumes at EP1 and back.
    """
    for name, param in model.named_parameters():
        if ".experts." in name:
            param.allreduce = False


def unwrap_chunk(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside wrappers (megatron DDP, Float16Module: each keeps it in ``.module``)."""
    while not hasattr(chunk, "decoder") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _stage_flags(parallel: ParallelState, vp_stage: int) -> tuple[bool, bool]:
    """(pre_process, post_process) of virtual chunk ``vp_stage`` on this pipeline rank."""
    chunks = parallel.vpp_size or 1
    pre = parallel.is_first_stage and vp_stage == 0
    post = parallel.is_last_stage and vp_stage == chunks - 1
    return pre, post


def build_model_chunks(
    spec: HFModelSpec,
    model_cfg: ModelConfig,
    parallel: ParallelState,
    *,
    config_overrides: Mapping[str, Any] | None = None,
) -> list[torch.nn.Module]:
    """Build this rank's GPTModel chunks (one per virtual pipeline stage), randomly initialised.

    Args:
        spec: the parsed HF config (``load_hf_config``).
        model_cfg: dtype, vocab padding and layer implementation.
        parallel: this rank's layout (``runtime.parallel``); megatron's parallel state must exist.
        config_overrides: extra TransformerConfig fields; None takes them from ``model_cfg``
            (``megatron_overrides``: activation recompute and ``transformer_overrides``).

    Returns:
        ``[GPTModel]`` of length ``vpp_size or 1``; chunk ``i`` is built with ``vp_stage=i``.
        Load weights with ``megaopsd.convert.load_hf_weights`` or a distributed checkpoint.
    """
    from megatron.core.models.gpt import GPTModel

    if config_overrides is None:
        config_overrides = megatron_overrides(model_cfg)
    config = transformer_config(spec, model_cfg, parallel, config_overrides)
    block_spec = layer_spec(spec, model_cfg.transformer_impl, model_cfg.attention_backend)
    _, padded = vocab_sizes(spec, model_cfg, parallel.tp_size)
    scaling = spec.rope_scaling
    builtin_scaling = scaling is not None and megatron_handles_scaling(scaling)
    chunks = []
    for vp_stage in range(parallel.vpp_size or 1):
        pre, post = _stage_flags(parallel, vp_stage)
        model = GPTModel(
            config=config,
            transformer_layer_spec=block_spec,
            vocab_size=padded,
            max_sequence_length=spec.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            parallel_output=True,
            share_embeddings_and_output_weights=spec.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_percent=1.0,
            rotary_base=spec.rope_theta,
            rope_scaling=builtin_scaling,
            rope_scaling_factor=scaling.factor if builtin_scaling else 8.0,
            vp_stage=vp_stage if parallel.vpp_size else None,
        )
        if scaling is not None and not builtin_scaling:
            apply_rope_override(model, spec.head_dim, spec.rope_theta, scaling)
        if spec.moe is not None:
            mark_expert_params(model)
        if model_cfg.transformer_impl == "local":
            fuse_norms(model)
        # megatron creates TP-sharded weights on the current GPU, but the torch norms of the local
        # spec on the default (CPU) device: put the whole chunk where the collectives run.
        chunks.append(model.to(collective_device()))
    return chunks
