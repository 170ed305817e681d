"""Write a small deterministic demo set: arithmetic word problems with worked solutions.

Each JSON line has ``problem``, ``solution`` (worked steps ending in ``\\boxed{answer}``) and
``answer``. Five problem kinds (add, take away, groups of, share equally, two steps) with
seeded numbers; the same seed always writes the same file.

    python tools/make_demo_data.py                       # data/demo/train.jsonl, 256 problems
    python tools/make_demo_data.py --out /tmp/d.jsonl --count 64 --seed 1
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

NAMES = ("Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gia", "Hal", "Ivy", "Jon")
THINGS = ("apples", "books", "coins", "marbles", "pencils", "stamps", "cards", "shells")


def _add(rng: random.Random, name: str, thing: str) -> tuple[str, str, int]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    problem = f"{name} has {a} {thing} and finds {b} more. How many {thing} does {name} have now?"
    solution = f"{name} starts with {a} {thing} and adds {b}: {a} + {b} = {a + b}."
    return problem, solution, a + b


def _take_away(rng: random.Random, name: str, thing: str) -> tuple[str, str, int]:
    a = rng.randint(20, 99)
    b = rng.randint(1, a - 1)
    problem = f"{name} has {a} {thing} and gives {b} of them to a friend. How many {thing} are left?"
    solution = f"Giving away {b} of {a} {thing} leaves {a} - {b} = {a - b}."
    return problem, solution, a - b


def _groups(rng: random.Random, name: str, thing: str) -> tuple[str, str, int]:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    problem = f"{name} buys {a} boxes with {b} {thing} in each box. How many {thing} does {name} buy?"
    solution = f"There are {a} boxes of {b} {thing}, so {a} \\times {b} = {a * b}."
    return problem, solution, a * b


def _share(rng: random.Random, name: str, thing: str) -> tuple[str, str, int]:
    friends, each = rng.randint(2, 9), rng.randint(2, 12)
    total = friends * each
    problem = f"{name} shares {total} {thing} equally among {friends} friends. How many {thing} does each friend get?"
    solution = f"Each friend gets {total} \\div {friends} = {each} {thing}, since {friends} \\times {each} = {total}."
    return problem, solution, each


def _two_steps(rng: random.Random, name: str, thing: str) -> tuple[str, str, int]:
    packs, per_pack = rng.randint(2, 9), rng.randint(2, 10)
    bought = packs * per_pack
    lost = rng.randint(1, bought - 1)
    problem = (
        f"{name} buys {packs} packs of {per_pack} {thing} and then loses {lost} of them. "
        f"How many {thing} does {name} have?"
    )
    solution = (
        f"First, {packs} \\times {per_pack} = {bought} {thing} are bought. "
        f"Then {lost} are lost: {bought} - {lost} = {bought - lost}."
    )
    return problem, solution, bought - lost


KINDS = (_add, _take_away, _groups, _share, _two_steps)


def make_examples(count: int = 256, seed: int = 0) -> list[dict[str, str]]:
    """``count`` problems cycling through the five kinds, numbers drawn from ``seed``."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        name, thing = rng.choice(NAMES), rng.choice(THINGS)
        problem, steps, answer = KINDS[i % len(KINDS)](rng, name, thing)
        solution = f"{steps} The answer is \\boxed{{{answer}}}."
        rows.append({"problem": problem, "solution": solution, "answer": str(answer)})
    return rows


def write_demo_data(out: str | Path, *, count: int = 256, seed: int = 0) -> Path:
    """Write the demo set as JSON lines and return the path."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(row, ensure_ascii=True) for row in make_examples(count, seed)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/demo/train.jsonl", help="output .jsonl path")
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_demo_data(args.out, count=args.count, seed=args.seed)
    print(f"wrote {args.count} problems to {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
