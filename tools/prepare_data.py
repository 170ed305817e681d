"""Write the training file the OPSD recipes name, from the official dataset or any local rows.

The official OPSD code trains on the Hugging Face dataset ``siyanzhao/Openthoughts_math_30k_opsd``
(columns ``problem`` and ``solution``). This tool reads it (or local ``.jsonl`` / ``.parquet``
files whose columns are mapped with ``--problem-key`` / ``--solution-key``), keeps the usable rows
with the same checks the trainer applies (missing, non-text or empty fields are skipped and
counted, or rejected with ``--strict``), optionally drops repeated problems, and writes
``problem`` / ``solution`` rows to ``--out`` (``.parquet`` or ``.jsonl``), atomically.

    python tools/prepare_data.py                     # hub -> data/openthoughts_math_30k_opsd.parquet
    python tools/prepare_data.py rows.jsonl --problem-key question --solution-key worked \\
        --out data/mine.parquet --dedupe

The hub is contacted only when a source is a dataset id (``owner/name[:split]``), never for a
local path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megaopsd.data.dataset import DataError, ProblemExample, load_examples  # noqa: E402

OFFICIAL_DATASET = "siyanzhao/Openthoughts_math_30k_opsd"
DEFAULT_OUT = "data/openthoughts_math_30k_opsd.parquet"  # what conf/recipe/opsd_qwen3_*.yaml name


def _write(examples: Sequence[ProblemExample], out: Path) -> None:
    """``problem``/``solution`` rows to ``out`` (parquet or JSON lines), via a temporary file."""
    tmp = out.with_name(f".{out.name}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(
            {"problem": [e.problem for e in examples], "solution": [e.solution for e in examples]}
        )
        pq.write_table(table, tmp)
    else:
        with tmp.open("w", encoding="utf-8") as handle:
            for e in examples:
                handle.write(
                    json.dumps({"problem": e.problem, "solution": e.solution}, ensure_ascii=False) + "\n"
                )
    os.replace(tmp, out)


def prepare(
    sources: Sequence[str],
    out: str | Path,
    *,
    problem_key: str = "problem",
    solution_key: str = "solution",
    strict: bool = False,
    dedupe: bool = False,
    limit: int | None = None,
) -> dict[str, int]:
    """Read, check, optionally dedupe and cut, write; the counts of what happened.

    Returns:
        ``{"read": usable rows, "written": rows written, "duplicates": dropped repeats,
        "skipped_<reason>": rows skipped for that reason}``.

    Raises:
        DataError: unknown output type, a missing column, no usable row, or a bad row with strict.
    """
    out = Path(out)
    if out.suffix not in (".parquet", ".jsonl"):
        raise DataError(f"--out {out}: unknown file type; use .parquet or .jsonl")
    loaded = load_examples(sources, problem_key=problem_key, solution_key=solution_key, strict=strict)
    kept, seen = [], set()
    for example in loaded.examples:
        if dedupe:
            key = example.problem.strip()
            if key in seen:
                continue
            seen.add(key)
        kept.append(example)
    duplicates = len(loaded.examples) - len(kept)
    if limit is not None:
        kept = kept[:limit]
    _write(kept, out)
    counts = {"read": len(loaded.examples), "written": len(kept), "duplicates": duplicates}
    return counts | {f"skipped_{reason}": n for reason, n in loaded.skipped.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "sources",
        nargs="*",
        default=[OFFICIAL_DATASET],
        help=f"files or hub ids (default {OFFICIAL_DATASET})",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help=f".parquet or .jsonl (default {DEFAULT_OUT})")
    parser.add_argument("--problem-key", default="problem", help="column holding the problem")
    parser.add_argument("--solution-key", default="solution", help="column holding the reference solution")
    parser.add_argument(
        "--strict", action="store_true", help="fail on the first bad row instead of skipping it"
    )
    parser.add_argument("--dedupe", action="store_true", help="keep only the first row of each problem text")
    parser.add_argument("--limit", type=int, default=None, help="write at most this many rows")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit={args.limit} must be >= 1")
    try:
        counts = prepare(
            args.sources,
            args.out,
            problem_key=args.problem_key,
            solution_key=args.solution_key,
            strict=args.strict,
            dedupe=args.dedupe,
            limit=args.limit,
        )
    except DataError as err:
        print(f"prepare_data: {err}", file=sys.stderr)
        return 2
    summary = " ".join(f"{k}={v}" for k, v in counts.items())
    print(f"wrote {args.out}: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
