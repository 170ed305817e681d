"""The rollout-engine interface the trainer talks to, and prompts -> rollouts.

An engine turns token-id prompts into ``Completion``s and takes new weights; the trainer never
sees vLLM objects. ``generate_rollouts`` pairs each completion with its prompt pair, so the
student ids the engine saw and the teacher ids travel together in one ``Rollout``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from megaopsd.rollout.types import Completion, Rollout, SamplingSettings

if TYPE_CHECKING:
    import torch

    from megaopsd.data.prompts import PromptPair
    from megaopsd.rollout.weight_sync import WeightSyncStats


class RolloutEngine(Protocol):
    """What the trainer needs from a generation engine."""

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        sampling: SamplingSettings,
        *,
        step: int = 0,
        first_prompt_index: int = 0,
        progress: Callable[..., Any] | None = None,
    ) -> list[list[Completion]]:
        """``sampling.n`` completions per prompt, in prompt order.

        ``step`` and ``first_prompt_index + i`` (the prompt's global index) derive each prompt's
        seed, so results do not depend on how prompts are split into calls or engines.
        ``progress``: a tqdm-like constructor for progress per finished sample (long
        evaluations); engines that cannot report may ignore it.
        """
        ...

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> WeightSyncStats:
        """Load ``(hf_name, full_tensor)`` pairs (fused members adjacent) and drop stale caches."""
        ...

    def sleep(self, level: int) -> None:
        """Free GPU memory while the trainer trains: the KV cache (1), the weights too (2).

        A no-op where the engine cannot sleep (CPU).
        """
        ...

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Take back what ``sleep`` freed: ``["weights"]``, ``["kv_cache"]`` or everything (None)."""
        ...

    def close(self) -> None:
        """Release the engine (processes, memory)."""
        ...


def generate_rollouts(
    engine: RolloutEngine,
    prompts: Sequence[PromptPair],
    sampling: SamplingSettings,
    *,
    step: int = 0,
    first_prompt_index: int = 0,
) -> list[Rollout]:
    """Sample ``sampling.n`` responses for each prompt pair's student prompt.

    Returns:
        Rollouts ordered prompt-major (all samples of prompt 0, then prompt 1, ...); their
        ``prompt_index`` is global (``first_prompt_index`` + position in ``prompts``).
    """
    completions = engine.generate(
        [pair.student_prompt_ids for pair in prompts],
        sampling,
        step=step,
        first_prompt_index=first_prompt_index,
    )
    rollouts = []
    for offset, (pair, samples) in enumerate(zip(prompts, completions, strict=True)):
        for sample_index, completion in enumerate(samples):
            rollouts.append(
                Rollout(
                    prompt_index=first_prompt_index + offset,
                    sample_index=sample_index,
                    example_id=pair.example_id,
                    student_prompt_ids=pair.student_prompt_ids,
                    teacher_prompt_ids=pair.teacher_prompt_ids,
                    response_ids=completion.response_ids,
                    engine_logprobs=completion.engine_logprobs,
                    finish_reason=completion.finish_reason,
                )
            )
    return rollouts
