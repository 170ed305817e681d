"""Read a Hugging Face ``config.json`` into the few numbers a Megatron GPTModel needs.

Supported families (``SUPPORTED_ARCHITECTURES``): Qwen3 (q/k RMSNorm), Qwen2/2.5 (qkv bias),
Llama 3/3.1/3.2 (llama3 rope scaling) and Qwen3-MoE (Qwen3's attention, every MLP a top-k
mixture of experts: ``MoESpec``). Every option that would change the maths and that
megaopsd does not implement (sliding windows, other rope types, extra biases, activations
other than SiLU) is rejected here with a message that names the field, so a model is never
built "almost right".

transformers 5 writes ``rope_parameters`` (a dict with ``rope_type``, ``rope_theta``,
``factor``...) where transformers 4 wrote ``rope_theta`` and ``rope_scaling``; both are read.

    spec = load_hf_config("/path/to/Qwen3-1.7B")   # directory, config.json path or dict
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# architecture name in config.json -> family name used by the conversion tables
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


class UnsupportedModelError(ValueError):
    """The config describes a model megaopsd cannot build exactly; the message says why."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Llama3RopeScaling:
    """The ``rope_type="llama3"`` frequency remapping (Llama 3.1 and later)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoESpec:
    """The mixture-of-experts MLP of every decoder layer (Qwen3-MoE).

    Routing as Hugging Face computes it: softmax over all experts' router logits, the top
    ``experts_per_token`` kept, renormalised to sum to 1 when ``norm_topk_prob``.
    """

    num_experts: int
    experts_per_token: int  # num_experts_per_tok
    expert_ffn_hidden_size: int  # moe_intermediate_size
    norm_topk_prob: bool
    router_aux_loss_coef: float  # the load-balancing loss coefficient the model was trained with


@dataclasses.dataclass(frozen=True, kw_only=True)
class HFModelSpec:
    """What megaopsd needs from a Hugging Face config, normalised across families."""

    architecture: str  # e.g. "Qwen3ForCausalLM"
    family: str  # qwen3 | qwen2 | llama
    vocab_size: int  # true vocabulary size (rows of embed_tokens)
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int  # num_key_value_heads
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Llama3RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3)
    moe: MoESpec | None = None  # every layer's MLP is a mixture of experts (Qwen3-MoE); None: dense
    raw: Mapping[str, Any] = dataclasses.field(repr=False, compare=False)  # the config.json dict


def _read_dict(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json at {path}; point at a Hugging Face model directory")
    return json.loads(config_file.read_text())


def _architecture(raw: Mapping[str, Any]) -> tuple[str, str]:
    archs = raw.get("architectures") or []
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if len(archs) != 1:
        raise UnsupportedModelError(
            f"config.json must name exactly one architecture, got architectures={archs!r}; "
            f"supported: {supported}"
        )
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(f"unsupported architecture {arch!r}; supported: {supported}")
    return arch, SUPPORTED_ARCHITECTURES[arch]


def _rope(raw: Mapping[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
    """Rope base and optional llama3 scaling from either spelling of the config."""
    params = dict(raw.get("rope_parameters") or {})
    legacy_scaling = raw.get("rope_scaling") or {}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    scaling = {**legacy_scaling, **params}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise UnsupportedModelError(f"rope_type={rope_type!r} is not supported; supported: default, llama3")
    return float(theta), Llama3RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def _reject_unsupported(raw: Mapping[str, Any], family: str) -> None:
    def fail(field: str, why: str) -> None:
        raise UnsupportedModelError(f"{family}: {field}={raw.get(field)!r} is not supported ({why})")

    if raw.get("hidden_act", "silu") != "silu":
        fail("hidden_act", "only SwiGLU with silu is implemented")
    if raw.get("mlp_bias", False):
        fail("mlp_bias", "the MLP has no bias in the supported families")
    if family != "qwen2" and raw.get("attention_bias", False):
        fail("attention_bias", "q/k/v/o biases are only implemented the Qwen2 way")
    if raw.get("use_sliding_window", False):
        fail("use_sliding_window", "sliding-window attention is not implemented")
    if raw.get("pretraining_tp", 1) not in (1, None):
        fail("pretraining_tp", "only 1 is supported")
    if family == "qwen3_moe":
        if raw.get("decoder_sparse_step", 1) != 1:
            fail("decoder_sparse_step", "only 1 is implemented: every layer's MLP is a mixture of experts")
        if raw.get("mlp_only_layers"):
            fail("mlp_only_layers", "dense MLP layers inside a mixture-of-experts model are not implemented")
        if raw.get("shared_expert_intermediate_size"):
            fail("shared_expert_intermediate_size", "Qwen3-MoE has no shared expert; this is another model")
        experts, top_k = _num_experts(raw), int(raw.get("num_experts_per_tok", 0))
        if experts < 2 or not 1 <= top_k <= experts:
            raise UnsupportedModelError(
                f"{family}: num_experts={experts} with num_experts_per_tok={top_k} is not a mixture of "
                "experts (need num_experts >= 2 and 1 <= num_experts_per_tok <= num_experts)"
            )


def _num_experts(raw: Mapping[str, Any]) -> int:
    """``num_experts`` (the released checkpoints) or ``num_local_experts`` (transformers 5 writes it)."""
    return int(raw.get("num_experts") or raw.get("num_local_experts") or 0)


def _moe(raw: Mapping[str, Any], family: str) -> MoESpec | None:
    if family != "qwen3_moe":
        return None
    return MoESpec(
        num_experts=_num_experts(raw),
        experts_per_token=int(raw["num_experts_per_tok"]),
        expert_ffn_hidden_size=int(raw["moe_intermediate_size"]),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        router_aux_loss_coef=float(raw.get("router_aux_loss_coef", 0.001)),
    )


def load_hf_config(source: str | Path | Mapping[str, Any]) -> HFModelSpec:
    """Parse and check a Hugging Face causal-LM config.

    Args:
        source: a model directory, a ``config.json`` path, or the parsed dict.

    Returns:
        The normalised spec.

    Raises:
        FileNotFoundError: no ``config.json`` where one was expected.
        UnsupportedModelError: an architecture or option megaopsd does not implement.
    """
    raw = _read_dict(source)
    arch, family = _architecture(raw)
    _reject_unsupported(raw, family)
    heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    theta, scaling = _rope(raw)
    return HFModelSpec(
        architecture=arch,
        family=family,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        ffn_hidden_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_attention_heads=heads,
        num_query_groups=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2",
        qk_norm=family in ("qwen3", "qwen3_moe"),
        moe=_moe(raw, family),
        raw=raw,
    )


def tensor_parallel_problem(spec: HFModelSpec, tp: int) -> str | None:
    """Why ``tp`` cannot split this model's heads (``"does not divide num_attention_heads=4"``), or None."""
    for field, count in (
        ("num_attention_heads", spec.num_attention_heads),
        ("num_key_value_heads", spec.num_query_groups),
    ):
        if count % tp != 0:
            return f"does not divide {field}={count}"
    return None


def check_tensor_parallel(spec: HFModelSpec, tp: int) -> None:
    """Raise ``UnsupportedModelError`` unless ``tp`` divides the head and query-group counts."""
    if tp < 1:
        raise UnsupportedModelError(f"tensor parallel size {tp} must be >= 1")
    problem = tensor_parallel_problem(spec, tp)
    if problem is not None:
        raise UnsupportedModelError(
            f"tensor parallel size {tp} {problem}; pick a TP that divides both head counts"
        )
