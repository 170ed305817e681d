"""Find, on this rank, the Megatron parameters a family mapping talks about.

``local_params`` walks this rank's model chunks (one per virtual pipeline stage) and returns,
for every rule the chunks hold, the parameter tensor with its global position. Decoder layers
are placed by their ``layer_number`` (megatron's global, 1-based index, which already includes
the PP and VPP offsets), and experts by the MoE layer's ``local_expert_indices`` (the global
indices of this rank's experts, which include the EP offset), so uneven, interleaved or
expert-parallel layouts need no arithmetic here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from megaopsd.config.hf_spec import HFModelSpec
from megaopsd.convert.families import TE_NAME_ALIASES, FamilyMapping, Rule, te_expert_alias
from megaopsd.models.builder import unwrap_chunk

_SECTION_ORDER = {"first": 0, "layer": 1, "last": 2}


@dataclasses.dataclass(frozen=True)
class ParamRef:
    """One Megatron parameter (this rank's TP shard) and where it sits in the model."""

    rule: Rule
    position: int  # index of the rule in its family table
    layer: int | None  # global decoder layer index; None for model-level rules
    tensor: torch.Tensor
    expert: int | None = None  # global expert index of an expert rule's parameter

    @property
    def key(self) -> tuple[int, int, int, int]:
        """Global export order (the same on every rank): section, layer, table position, expert."""
        return (
            _SECTION_ORDER[self.rule.section],
            -1 if self.layer is None else self.layer,
            self.position,
            -1 if self.expert is None else self.expert,
        )

    @property
    def hf_names(self) -> tuple[str, ...]:
        return self.rule.hf_names(self.layer, self.expert)


def _find(params: dict[str, torch.Tensor], prefix: str, name: str) -> torch.Tensor:
    full = prefix + name
    if full in params:
        return params[full]
    alias = TE_NAME_ALIASES.get(name) or te_expert_alias(name)
    if alias is not None and prefix + alias in params:
        return params[prefix + alias]
    raise KeyError(f"model has no parameter {full!r} (nor a Transformer Engine alias); is the family right?")


def _tied_output(
    chunk: torch.nn.Module,
    params: dict[str, torch.Tensor],
    rule: Rule,
    *,
    for_import: bool,
    include_tied_lm_head: bool,
) -> torch.Tensor | None:
    """With tied embeddings: which tensor (if any) stands for the output layer in this chunk.

    A last stage without the embedding (PP > 1) has its own copy ``output_layer.weight``; a chunk
    holding both ends shares one tensor (megatron allocates no output weight then).
    """
    own_copy = params.get(rule.megatron)
    if for_import:
        return own_copy  # the shared tensor is filled through the embedding rule
    if not include_tied_lm_head:
        return None
    return own_copy if own_copy is not None else chunk.shared_embedding_or_output_weight()


def _model_level(
    chunk: torch.nn.Module,
    params: dict[str, torch.Tensor],
    rule: Rule,
    spec: HFModelSpec,
    *,
    for_import: bool,
    include_tied_lm_head: bool,
) -> torch.Tensor | None:
    """The tensor of a first/last-section rule in this chunk, or None if the chunk lacks it."""
    if rule.section == "first":
        return _find(params, "", rule.megatron) if chunk.pre_process else None
    if not chunk.post_process:
        return None
    if rule.tied_to is not None and spec.tie_word_embeddings:
        return _tied_output(
            chunk, params, rule, for_import=for_import, include_tied_lm_head=include_tied_lm_head
        )
    return _find(params, "", rule.megatron)


def local_params(
    chunks: Sequence[torch.nn.Module],
    mapping: FamilyMapping,
    spec: HFModelSpec,
    *,
    for_import: bool = False,
    include_tied_lm_head: bool = False,
) -> list[ParamRef]:
    """Every mapped parameter held by this rank, sorted in global export order.

    Args:
        chunks: this rank's GPTModel chunks (wrapped in DDP / Float16Module or not).
        mapping: the family's table.
        spec: the HF config (for tied embeddings).
        for_import: list what must be filled: with tied embeddings that includes the last
            stage's own output-layer copy (PP > 1), which is read from the embedding tensor.
        include_tied_lm_head: (export) with tied embeddings, also list the output layer so it
            can be sent as ``lm_head.weight``.
    """
    refs: list[ParamRef] = []
    for chunk in map(unwrap_chunk, chunks):
        params = dict(chunk.named_parameters())
        for position, rule in enumerate(mapping.rules):
            if rule.section == "layer":
                continue
            tensor = _model_level(
                chunk, params, rule, spec, for_import=for_import, include_tied_lm_head=include_tied_lm_head
            )
            if tensor is not None:
                refs.append(ParamRef(rule, position, None, tensor))
        for local_index, layer in enumerate(chunk.decoder.layers):
            prefix = f"decoder.layers.{local_index}."
            for position, rule in enumerate(mapping.rules):
                if rule.section != "layer":
                    continue
                if not rule.expert:
                    tensor = _find(params, prefix, rule.megatron)
                    refs.append(ParamRef(rule, position, layer.layer_number - 1, tensor))
                    continue
                for j, expert in enumerate(layer.mlp.local_expert_indices):
                    tensor = _find(params, prefix, rule.megatron_name(j))
                    refs.append(ParamRef(rule, position, layer.layer_number - 1, tensor, expert))
    refs.sort(key=lambda ref: ref.key)
    return refs
