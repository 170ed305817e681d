"""The one mapping per model family between Hugging Face tensors and Megatron parameters.

Each ``Rule`` says which Hugging Face tensors make which Megatron parameter and how
(a ``Layout`` from ``layouts.py``). Export and import both read these tables; nothing else
in megaopsd knows a parameter name of either format.

Megatron names are relative to the model (``section="first"`` / ``"last"``) or to one
decoder layer (``section="layer"``, HF names carry ``{i}``, the global layer index). Names
are those of the local layer spec; the Transformer Engine spec fuses the two pre-norms into
the following linear layer, which ``TE_NAME_ALIASES`` translates.

Tied embeddings: ``output_layer.weight`` is read from ``model.embed_tokens.weight`` on import
(the last pipeline stage keeps its own copy when PP > 1) and is not exported, except as
``lm_head.weight`` when a caller asks for it (vLLM keeps a separate lm_head).
"""

from __future__ import annotations

import dataclasses

from megaopsd.config.hf_spec import HFModelSpec
from megaopsd.convert.layouts import GATE_UP, QKV, REPLICATED, ROW, VOCAB, Layout


@dataclasses.dataclass(frozen=True)
class Rule:
    """Megatron parameter ``megatron`` is built from HF tensors ``hf`` with ``layout``.

    An ``expert`` rule holds one parameter per expert: its Megatron name carries ``{j}``, the
    expert's index among this rank's experts, and its HF names ``{e}``, the global index; its
    layout splits over the expert-TP group instead of TP.
    """

    megatron: str
    hf: tuple[str, ...]
    layout: Layout
    section: str = "layer"  # first (embedding) | layer | last (final norm, output layer)
    tied_to: str | None = None  # HF tensor this one equals when embeddings are tied
    expert: bool = False

    def hf_names(self, layer: int | None, expert: int | None = None) -> tuple[str, ...]:
        """HF names for decoder layer ``layer`` (None for model-level rules) and, for an
        expert rule, global expert ``expert``."""
        return tuple(name.format(i=layer, e=expert) for name in self.hf)

    def megatron_name(self, local_expert: int | None = None) -> str:
        """The Megatron name; an expert rule's for this rank's ``local_expert``-th expert."""
        return self.megatron.format(j=local_expert) if self.expert else self.megatron


@dataclasses.dataclass(frozen=True)
class FamilyMapping:
    """All rules of one model family, in export order within each section."""

    family: str
    rules: tuple[Rule, ...]

    def section(self, name: str) -> tuple[Rule, ...]:
        return tuple(rule for rule in self.rules if rule.section == name)


# The TE layer spec fuses the pre-norms into the next linear layer (TELayerNormColumnParallelLinear).
TE_NAME_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def te_expert_alias(name: str) -> str | None:
    """The TE spec's grouped-GEMM name of a SequentialMLP expert parameter
    (``mlp.experts.local_experts.3.linear_fc1.weight`` -> ``mlp.experts.linear_fc1.weight3``)."""
    prefix = "mlp.experts.local_experts."
    if not name.startswith(prefix):
        return None
    index, _, rest = name.removeprefix(prefix).partition(".")
    return f"mlp.experts.{rest}{index}"


_L = "model.layers.{i}."
EMBEDDING = Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB, "first")
FINAL_NORM = Rule("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED, "last")
OUTPUT_LAYER = Rule(
    "output_layer.weight", ("lm_head.weight",), VOCAB, "last", tied_to="model.embed_tokens.weight"
)

# The decoder layer shared by every family, split where families add their own rules.
_ATTENTION_IN = (
    Rule("input_layernorm.weight", (_L + "input_layernorm.weight",), REPLICATED),
    Rule(
        "self_attention.linear_qkv.weight",
        (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"),
        QKV,
    ),
)
_ATTENTION_OUT_AND_MLP = (
    Rule("self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",), ROW),
    Rule("pre_mlp_layernorm.weight", (_L + "post_attention_layernorm.weight",), REPLICATED),
    Rule("mlp.linear_fc1.weight", (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), GATE_UP),
    Rule("mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",), ROW),
)


