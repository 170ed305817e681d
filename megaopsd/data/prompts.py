"""OPSD prompt templates: the student sees the problem, the teacher also sees a reference solution.

Both prompts are one user message rendered with the tokenizer's chat template
(``add_generation_prompt=True``), each with its own ``enable_thinking`` switch, and tokenised
exactly once here. The student ids built here are the ids vLLM generates from and the ids the
trainer scores: nothing downstream decodes and re-tokenises a prompt (a text round trip can
merge or split tokens at the prompt/response boundary).

Templates are plain strings with two fields, ``{problem}`` and ``{solution}``, substituted in
one pass. Every other character is literal, so ``\\boxed{}`` needs no brace escaping and a
problem that happens to contain the text ``{solution}`` is not expanded again.

Wording comes in named styles (``data.prompt_style``), each pinned character for character by
tests/unit/test_prompts.py:

- ``opsd`` (default): the current official OPSD code's math prompts (siyan-zhao/OPSD
  ``data_collator.py`` at commit c181e5bff7b94edef58cc64b4c0ba3a4d9e0d0dd): both messages start
  with ``Problem:``; the teacher sees the reference solution between begin/end markers and a
  transition that tells it not to copy or paraphrase the solution but to reason independently.
- ``opsd_first_release``: the wording of the first public release (the teacher message starts
  with the bare problem and has a shorter transition), what megaopsd shipped before.

The reason-first strings (``REASONING_TEMPLATE``, ``REASON_FIRST_TRANSITION``) are the same
commit's. These strings are protocol, copied verbatim (the em dash is written as an escape so
the source stays ASCII). The official README notes that its first reported runs fed the student
prompt without the chat template; here both prompts go through it, as at evaluation.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

STUDENT_TEMPLATE = "Problem: {problem}\n\n" + INSTRUCTION

# ---- style "opsd": the current official wording
TEACHER_TRANSITION = (
    "\n\nAfter reading the reference solution above, make sure you truly understand "
    "the reasoning behind each step \u2014 do not copy or paraphrase it. Now, using your "
    "own words and independent reasoning, derive the same final answer to the problem above. "
    "Think step by step, explore different approaches, and don't be afraid to backtrack "
    "or reconsider if something doesn't work out:\n"
)

TEACHER_TEMPLATE = (
    "Problem: {problem}\n\n"
    "Here is a reference solution to this problem:\n"
    "=== Reference Solution Begin ===\n{solution}\n=== Reference Solution End ===\n"
    + TEACHER_TRANSITION
    + "\n"
    + INSTRUCTION
)

# Reason-first: the teacher first writes a rationalisation of the solution from this message,
# then the transition (raw text, no chat template) leads into the student's response.
REASON_FIRST_PROMPT = (
    "\n\nThe reference reasoning above arrives at the correct answer. "
    "Please analyze this solution and explain the key reasoning steps and problem-solving strategies employed. "
    "Do NOT use <think> tags. Do NOT derive your own solution. "
    "Simply analyze and explain the reference solution provided above.\n"
)

REASONING_TEMPLATE = (
    "Problem: {problem}\n\n"
    "Here is a correct reasoning to this problem:"
    "=== Reference Reasoning Start ===\n"
    "{solution}\n"
    "=== Reference Reasoning End ===\n\n" + REASON_FIRST_PROMPT
)

REASON_FIRST_TRANSITION = "\n" + TEACHER_TRANSITION + "\n" + INSTRUCTION

# ---- style "opsd_first_release": the wording of the first public release
FIRST_RELEASE_TEACHER_TRANSITION = (
    "After understanding the reference solution and the rationale behind each step, now articulate "
    "your own step-by-step reasoning that derives the same final answer to the problem below:"
)

FIRST_RELEASE_TEACHER_TEMPLATE = (
    "{problem}\n\nHere is a reference solution to this problem:\n{solution}\n\n\n"
    + FIRST_RELEASE_TEACHER_TRANSITION
    + "\n\n"
    + INSTRUCTION
)

# ---- style "compact" (not official): the same student message, a teacher message without the
# long transition. For small models where every prompt token is compute (the learning experiment's
# char-level model: the official teacher message is ~600 characters, the problem ~15).
COMPACT_TEACHER_TEMPLATE = "Problem: {problem}\n\nReference solution:\n{solution}\n\n" + INSTRUCTION

# ---- style "minimal" (not official): the bare problem for the student, the problem and the
# solution for the teacher, no instruction. For char-level toy models trained from scratch, where
# the 72-character instruction would be two thirds of every prompt's compute and teaches nothing.
MINIMAL_STUDENT_TEMPLATE = "{problem}"
MINIMAL_TEACHER_TEMPLATE = "{problem}\nReference solution:\n{solution}"

# name -> (student template, teacher template); data.prompt_style picks one.
PROMPT_STYLES = {
    "opsd": (STUDENT_TEMPLATE, TEACHER_TEMPLATE),
    "opsd_first_release": (STUDENT_TEMPLATE, FIRST_RELEASE_TEACHER_TEMPLATE),
    "compact": (STUDENT_TEMPLATE, COMPACT_TEACHER_TEMPLATE),
    "minimal": (MINIMAL_STUDENT_TEMPLATE, MINIMAL_TEACHER_TEMPLATE),
}

# What data.teacher_think_prefix appends to the rendered teacher prompt (Qwen3 / R1-style tags).
THINK_OPEN = "<think>\n"
THINK_CLOSED = "<think>\n\n</think>\n\n"
THINK_PREFIXES = {"none": "", "open": THINK_OPEN, "closed": THINK_CLOSED}

_FIELD = re.compile(r"\{(problem|solution)\}")

SKIP_STUDENT_TOO_LONG = "student_prompt_too_long"
SKIP_TEACHER_TOO_LONG = "teacher_prompt_too_long"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptTemplates:
    """The two user messages and their thinking switches.

    Attributes:
        student: template with ``{problem}`` and without ``{solution}`` (that would leak it).
        teacher: template with ``{problem}`` and ``{solution}``.
        student_enable_thinking: passed to the chat template as ``enable_thinking`` for the student.
        teacher_enable_thinking: the same for the teacher.
        teacher_think_prefix: ``none``, ``open`` (append ``<think>\\n``: the teacher scores the
            response from inside a think block) or ``closed`` (append an empty think block: the
            teacher scores it as a non-thinking answer) to the rendered teacher prompt; a
            fix for a teacher whose first response token disagrees with the student's because
            of think-tag handling (docs/prompts.md).
    """

    student: str = STUDENT_TEMPLATE
    teacher: str = TEACHER_TEMPLATE
    student_enable_thinking: bool = True
    teacher_enable_thinking: bool = True
    teacher_think_prefix: str = "none"

    @classmethod
    def from_style(cls, style: str, **switches: Any) -> PromptTemplates:
        """The templates of a named style (``PROMPT_STYLES``) with the given thinking switches."""
        if style not in PROMPT_STYLES:
            raise ValueError(f"prompt style {style!r} is unknown; use one of {', '.join(PROMPT_STYLES)}")
        student, teacher = PROMPT_STYLES[style]
        return cls(student=student, teacher=teacher, **switches)

    def __post_init__(self) -> None:
        if "{problem}" not in self.student:
            raise ValueError("student prompt template must contain {problem}")
        if "{solution}" in self.student:
            raise ValueError("student prompt template must not contain {solution}: the student never sees it")
        for field in ("{problem}", "{solution}"):
            if field not in self.teacher:
                raise ValueError(f"teacher prompt template must contain {field}")
        if self.teacher_think_prefix not in THINK_PREFIXES:
            raise ValueError(
                f"teacher_think_prefix={self.teacher_think_prefix!r} is unknown; use one of {', '.join(THINK_PREFIXES)}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptPair:
    """One problem's student and teacher prompts, rendered and tokenised once.

    Attributes:
        example_id: where the example came from (``file:line`` or ``dataset[row]``), for logs.
        problem: the problem text.
        solution: the reference solution text (privileged information for the teacher).
        student_prompt_text: the chat-templated student prompt.
        teacher_prompt_text: the chat-templated teacher prompt.
        student_prompt_ids: token ids of ``student_prompt_text``; vLLM and the trainer use these.
        teacher_prompt_ids: token ids of ``teacher_prompt_text``; the trainer's teacher stream.
    """

    example_id: str
    problem: str
    solution: str
    student_prompt_text: str
    teacher_prompt_text: str
    student_prompt_ids: list[int]
    teacher_prompt_ids: list[int]


def fill_template(template: str, *, problem: str, solution: str = "") -> str:
    """Substitute ``{problem}`` and ``{solution}`` in one pass; all other text is literal."""
    values = {"problem": problem, "solution": solution}
    return _FIELD.sub(lambda match: values[match.group(1)], template)


def render_user_prompt(tokenizer: Any, message: str, *, enable_thinking: bool) -> str:
    """One user message through the tokenizer's chat template, ending with the assistant header."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": message}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=enable_thinking,
    )


