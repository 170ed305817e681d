"""Teacher contexts (``teacher.context``): the successful-rollout self-teacher picks another
verified rollout of the same prompt, renders it in the teacher template in place of the reference
solution, and keeps rollouts without one out of the loss; the rules that guard it."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import AutoTokenizer

from megaopsd.algorithm.contexts import CONTEXTS, ReferenceSolution, SuccessfulRollout, strip_thinking
from megaopsd.algorithm.methods import algorithm_class
from megaopsd.config import (
    AlgorithmConfig,
    Config,
    ConfigError,
    ModelConfig,
    RolloutConfig,
    TeacherConfig,
    TrainerConfig,
    validate,
)
from megaopsd.data.prompts import TEACHER_TEMPLATE, PromptBuilder, fill_template
from megaopsd.rollout.types import Rollout


@pytest.fixture(scope="module")
def builder(tiny_qwen3):
    return PromptBuilder(
        AutoTokenizer.from_pretrained(tiny_qwen3), max_prompt_tokens=256, max_teacher_prompt_tokens=1000
    )


def _rollouts(builder, responses: list[list[str]]) -> tuple[list, list]:
    """One prompt per inner list, one rollout per response text."""
    prompts, rollouts = [], []
    for p, texts in enumerate(responses):
        prompts.append(builder.build(f"What is {p} + {p}?", f"{p} + {p} = \\boxed{{{2 * p}}}"))
        for s, text in enumerate(texts):
            rollouts.append(
                Rollout(
                    prompt_index=p,
                    sample_index=s,
                    example_id=f"x:{p}",
                    student_prompt_ids=prompts[p].student_prompt_ids,
                    teacher_prompt_ids=prompts[p].teacher_prompt_ids,
                    response_ids=builder.tokenizer.encode(text),
                    engine_logprobs=[0.0] * len(builder.tokenizer.encode(text)),
                    finish_reason="stop",
                )
            )
    return prompts, rollouts


def _decode(builder):
    return lambda ids: builder.tokenizer.decode(ids, skip_special_tokens=True)


def test_each_rollout_reads_another_success_of_its_prompt(builder):
    prompts, rollouts = _rollouts(
        builder,
        [
            ["<think>add</think>It is \\boxed{0}.", "It is \\boxed{5}.", "Zero: \\boxed{0}."],
            ["\\boxed{3}", "\\boxed{4}"],
        ],
    )
    rewards = [1.0, 0.0, 1.0, 0.0, 0.0]
    batch = SuccessfulRollout().apply(
        rollouts, prompts, rewards, decode=_decode(builder), teacher_prompt_ids=builder.teacher_prompt_ids
    )
    # a success never teaches itself: 0 reads 2, 1 and 2 read 0; prompt 1 has no success
    source = {0: 2, 1: 0, 2: 0}
    assert batch.in_loss == [True, True, True, False, False] and batch.too_long == 0
    for i, j in source.items():
        # the teacher template of the run, the demonstration (its thinking removed) as the solution
        demo = strip_thinking(_decode(builder)(rollouts[j].response_ids))
        assert "<think>" not in demo and demo.endswith("{0}.")
        _, expected = builder.render(prompts[0].problem, demo)
        assert batch.train[i].teacher_prompt_ids == builder.tokenizer.encode(
            expected, add_special_tokens=False
        )
        assert fill_template(TEACHER_TEMPLATE, problem=prompts[0].problem, solution=demo) in expected
        assert batch.train[i].response_ids == rollouts[i].response_ids
    for i in (3, 4):  # no teacher: unchanged and out of the loss
        assert batch.train[i] is rollouts[i]


def test_a_demonstration_over_the_teacher_limit_leaves_the_rollout_out(builder):
    prompts, rollouts = _rollouts(builder, [["\\boxed{0} " + "long " * 500, "\\boxed{0}"]])
    batch = SuccessfulRollout().apply(
        rollouts, prompts, [1.0, 1.0], decode=_decode(builder), teacher_prompt_ids=builder.teacher_prompt_ids
    )
    # rollout 0 reads rollout 1 (short); rollout 1 would read rollout 0 (over 1000 tokens)
    assert batch.in_loss == [True, False] and batch.too_long == 1


def test_the_reference_solution_context_changes_nothing(builder):
    prompts, rollouts = _rollouts(builder, [["a", "b"]])
    batch = ReferenceSolution().apply(
        rollouts, prompts, None, decode=_decode(builder), teacher_prompt_ids=None
    )
    assert batch.train == rollouts and batch.in_loss == [True, True]
    assert set(CONTEXTS) == {"solution", "successful_rollout"}


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<think>a\nb</think>\n\nAnswer 3", "Answer 3"),
        ("no thinking", "no thinking"),
        ("Answer <think>cut off", "Answer"),
        ("<think>x</think>A<think>y</think>B", "AB"),
    ],
)
def test_strip_thinking(text, expected):
    assert strip_thinking(text) == expected


def _cfg(**sections) -> Config:
    base = dict(
        model=ModelConfig(hf_path="unused"),
        teacher=TeacherConfig(context="successful_rollout"),
        rollout=RolloutConfig(n=4),
        trainer=TrainerConfig(prompts_per_step=4),
    )
    return Config(**{**base, **sections})


def test_the_successful_rollout_context_needs_groups_on_each_replica():
    opsd = algorithm_class("opsd")
    opsd.check_config(_cfg(), dp_size=2)
    with pytest.raises(
        ConfigError, match=r"rollout\.n=1 leaves teacher\.context=successful_rollout no other"
    ):
        opsd.check_config(_cfg(rollout=RolloutConfig(n=1)), dp_size=1)
    with pytest.raises(
        ConfigError, match=r"prompts_per_step=3 does not split evenly over 2 .* use a multiple of 2"
    ):
        opsd.check_config(_cfg(trainer=TrainerConfig(prompts_per_step=3)), dp_size=2)


def test_the_context_is_opsds_and_excludes_reason_first(tiny_qwen3):
    model = ModelConfig(hf_path=str(tiny_qwen3))
    for name in ("grpo", "sft", "rlsd"):
        with pytest.raises(
            ConfigError,
            match=rf"teacher\.context='successful_rollout' applies to algorithm\.name=opsd or pw_opsd, not {name}",
        ):
            algorithm_class(name).check_config(_cfg(algorithm=AlgorithmConfig(name=name)), dp_size=1)
    for name in ("opsd", "pw_opsd"):
        algorithm_class(name).check_config(_cfg(algorithm=AlgorithmConfig(name=name)), dp_size=1)
    both = TeacherConfig(context="successful_rollout", reason_first=True)
    with pytest.raises(ConfigError, match=r"teacher\.reason_first=True rationalises the reference solution"):
        validate(_cfg(model=model, teacher=both), world_size=1)
    validate(dataclasses.replace(_cfg(model=model)), world_size=1)