def _family(name: str, *attention_extras: Rule) -> FamilyMapping:
    """A family's table: the shared layer with its own attention rules in between (export order)."""
    return FamilyMapping(
        name,
        (EMBEDDING, *_ATTENTION_IN, *attention_extras, *_ATTENTION_OUT_AND_MLP, FINAL_NORM, OUTPUT_LAYER),
    )


# Qwen3: RMSNorm on each query and key head.
QWEN3 = _family(
    "qwen3",
    Rule("self_attention.q_layernorm.weight", (_L + "self_attn.q_norm.weight",), REPLICATED),
    Rule("self_attention.k_layernorm.weight", (_L + "self_attn.k_norm.weight",), REPLICATED),
)
# Qwen2 / Qwen2.5: biases on q, k and v (fused like the weights).
QWEN2 = _family(
    "qwen2",
    Rule(
        "self_attention.linear_qkv.bias",
        (_L + "self_attn.q_proj.bias", _L + "self_attn.k_proj.bias", _L + "self_attn.v_proj.bias"),
        QKV,
    ),
)
# Llama 3 / 3.1: the shared layer as it is (rope scaling lives in the model builder).
LLAMA = _family("llama")

# Qwen3-MoE: Qwen3's attention; the MLP is a router over experts, each a SwiGLU MLP
# (megatron's SequentialMLP: local_experts.{j}; Hugging Face: experts.{e}, e global).
_E = _L + "mlp.experts.{e}."
QWEN3_MOE = FamilyMapping(
    "qwen3_moe",
    (
        EMBEDDING,
        *_ATTENTION_IN,
        *QWEN3.rules[3:5],  # q_layernorm, k_layernorm
        _ATTENTION_OUT_AND_MLP[0],  # linear_proj
        _ATTENTION_OUT_AND_MLP[1],  # pre_mlp_layernorm
        Rule("mlp.router.weight", (_L + "mlp.gate.weight",), REPLICATED),
        Rule(
            "mlp.experts.local_experts.{j}.linear_fc1.weight",
            (_E + "gate_proj.weight", _E + "up_proj.weight"),
            GATE_UP,
            expert=True,
        ),
        Rule("mlp.experts.local_experts.{j}.linear_fc2.weight", (_E + "down_proj.weight",), ROW, expert=True),
        FINAL_NORM,
        OUTPUT_LAYER,
    ),
)

FAMILIES: dict[str, FamilyMapping] = {m.family: m for m in (QWEN3, QWEN2, LLAMA, QWEN3_MOE)}


def mapping_for(spec: HFModelSpec) -> FamilyMapping:
    """The mapping table of ``spec``'s family."""
    try:
        return FAMILIES[spec.family]
    except KeyError:
        raise ValueError(
            f"no conversion mapping for family {spec.family!r}; known: {', '.join(FAMILIES)}"
        ) from None


def hf_tensor_names(spec: HFModelSpec, *, include_tied_lm_head: bool = False) -> list[str]:
    """Every HF tensor name of the model, in export order (no model or process group needed)."""
    names: list[str] = []
    mapping = mapping_for(spec)
    for rule in mapping.section("first"):
        names.extend(rule.hf_names(None))
    experts = range(spec.moe.num_experts) if spec.moe is not None else ()
    for layer in range(spec.num_layers):
        for rule in mapping.section("layer"):
            if rule.expert:
                for expert in experts:
                    names.extend(rule.hf_names(layer, expert))
            else:
                names.extend(rule.hf_names(layer))
    for rule in mapping.section("last"):
        if rule.tied_to is not None and spec.tie_word_embeddings and not include_tied_lm_head:
            continue
        names.extend(rule.hf_names(None))
    return names
