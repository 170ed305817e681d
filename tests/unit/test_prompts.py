"""OPSD prompts: exact rendering with the tiny ChatML template, ids built once, length skips."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from megaopsd.data.dataset import DataError, ProblemDataset, ProblemExample
from megaopsd.data.prompts import PromptBuilder, PromptTemplates, fill_template
from megaopsd.data.stream import PromptStream

PROBLEM = "What is 2 + 3?"
SOLUTION = "2 + 3 = 5. The answer is \\boxed{5}."
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
HEADER = "<|im_start|>user\n"
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"
NO_THINK = "<think>\n\n</think>\n\n"

STUDENT_MESSAGE = f"Problem: {PROBLEM}\n\n{INSTRUCTION}"
# The current official OPSD teacher message (siyan-zhao/OPSD data_collator.py at c181e5b), by hand.
TEACHER_MESSAGE = (
    f"Problem: {PROBLEM}\n\nHere is a reference solution to this problem:\n"
    f"=== Reference Solution Begin ===\n{SOLUTION}\n=== Reference Solution End ===\n\n\n"
    "After reading the reference solution above, make sure you truly understand the reasoning behind each "
    "step \u2014 do not copy or paraphrase it. Now, using your own words and independent reasoning, derive "
    "the same final answer to the problem above. Think step by step, explore different approaches, and "
    "don't be afraid to backtrack or reconsider if something doesn't work out:\n\n"
    f"{INSTRUCTION}"
)
# The first public release's teacher message (prompt_style=opsd_first_release), by hand.
FIRST_RELEASE_TEACHER_MESSAGE = (
    f"{PROBLEM}\n\nHere is a reference solution to this problem:\n{SOLUTION}\n\n\n"
    "After understanding the reference solution and the rationale behind each step, now articulate your "
    "own step-by-step reasoning that derives the same final answer to the problem below:\n\n"
    f"{INSTRUCTION}"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3):
    return AutoTokenizer.from_pretrained(tiny_qwen3)


@pytest.mark.parametrize("thinking", [True, False])
def test_prompts_render_to_the_exact_strings(tokenizer, thinking):
    templates = PromptTemplates(student_enable_thinking=thinking, teacher_enable_thinking=thinking)
    pair = PromptBuilder(tokenizer, templates=templates).build(PROBLEM, SOLUTION, example_id="x:1")
    tail = "" if thinking else NO_THINK
    assert pair.student_prompt_text == HEADER + STUDENT_MESSAGE + ASSISTANT + tail
    assert pair.teacher_prompt_text == HEADER + TEACHER_MESSAGE + ASSISTANT + tail
    assert (pair.example_id, pair.problem, pair.solution) == ("x:1", PROBLEM, SOLUTION)


def test_first_release_style_renders_its_own_teacher_message(tokenizer):
    templates = PromptTemplates.from_style("opsd_first_release")
    pair = PromptBuilder(tokenizer, templates=templates).build(PROBLEM, SOLUTION)
    assert pair.student_prompt_text == HEADER + STUDENT_MESSAGE + ASSISTANT
    assert pair.teacher_prompt_text == HEADER + FIRST_RELEASE_TEACHER_MESSAGE + ASSISTANT
    assert PromptTemplates.from_style("opsd") == PromptTemplates()
    with pytest.raises(ValueError, match="prompt style 'v3' is unknown"):
        PromptTemplates.from_style("v3")


@pytest.mark.parametrize(
    ("prefix", "thinking", "tail"),
    [
        ("none", True, ""),
        ("open", True, "<think>\n"),
        ("closed", True, NO_THINK),
        ("closed", False, NO_THINK),  # the template already closed it: not doubled
        ("open", False, NO_THINK + "<think>\n"),
    ],
)
def test_teacher_think_prefix(tokenizer, prefix, thinking, tail):
    templates = PromptTemplates(teacher_enable_thinking=thinking, teacher_think_prefix=prefix)
    pair = PromptBuilder(tokenizer, templates=templates).build(PROBLEM, SOLUTION)
    assert pair.teacher_prompt_text == HEADER + TEACHER_MESSAGE + ASSISTANT + tail
    assert pair.student_prompt_text == HEADER + STUDENT_MESSAGE + ASSISTANT
    with pytest.raises(ValueError, match="teacher_think_prefix='half'"):
        PromptTemplates(teacher_think_prefix="half")


def test_separate_thinking_switches(tokenizer):
    templates = PromptTemplates(student_enable_thinking=False, teacher_enable_thinking=True)
    pair = PromptBuilder(tokenizer, templates=templates).build(PROBLEM, SOLUTION)
    assert pair.student_prompt_text.endswith(ASSISTANT + NO_THINK)
    assert pair.teacher_prompt_text.endswith(ASSISTANT)


def test_ids_equal_tokenizing_the_rendered_string(tokenizer):
    pair = PromptBuilder(tokenizer).build(PROBLEM, SOLUTION)
    for text, ids in (
        (pair.student_prompt_text, pair.student_prompt_ids),
        (pair.teacher_prompt_text, pair.teacher_prompt_ids),
    ):
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    # one user turn + the assistant header: exactly two <|im_start|>, the first at position 0
    assert pair.student_prompt_ids[0] == im_start
    assert pair.student_prompt_ids.count(im_start) == 2
    assert len(pair.teacher_prompt_ids) > len(pair.student_prompt_ids) + 20


def test_custom_templates_are_literal_except_the_two_fields():
    templates = PromptTemplates(student="Q: {problem} -> \\boxed{}", teacher="{problem} | {solution} {x}")
    assert fill_template(templates.student, problem="a {solution} b") == "Q: a {solution} b -> \\boxed{}"
    assert fill_template(templates.teacher, problem="p", solution="{problem}") == "p | {problem} {x}"
    with pytest.raises(ValueError, match="must not contain"):
        PromptTemplates(student="{problem} {solution}")
    with pytest.raises(ValueError, match="teacher prompt template must contain"):
        PromptTemplates(teacher="{problem} only")


def test_over_long_prompts_are_skipped_and_counted(tokenizer):
    pair = PromptBuilder(tokenizer).build(PROBLEM, SOLUTION)
    n_student, n_teacher = len(pair.student_prompt_ids), len(pair.teacher_prompt_ids)

    exact = PromptBuilder(tokenizer, max_prompt_tokens=n_teacher)  # both fit exactly
    assert exact.build(PROBLEM, SOLUTION) is not None
    assert sum(exact.skipped.values()) == 0

    builder = PromptBuilder(tokenizer, max_prompt_tokens=n_student, max_teacher_prompt_tokens=n_teacher - 1)
    assert builder.build(PROBLEM, SOLUTION) is None
    assert builder.build(PROBLEM + " Be quick.", SOLUTION) is None
    assert dict(builder.skipped) == {"teacher_prompt_too_long": 1, "student_prompt_too_long": 1}


def test_stream_skips_long_examples_and_fails_when_all_are_long(tokenizer):
    examples = [
        ProblemExample(example_id=f"f:{i}", problem=p, solution=SOLUTION)
        for i, p in enumerate(["1 + 1?", "word " * 400, "2 + 2?"], start=1)
    ]
    stream = PromptStream(
        ProblemDataset(examples, shuffle=False),
        PromptBuilder(tokenizer, max_prompt_tokens=200, max_teacher_prompt_tokens=2000),
        load_skipped={"empty_problem": 2},
    )
    pairs = stream.next_prompts(3)
    assert [p.example_id for p in pairs] == ["f:1", "f:3", "f:1"]
    assert stream.skipped() == {"empty_problem": 2, "student_prompt_too_long": 1}
    assert stream.state_dict()["dataset"]["epoch"] == 1

    only_long = PromptStream(
        ProblemDataset(examples[1:2]),
        PromptBuilder(tokenizer, max_prompt_tokens=200, max_teacher_prompt_tokens=2000),
    )
    with pytest.raises(DataError, match="max_prompt_tokens"):
        only_long.next_prompts(1)


def test_minimal_style_is_the_bare_problem_and_solution():
    templates = PromptTemplates.from_style("minimal")
    assert fill_template(templates.student, problem="1+2") == "1+2"
    assert fill_template(templates.teacher, problem="1+2", solution="1+2=3\n\\boxed{3}") == (
        "1+2\nReference solution:\n1+2=3\n\\boxed{3}"
    )


def test_compact_style_keeps_the_student_message():
    templates = PromptTemplates.from_style("compact")
    assert templates.student == PromptTemplates.from_style("opsd").student
    assert fill_template(templates.teacher, problem="1+2", solution="1+2=3\n\\boxed{3}") == (
        "Problem: 1+2\n\nReference solution:\n1+2=3\n\\boxed{3}\n\n"
        "Please reason step by step, and put your final answer within \\boxed{}."
    )
