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

``--style`` writes the same problems, in the same order, with the reference in another style
(the learning experiment's second condition: references a warm-started student does not write
itself, as the references of real math datasets are):

- ``forward`` (above): left to right, one partial sum per line;
- ``reversed``: the same partial sums taken from the right (``11+45=56``, ``56+23=79``);
- ``terse``: a one-line sketch, the whole sum and its value (``23+45+11=79``).

    python tools/make_arith_data.py --out data/arith --train 20000 --heldout 300
    python tools/make_arith_data.py --out data/arith --style reversed   # train_reversed.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

STYLES = ("forward", "reversed", "terse")


def solution(numbers: list[int], style: str = "forward") -> str:
    """The worked reference solution of ``sum(numbers)`` in ``style`` (one of ``STYLES``)."""
    total = sum(numbers)
    if style == "terse":
        lines = [f"{'+'.join(map(str, numbers))}={total}"]
    elif style in ("forward", "reversed"):
        order = numbers if style == "forward" else numbers[::-1]
        lines, partial = [], order[0]
        for n in order[1:]:
            lines.append(f"{partial}+{n}={partial + n}")
            partial += n
    else:
        raise ValueError(f"unknown style {style!r}; use one of {', '.join(STYLES)}")
    return "\n".join([*lines, f"\\boxed{{{total}}}"])


def make_problem(rng: random.Random, style: str = "forward") -> tuple[str, str, int]:
    """(problem, worked solution, answer) for one random sum."""
    numbers = [rng.randint(10, 99) for _ in range(rng.choice((3, 4)))]
    return "+".join(map(str, numbers)), solution(numbers, style), sum(numbers)


def make_split(train: int, heldout: int, seed: int, style: str = "forward") -> tuple[list[dict], list[dict]]:
    """Disjoint training rows and held-out rows. The style changes the solutions only: the
    problems and their order depend on the seed alone."""
    rng = random.Random(seed)
    held: dict[str, dict] = {}
    while len(held) < heldout:
        problem, _, answer = make_problem(rng, style)
        held.setdefault(problem, {"id": f"arith-{len(held)}", "problem": problem, "answer": str(answer)})
    rows = []
    while len(rows) < train:
        problem, worked, _ = make_problem(rng, style)
        if problem not in held:
            rows.append({"problem": problem, "solution": worked})
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
    parser.add_argument(
        "--style",
        choices=STYLES,
        default="forward",
        help="the reference solutions' style; other than forward, writes train_<style>.jsonl",
    )
    args = parser.parse_args(argv)
    train, held = make_split(args.train, args.heldout, args.seed, args.style)
    out = Path(args.out)
    name = "train.jsonl" if args.style == "forward" else f"train_{args.style}.jsonl"
    write_jsonl(out / name, train)
    write_jsonl(out / "heldout.jsonl", held)
    print(f"wrote {len(train)} training ({args.style} references) and {len(held)} held-out problems to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
