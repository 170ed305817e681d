"""A synthetic multi-step arithmetic task with worked solutions, and held-out problems.

Each problem is a sum of 3 or 4 two-digit numbers; the reference solution adds them one at a
time, one line per partial sum, and ends with the answer in ``\\boxed{}``::

    problem:  23+45+11
    solution: 23+45=68
              68+11=79
              \\boxed{79}

The training file has ``problem`` and ``solution`` (what the trainer reads); the held-out file has
``id``, ``problem`` and ``answer`` (a benchmark for the in-training evaluator). No held-out
problem appears in the training file.

    python tools/make_arith_data.py --out data/arith --train 20000 --heldout 300
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path


def make_problem(rng: random.Random) -> tuple[str, str, int]:
    """(problem, worked solution, answer) for one random sum."""
    numbers = [rng.randint(10, 99) for _ in range(rng.choice((3, 4)))]
    lines, total = [], numbers[0]
    for n in numbers[1:]:
        lines.append(f"{total}+{n}={total + n}")
        total += n
    lines.append(f"\\boxed{{{total}}}")
    return "+".join(map(str, numbers)), "\n".join(lines), total


def make_split(train: int, heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint training rows and held-out rows."""
    rng = random.Random(seed)
    held: dict[str, dict] = {}
    while len(held) < heldout:
        problem, _, answer = make_problem(rng)
        held.setdefault(problem, {"id": f"arith-{len(held)}", "problem": problem, "answer": str(answer)})
    rows = []
    while len(rows) < train:
        problem, solution, _ = make_problem(rng)
        if problem not in held:
            rows.append({"problem": problem, "solution": solution})
    return rows, list(held.values())


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for train.jsonl and heldout.jsonl")
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--heldout", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, held = make_split(args.train, args.heldout, args.seed)
    out = Path(args.out)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "heldout.jsonl", held)
    print(f"wrote {len(train)} training and {len(held)} held-out problems to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
