"""The thinking boundary: first-token divergence and teacher think-tag top-1, and the fix options.

.venv/bin/python -m pytest tests/unit/test_boundary.py -q
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megaopsd.algorithm.batch import build_microbatch
from megaopsd.algorithm.loss import make_loss_fn
from megaopsd.config import LossConfig
from megaopsd.data.prompts import PromptBuilder, PromptTemplates
from megaopsd.loss.boundary import first_token_mask, first_token_sums, think_token_ids
from tests.unit.test_loss import V, W, make_inputs

PROBLEM = "What is 2 + 3?"
SOLUTION = "2 + 3 = 5. The answer is \\boxed{5}."


def test_first_token_mask_marks_each_response_start():
    sample = torch.tensor([0, 0, 0, 3, 3, 1, 2, 2])
    assert first_token_mask(sample).tolist() == [True, False, False, True, False, True, True, False]


@pytest.mark.parametrize("kind", ["jsd", "topk_tail", "pg"])
def test_first_token_sums_match_a_direct_computation(kind):
    student, teacher, _, sampled = make_inputs(seed=31)
    first = torch.zeros(student.shape[0], dtype=torch.bool)
    first[[0, 4, 9, 20, 30]] = True
    teacher[[0, 9], 7] = 100.0  # teacher top-1 = id 7 on two of the five first tokens
    sums = first_token_sums(
        student,
        teacher,
        first,
        sampled,
        kind=kind,
        beta=0.5,
        temperature=1.0,
        top_k=5,
        vocab_size=V,
        tp_group=None,
        think_ids=[7, 8],
    )
    ls = torch.log_softmax(student[first, :V], -1)
    lt = torch.log_softmax(teacher[first, :V], -1)
    if kind == "pg":
        y = sampled[first][:, None]
        want = (ls.gather(1, y) - lt.gather(1, y)).sum()
    elif kind == "jsd":
        lm = torch.logsumexp(torch.stack([ls, lt]), 0) - torch.log(torch.tensor(2.0, dtype=ls.dtype))
        want = 0.5 * (lt.exp() * (lt - lm)).sum() + 0.5 * (ls.exp() * (ls - lm)).sum()
    else:
        want = None  # the top-k divergence itself is tested in test_loss; here only the plumbing
    if want is not None:
        assert sums["first_token_divergence_sum"].item() == pytest.approx(want.item(), rel=1e-9)
    assert sums["first_token_count"].item() == 5.0
    assert sums["first_token_teacher_think_sum"].item() == 2.0
    assert student.shape[1] == W  # padding columns present and ignored


@dataclasses.dataclass
class _Pair:  # the three id lists a paired microbatch needs (what a Rollout carries)
    student_prompt_ids: list[int]
    teacher_prompt_ids: list[int]
    response_ids: list[int]


def _first_token_metrics(model, tokenizer, templates: PromptTemplates, response: list[int]) -> dict:
    """Real tiny-model logits through the trainer's microbatch and loss: the boundary sums."""
    pair = PromptBuilder(tokenizer, templates=templates).build(PROBLEM, SOLUTION)
    rollout = _Pair(pair.student_prompt_ids, pair.teacher_prompt_ids, response)
    mb = build_microbatch([rollout], [0], pad_id=0)
    with torch.no_grad():
        s_logits = model(mb.student_tokens_BL).logits.reshape(-1, model.config.vocab_size)
        t_logits = model(mb.teacher_tokens_BL).logits.reshape(-1, model.config.vocab_size)
    student_NV, teacher_NV = s_logits[mb.student_index_T], t_logits[mb.teacher_index_T]
    loss_fn = make_loss_fn(
        LossConfig(kind="forward_kl", beta=0.0),
        vocab_size=len(tokenizer),
        tp_group=None,
        think_token_ids=think_token_ids(tokenizer),
    )
    _, sums = loss_fn(
        student_NV, teacher_NV, mb.loss_mask_T, mb.target_ids_T, first_N=first_token_mask(mb.sample_T)
    )
    top1 = teacher_NV[0, : len(tokenizer)].argmax().item()
    return {k: v.item() for k, v in sums.items()} | {
        "teacher_top1": top1,
        "teacher_prompt": pair.teacher_prompt_text,
    }


def test_think_prefix_changes_the_first_token_divergence(tiny_qwen3):
    # Qwen3's chat template: enable_thinking=False writes an empty <think></think> block. The
    # student answers without thinking; the teacher (thinking on) would open a think block.
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3)
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()
    assert think_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>")]
    response = tokenizer("The answer is \\boxed{5}.", add_special_tokens=False)["input_ids"]
    plain, closed = (
        _first_token_metrics(
            model,
            tokenizer,
            PromptTemplates(
                student_enable_thinking=False, teacher_enable_thinking=True, teacher_think_prefix=p
            ),
            response,
        )
        for p in ("none", "closed")
    )
    assert plain["teacher_prompt"].endswith("<|im_start|>assistant\n")
    assert closed["teacher_prompt"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert plain["first_token_count"] == closed["first_token_count"] == 1.0
    for m in (plain, closed):
        think = float(m["teacher_top1"] in think_token_ids(tokenizer))
        assert m["first_token_teacher_think_sum"] == think
    # Same response, same student: only the teacher's boundary moved, and with it the divergence.
    assert plain["first_token_divergence_sum"] > 0 and closed["first_token_divergence_sum"] > 0
    assert abs(plain["first_token_divergence_sum"] - closed["first_token_divergence_sum"]) > 1e-4, (
        plain,
        closed,
    )
    print({k: (plain[k], closed[k]) for k in ("first_token_divergence_sum", "first_token_teacher_think_sum")})