def append_think_prefix(rendered: str, prefix: str) -> str:
    """``rendered`` + the think text ``prefix`` names, unless the template already ended with it."""
    text = THINK_PREFIXES[prefix]
    return rendered if rendered.endswith(text) else rendered + text


def encode_rendered(tokenizer: Any, text: str) -> list[int]:
    """Token ids of an already chat-templated string.

    ``add_special_tokens=False`` because the chat template already wrote every special token
    (a Llama template's ``<|begin_of_text|>`` would otherwise appear twice).
    """
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class PromptBuilder:
    """Builds ``PromptPair``s and counts the ones skipped for length.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        templates: the prompt wording and thinking switches.
        max_prompt_tokens: longest allowed student prompt (and teacher prompt unless
            ``max_teacher_prompt_tokens`` is given); longer examples are skipped and counted.
        max_teacher_prompt_tokens: a separate limit for the teacher prompt, which carries the
            solution and is usually much longer; ``None`` uses ``max_prompt_tokens``.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        templates: PromptTemplates | None = None,
        max_prompt_tokens: int = 2048,
        max_teacher_prompt_tokens: int | None = None,
    ) -> None:
        if max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
        self.tokenizer = tokenizer
        self.templates = templates or PromptTemplates()
        self.max_prompt_tokens = max_prompt_tokens
        self.max_teacher_prompt_tokens = max_teacher_prompt_tokens or max_prompt_tokens
        self.skipped: collections.Counter[str] = collections.Counter()

    def render(self, problem: str, solution: str) -> tuple[str, str]:
        """The chat-templated student and teacher prompt strings."""
        t = self.templates
        student = render_user_prompt(
            self.tokenizer,
            fill_template(t.student, problem=problem),
            enable_thinking=t.student_enable_thinking,
        )
        return student, self.render_teacher(problem, solution)

    def render_teacher(self, problem: str, solution: str) -> str:
        """The chat-templated teacher prompt string."""
        t = self.templates
        teacher = render_user_prompt(
            self.tokenizer,
            fill_template(t.teacher, problem=problem, solution=solution),
            enable_thinking=t.teacher_enable_thinking,
        )
        return append_think_prefix(teacher, t.teacher_think_prefix)

    def teacher_prompt_ids(self, problem: str, solution: str) -> list[int] | None:
        """The teacher prompt's ids with ``solution`` as its privileged text (a teacher context
        other than the dataset's solution); None when over the teacher prompt limit."""
        ids = encode_rendered(self.tokenizer, self.render_teacher(problem, solution))
        return ids if len(ids) <= self.max_teacher_prompt_tokens else None

    def build(self, problem: str, solution: str, *, example_id: str = "") -> PromptPair | None:
        """Render and tokenise one example.

        Returns:
            The prompt pair, or ``None`` when a prompt is over its limit (counted in ``skipped``
            under ``student_prompt_too_long`` or ``teacher_prompt_too_long``).
        """
        student_text, teacher_text = self.render(problem, solution)
        student_ids = encode_rendered(self.tokenizer, student_text)
        if len(student_ids) > self.max_prompt_tokens:
            self.skipped[SKIP_STUDENT_TOO_LONG] += 1
            return None
        teacher_ids = encode_rendered(self.tokenizer, teacher_text)
        if len(teacher_ids) > self.max_teacher_prompt_tokens:
            self.skipped[SKIP_TEACHER_TOO_LONG] += 1
            return None
        return PromptPair(
            example_id=example_id,
            problem=problem,
            solution=solution,
            student_prompt_text=student_text,
            teacher_prompt_text=teacher_text,
            student_prompt_ids=student_ids,
            teacher_prompt_ids=teacher_ids,
        )
