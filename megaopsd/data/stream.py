"""The trainer's prompt source: dataset order + prompt building, one resumable object.

``PromptStream.next_prompts(k)`` returns the next ``k`` prompt pairs, skipping (and counting)
examples whose prompts are over the length limit. Skipping is a pure function of the example
and the tokenizer, so restoring the dataset position is enough for a resumed run to get the
same prompts as an uninterrupted one.

    stream = build_prompt_stream(cfg.data, tokenizer)
    pairs = stream.next_prompts(cfg.trainer.prompts_per_step)
"""

from __future__ import annotations

import collections
from typing import Any

from megaopsd.config import DataConfig
from megaopsd.data.dataset import DataError, ProblemDataset, load_examples
from megaopsd.data.prompts import PromptBuilder, PromptPair, PromptTemplates


class PromptStream:
    """Prompt pairs in dataset order, over epochs, with skip counts.

    Args:
        dataset: the examples and their position.
        builder: renders and tokenises prompts and enforces the length limits.
        load_skipped: rows dropped while loading, ``{reason: count}``, reported with the rest.
        unreadable: one line per source file skipped whole (``path: why``), for the console.
    """

    def __init__(
        self,
        dataset: ProblemDataset,
        builder: PromptBuilder,
        *,
        load_skipped: dict[str, int] | None = None,
        unreadable: list[str] | None = None,
    ):
        self.dataset = dataset
        self.builder = builder
        self.load_skipped = dict(load_skipped or {})
        self.unreadable = list(unreadable or [])

    def next_prompts(self, count: int) -> list[PromptPair]:
        """The next ``count`` prompt pairs.

        Raises:
            DataError: a whole epoch's worth of examples in a row was too long.
        """
        pairs: list[PromptPair] = []
        misses = 0
        while len(pairs) < count:
            example = self.dataset.next_example()
            pair = self.builder.build(example.problem, example.solution, example_id=example.example_id)
            if pair is None:
                misses += 1
                if misses >= len(self.dataset):
                    raise DataError(
                        f"every example's prompt is longer than the limit ({self.builder.max_prompt_tokens} "
                        f"student / {self.builder.max_teacher_prompt_tokens} teacher tokens); raise "
                        "data.max_prompt_tokens"
                    )
                continue
            misses = 0
            pairs.append(pair)
        return pairs

    def skipped(self) -> dict[str, int]:
        """Rows skipped at load time plus prompts skipped for length so far, per reason."""
        total = collections.Counter(self.load_skipped)
        total.update(self.builder.skipped)
        return dict(sorted(total.items()))

    def state_dict(self) -> dict[str, Any]:
        """The dataset position and the length-skip counters."""
        return {"dataset": self.dataset.state_dict(), "length_skipped": dict(self.builder.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved."""
        self.dataset.load_state_dict(state["dataset"])
        self.builder.skipped = collections.Counter(state.get("length_skipped", {}))


def build_prompt_stream(
    cfg: DataConfig,
    tokenizer: Any,
    *,
    templates: PromptTemplates | None = None,
    max_teacher_prompt_tokens: int | None = None,
    shuffle: bool = True,
) -> PromptStream:
    """Load ``cfg.train_files`` and wrap them in a ``PromptStream``.

    Args:
        cfg: files, column names, shuffle seed, strictness and the prompt length limit.
        tokenizer: the model's Hugging Face tokenizer (chat template included).
        templates: prompt wording and thinking switches (default: the OPSD wording).
        max_teacher_prompt_tokens: teacher prompt limit; ``None`` uses ``cfg.max_prompt_tokens``.
        shuffle: shuffle each epoch with ``cfg.shuffle_seed``.
    """
    loaded = load_examples(
        cfg.train_files,
        problem_key=cfg.problem_key,
        solution_key=cfg.solution_key,
        strict=cfg.strict,
        max_row_bytes=cfg.max_row_bytes,
    )
    dataset = ProblemDataset(loaded.examples, shuffle=shuffle, shuffle_seed=cfg.shuffle_seed)
    builder = PromptBuilder(
        tokenizer,
        templates=templates,
        max_prompt_tokens=cfg.max_prompt_tokens,
        max_teacher_prompt_tokens=max_teacher_prompt_tokens,
    )
    return PromptStream(dataset, builder, load_skipped=loaded.skipped, unreadable=loaded.unreadable)
