"""Reason-first teacher (the official ``--reason_first``): the teacher rationalises, then scores.

Before the paired step the rollout engine answers, for each prompt, a reasoning message: the
problem and the reference solution with a request to analyse and explain it
(``prompts.REASONING_TEMPLATE``, chat-templated). The teacher's sequence is then

    reasoning prompt ids + rationalisation ids + transition ids + student response ids

where the transition (``prompts.REASON_FIRST_TRANSITION``, raw text outside any chat template)
leads into the student's response, as in the official trainer. The rationalisation keeps its
stop token, as the official one does. The three parts are kept for the text log.

The engine holds the student's current weights, so the rationalisation comes from the live
policy (the official vLLM path does the same). ``cache="per_example"`` keeps each example's
first rationalisation for the rest of the run; ``"regenerate"`` (the official behaviour) draws
a fresh one every time the example is used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from megaopsd.data.prompts import (
    REASON_FIRST_TRANSITION,
    REASONING_TEMPLATE,
    PromptPair,
    encode_rendered,
    fill_template,
    render_user_prompt,
)
from megaopsd.rollout.engine import RolloutEngine
from megaopsd.rollout.types import SamplingSettings

# Added to the rollout seed so rationalisation requests never reuse the student's request seeds.
SEED_OFFSET = 7919


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReasonFirstParts:
    """The teacher prefix of one prompt, in its three parts (ids and text)."""

    reasoning_prompt_ids: list[int]
    rationale_ids: list[int]
    transition_ids: list[int]
    reasoning_prompt_text: str
    rationale_text: str
    transition_text: str

    @property
    def teacher_prompt_ids(self) -> list[int]:
        return self.reasoning_prompt_ids + self.rationale_ids + self.transition_ids


class ReasonFirst:
    """Builds reason-first teacher prompts with a rollout engine, caching per example if asked.

    Args:
        tokenizer: the Hugging Face tokenizer (chat template) of the model.
        sampling: how the rationalisation is sampled (its own length limit and settings).
        cache: ``regenerate`` or ``per_example``.
    """

    def __init__(self, tokenizer: Any, sampling: SamplingSettings, *, cache: str = "regenerate") -> None:
        if cache not in ("regenerate", "per_example"):
            raise ValueError(f"reason-first cache={cache!r} is unknown; use regenerate or per_example")
        self.tokenizer, self.sampling, self.cache = tokenizer, sampling, cache
        self.transition_ids = encode_rendered(tokenizer, REASON_FIRST_TRANSITION)
        self._cached: dict[str, ReasonFirstParts] = {}
        self.last: list[ReasonFirstParts] = []  # this step's parts, for the text log

    def reasoning_prompt(self, pair: PromptPair) -> tuple[str, list[int]]:
        """The chat-templated reasoning message (thinking left to the template's default, as upstream)."""
        message = fill_template(REASONING_TEMPLATE, problem=pair.problem, solution=pair.solution)
        text = render_user_prompt(self.tokenizer, message, enable_thinking=True)
        return text, encode_rendered(self.tokenizer, text)

    def apply(self, engine: RolloutEngine, prompts: Sequence[PromptPair], *, step: int) -> list[PromptPair]:
        """``prompts`` with each teacher prompt replaced by reasoning prompt + rationale + transition."""
        todo = [
            i for i, p in enumerate(prompts) if self.cache == "regenerate" or p.example_id not in self._cached
        ]
        parts: dict[int, ReasonFirstParts] = {}
        if todo:
            rendered = [self.reasoning_prompt(prompts[i]) for i in todo]
            completions = engine.generate([ids for _, ids in rendered], self.sampling, step=step)
            for i, (text, ids), samples in zip(todo, rendered, completions, strict=True):
                rationale = list(samples[0].response_ids)
                parts[i] = ReasonFirstParts(
                    reasoning_prompt_ids=ids,
                    rationale_ids=rationale,
                    transition_ids=list(self.transition_ids),
                    reasoning_prompt_text=text,
                    rationale_text=self.tokenizer.decode(rationale),
                    transition_text=REASON_FIRST_TRANSITION,
                )
                if self.cache == "per_example":
                    self._cached[prompts[i].example_id] = parts[i]
        self.last = [parts.get(i) or self._cached[p.example_id] for i, p in enumerate(prompts)]
        return [
            dataclasses.replace(
                pair,
                teacher_prompt_ids=part.teacher_prompt_ids,
                teacher_prompt_text=part.reasoning_prompt_text + part.rationale_text + part.transition_text,
            )
            for pair, part in zip(prompts, self.last, strict=True)
        ]

    def text_sample(self) -> str:
        """The first prompt's three parts as markdown, for TensorBoard's text tab."""
        if not self.last:
            return ""
        p = self.last[0]
        return (
            f"**reasoning prompt** ({len(p.reasoning_prompt_ids)} tokens)\n\n{p.reasoning_prompt_text}\n\n"
            f"**rationalisation** ({len(p.rationale_ids)} tokens)\n\n{p.rationale_text}\n\n"
            f"**transition** ({len(p.transition_ids)} tokens)\n\n{p.transition_text}"
        )


def reason_first_sampling(teacher_cfg: Any, rollout_cfg: Any) -> SamplingSettings:
    """The rationalisation's sampling: ``teacher.reason_*`` where set, else the rollout's."""

    def pick(value: Any, fallback: Any) -> Any:
        return fallback if value is None else value

    return SamplingSettings(
        temperature=pick(teacher_cfg.reason_temperature, rollout_cfg.temperature),
        top_p=pick(teacher_cfg.reason_top_p, rollout_cfg.top_p),
        top_k=pick(teacher_cfg.reason_top_k, rollout_cfg.top_k),
        n=1,
        max_new_tokens=teacher_cfg.reason_max_new_tokens,
        seed=rollout_cfg.seed + SEED_OFFSET,
    )
