"""Benchmark: tools/eval_math.py on one engine against two colocated engines.

The same problems, k and seeds, as a user runs them: ``python tools/eval_math.py`` (one
process, one engine) against ``torchrun --nproc-per-node 2 tools/eval_math.py --engines 2``
(two processes, an engine in each, the problems split in halves). Each engine runs with the
same torch threads (``--threads``, default 1). Timed: the tool's own per-benchmark time
(generation + grading, after the engines start) and the whole command's wall time; the
per-sample records are checked identical. time_ratio = two engines / one engine, per-benchmark
time (goal <= 0.6).

    .venv/bin/python bench/eval_scaling.py                      # small model, 16 problems x k 4 x 64 tokens
    .venv/bin/python bench/eval_scaling.py --preset tiny --problems 8 --k 2 --tokens 16
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_eval(
    model: Path, bench: Path, out: Path, engines: int, args: argparse.Namespace
) -> tuple[float, float]:
    """Run the CLI; (the tool's per-benchmark seconds, the command's wall seconds)."""
    script = [str(REPO / "tools" / "eval_math.py"), "--model", str(model), "--benchmark", f"demo={bench}"]
    script += [
        "--out",
        str(out),
        "--engines",
        str(engines),
        "--k",
        str(args.k),
        "--max-new-tokens",
        str(args.tokens),
    ]
    script += ["--dtype", "float32", "--kv-cache-gib", "0.25", "--grading-workers", "1"]
    script += ["--cpu-threads", str(args.threads), "--no-progress"]
    if engines == 1:
        command = [sys.executable, *script]
    else:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        command = [torchrun, "--standalone", f"--nproc-per-node={engines}", *script]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(
            f"eval_math with {engines} engine(s) failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    seconds = float(re.search(r"eval_math: demo: ([0-9.]+) s", proc.stdout).group(1))
    return seconds, wall


def main(argv: list[str] | None = None) -> int:
    from tools.make_tiny_model import make_tiny_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", help="make_tiny_model preset (tiny or small)")
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="eval-scaling-") as tmp:
        tmp = Path(tmp)
        model = make_tiny_model("qwen3", tmp / args.preset, preset=args.preset)
        bench = tmp / "demo.jsonl"
        rows = [
            {"id": f"p{i}", "problem": f"Compute {i} * {i + 3}.", "answer": i * (i + 3)}
            for i in range(args.problems)
        ]
        bench.write_text("".join(json.dumps(row) + "\n" for row in rows))
        one, one_wall = run_eval(model, bench, tmp / "one", 1, args)
        two, two_wall = run_eval(model, bench, tmp / "two", 2, args)
        same = (tmp / "one" / "samples_demo.jsonl").read_bytes() == (
            tmp / "two" / "samples_demo.jsonl"
        ).read_bytes()
    print(
        f"{args.problems} problems x k {args.k} x {args.tokens} tokens, {args.preset} model, {args.threads} thread(s) per engine"
    )
    print(f"  one engine : {one:7.2f} s evaluating ({one_wall:6.1f} s command)")
    print(f"  two engines: {two:7.2f} s evaluating ({two_wall:6.1f} s command)")
    print(f"  records identical: {same}")
    print(
        f"RESULT eval_scaling time_ratio={two / one:.3f} wall_ratio={two_wall / one_wall:.3f} "
        f"one_s={one:.2f} two_s={two:.2f} identical={same}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
