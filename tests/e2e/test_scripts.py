"""Every script under bench/ and tools/ runs at toy size, so none of them can rot unnoticed.

Each bench must end with its ``RESULT <name> ...`` line; each tool must exit 0 and leave what it
promises (``RUN_ELSEWHERE`` names the tools whose command line another module already runs). ``bench/gpu_check.py`` runs its CUDA code path on CPU (``--device cpu --smoke``).
The figures mean nothing at these sizes: bench/RESULTS.md holds the real ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.runs import REPO

# name -> (arguments at toy size, the RESULT names it must print). {tmp} is a fresh directory.
BENCHES = {
    "convert": ("--preset tiny --repeats 1 --model-dir {tmp}/model", ["convert"]),
    "divergence": ("--tokens 64 --vocab 1024 --repeats 1", ["divergence"]),
    "eval_scaling": ("--preset tiny --problems 2 --k 2 --tokens 8", ["eval_scaling"]),
    "gpu_check": ("--device cpu --smoke", ["gpu_divergence", "gpu_megatron"]),
    "mfu": (
        "--preset tiny --rollouts 4 --prompt 8 --teacher-prompt 16 --response-min 4 --response-max 12 "
        "--microbatch-tokens 64 --repeats 1 --dtype bfloat16",
        ["gpu_mfu"],
    ),
    "lora_memory": ("--preset tiny --rank 4 --alpha 8", ["lora_memory"]),
    "paired_step": (
        "--preset tiny --rollouts 4 --prompt 8 --teacher-prompt 16 --response-min 4 --response-max 12 "
        "--microbatch-tokens 64 --repeats 1",
        ["paired_step"],
    ),
    "activation_memory": (
        "--preset tiny --sizes 1,2,4 --prompt 64 --teacher-prompt 192 --response 256",
        ["activation_memory"],
    ),
    "rollout_scaling": ("--preset tiny --prompts 2 --tokens 8 --repeats 1", ["rollout_scaling"]),
    "weight_sync": ("--preset tiny --layouts tp1 --repeats 1", ["weight_sync"]),
}


def _python(args: list[str], cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


# Benches whose toy run is also a check: RESULT key -> the largest value it may print. The
# activation bench's shape is large enough (~100 MB per step) that allocator noise is small.
UPPER_BOUNDS = {"activation_memory": {"max_error": 0.2}}

# Tools whose command line already runs end to end in another test module (not run twice).
RUN_ELSEWHERE = {
    "convert_checkpoint": "tests/distributed/test_convert_cli.py",
    "eval_math": "tests/e2e/test_eval_math.py",
}


def test_every_script_has_a_smoke_case():
    benches = {p.stem for p in (REPO / "bench").glob("*.py") if not p.stem.startswith("_")}
    assert benches == set(BENCHES), benches ^ set(BENCHES)
    tools = {p.stem for p in (REPO / "tools").glob("*.py") if p.stem != "__init__"}
    tested = {name.removeprefix("test_") for name in globals() if name.startswith("test_")}
    assert tools <= tested | set(RUN_ELSEWHERE), f"tools without a smoke test: {sorted(tools - tested)}"
    for tool, module in RUN_ELSEWHERE.items():
        assert f"tools/{tool}.py" in (REPO / module).read_text(), (tool, module)


# The benches bench/gpu_session.sh runs, which its test runs with these arguments.
IN_GPU_SESSION = ("gpu_check", "mfu")


def _check_results(name: str, stdout: str) -> None:
    results = BENCHES[name][1]
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert [line.split()[1] for line in lines][-len(results) :] == results, stdout[-2000:]
    values = dict(item.split("=", 1) for item in lines[-1].split()[2:])
    for key, bound in UPPER_BOUNDS.get(name, {}).items():
        assert float(values[key]) <= bound, stdout[-2000:]


@pytest.mark.parametrize("name", sorted(set(BENCHES) - set(IN_GPU_SESSION)))
def test_bench(name, tmp_path):
    args = BENCHES[name][0]
    done = _python([f"bench/{name}.py", *args.format(tmp=tmp_path).split()])
    _check_results(name, done.stdout)


def test_mfu_ladder_runs_each_change_where_it_changes_something(monkeypatch):
    """bench/mfu.py's rungs: on the issue's GPU run (bf16, CUDA with Triton) each adds a change;
    where one changes nothing (no cast in float32, no fusion on CPU or without Triton) its row
    has no figure of its own. (No CUDA here: the Triton probe is a stand-in.)"""
    import argparse

    import torch

    from bench.mfu import RUNGS, changes, effective
    from megaopsd.runtime import kernels

    def changed(dtype: str, device: str) -> list[bool]:
        args = argparse.Namespace(dtype=dtype)
        return changes([effective(rung, args, torch.device(device)) for rung in RUNGS])

    monkeypatch.setattr(kernels, "_triton_usable", lambda: True)
    assert changed("bfloat16", "cuda") == [True, True, True, True]
    assert changed("float32", "cuda") == [True, True, False, True]  # rung 3 is rung 2 here
    assert changed("bfloat16", "cpu") == [True, True, True, False]  # the fusion is off on CPU
    assert changed("float32", "cpu") == [True, True, False, False]
    monkeypatch.setattr(kernels, "_triton_usable", lambda: False)
    kernels._warn_once.cache_clear()
    with pytest.warns(UserWarning, match="Triton is not usable"):
        assert changed("bfloat16", "cuda") == [True, True, True, False]


def test_gpu_session_script_runs_both_benches_and_collects_their_results(tmp_path):
    """bench/gpu_session.sh, the one command a lent GPU machine runs, with the CPU toy arguments
    of the two benches it runs: their smoke cases."""
    out = tmp_path / "out"
    env = os.environ | {"OUT": str(out), "PYTHON": sys.executable}
    env |= {f"{name.upper()}_ARGS": BENCHES[name][0] for name in IN_GPU_SESSION}
    done = subprocess.run(
        ["bash", "bench/gpu_session.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in IN_GPU_SESSION:
        _check_results(name, (out / f"{name}.log").read_text())
    collected = done.stdout.split("--- RESULT lines")[1]
    assert [line.split()[1] for line in collected.split("\n") if line] == [
        "gpu_divergence",
        "gpu_megatron",
        "gpu_mfu",
    ]
    assert (out / "machine.txt").read_text().count("megatron-core 0.16.1") == 1


def test_make_tiny_model(tmp_path):
    _python(["tools/make_tiny_model.py", "--family", "llama", "--out", str(tmp_path / "m"), "--layers", "1"])
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 1


def test_make_demo_data(tmp_path):
    _python(["tools/make_demo_data.py", "--out", str(tmp_path / "d.jsonl"), "--count", "5"])
    rows = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(r["problem"] and r["solution"] for r in rows)


def test_make_arith_data(tmp_path):
    _python(["tools/make_arith_data.py", "--out", str(tmp_path), "--train", "6", "--heldout", "3"])
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 6
    assert len((tmp_path / "heldout.jsonl").read_text().splitlines()) == 3


def test_prepare_data(tmp_path):
    source = tmp_path / "raw.jsonl"
    source.write_text("".join(json.dumps({"problem": f"p{i}", "solution": f"s{i}"}) + "\n" for i in range(4)))
    _python(["tools/prepare_data.py", str(source), "--out", str(tmp_path / "out.jsonl"), "--limit", "3"])
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 3


def test_record_rollout_lengths(tiny_qwen3, fixed_prompts, tmp_path):
    out = tmp_path / "lengths.json"
    _python(
        [
            *("tools/record_rollout_lengths.py", "--steps", "1", "--out", str(out), "recipe=tiny_cpu"),
            *(
                f"model.hf_path={tiny_qwen3}",
                f"data.train_files=[{fixed_prompts}]",
                "rollout.max_new_tokens=8",
            ),
        ]
    )
    steps = json.loads(out.read_text())["steps"]
    assert len(steps) == 1 and len(steps[0]) == 8, steps  # 8 prompts per step, n = 1
    assert all(student < teacher and 1 <= response <= 8 for student, teacher, response in steps[0])


def test_learning_experiment(tmp_path):
    """The experiment's pipeline at toy size (char model, data in two reference styles, SFT warm
    start, export, an OPSD run per condition, curves, plot, tables), not its science: ``make
    experiment`` is the real run. GRPO and SFT post-training are the trainer paths of
    tests/e2e/test_baselines.py; the summary, table and plot over every method are
    tests/unit/test_learning_experiment.py."""
    out = tmp_path / "exp"
    command = [
        "tools/learning_experiment.py",
        *("--out", str(out), "--smoke", "--seed-base", "7"),
        *("--methods", "opsd", "--conditions", "forward,terse", "--other-methods", "opsd"),
    ]
    _python(command, timeout=1200)
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["opsd_seed7", "terse"]  # seeds 7 ..
    assert [p.name for p in (out / "runs" / "terse").iterdir()] == ["opsd_seed7"]
    own, terse = (
        json.loads((out / "data" / n).read_text().splitlines()[0])
        for n in ("train.jsonl", "train_terse.jsonl")
    )
    assert (
        own["problem"] == terse["problem"]
        and own["solution"].count("\n") > terse["solution"].count("\n") == 1
    )
    # the second condition's run read the terse references
    overrides = out / "runs" / "terse" / "opsd_seed7" / "hydra" / ".hydra" / "overrides.yaml"
    assert "train_terse.jsonl" in overrides.read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["conditions"]) == {"forward", "terse"} and summary["seeds"] == [7]
    assert summary["warm_start_wall_s"] > 0  # made by this invocation, timed apart from the runs
    for condition in summary["conditions"].values():
        assert set(condition["methods"]) == {"opsd"}
        opsd = condition["methods"]["opsd"]
        assert opsd["steps"] == [0, 1]
        assert 0.0 <= opsd["final_mean"] <= 1.0
        assert opsd["tokens_total"] > 0  # read back from the run's rollout/generated_tokens_total
        assert [p["step"] for p in opsd["curves"][0]] == [0, 1]  # the seed's own curve
        assert condition["matched"]["methods"]["opsd"]["tokens"] is not None  # the matched-accuracy table
    assert (out / "accuracy.png").stat().st_size > 10_000
    text = (out / "table.md").read_text()
    tables = sum(
        1 + bool(c["matched"]["levels"]) for c in summary["conditions"].values()
    )  # final (+ matched)
    assert "### forward references" in text and "### terse references" in text
    assert text.count("| opsd |") == tables
