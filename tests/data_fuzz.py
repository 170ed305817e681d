"""A seeded corpus of damaged training data, and the rows a correct loader must keep.

``make_fuzz_corpus(root, seed)`` writes jsonl and parquet files mixing good rows with every kind
of damage the loader must survive (non-UTF-8 bytes, a byte-order mark, NUL characters, CRLF
line ends, over-long lines, deep nesting, huge integers, wrong types, nulls, a corrupt parquet
file) plus random byte mutations of good rows. A mutated row may still be valid, so every
written line is classified by re-parsing it here (``expected_row``), never by how it was made.
Used by tests/unit/test_data_fuzz.py and the trainer run in tests/e2e/test_hostile_data.py.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tools.make_demo_data import make_examples

MAX_ROW_BYTES = 8192  # data.max_row_bytes for the corpus: small, so over-long lines stay cheap
# Damage written on purpose, each at least this often in the jsonl files.
DELIBERATE = {
    "invalid_utf8": 12,
    "nul_character": 12,
    "row_too_long": 12,
    "invalid_json": 12,
    "not_an_object": 12,
    "missing_problem": 12,
    "missing_solution": 12,
    "non_text_problem": 12,
    "non_text_solution": 12,
    "empty_problem": 12,
    "empty_solution": 12,
}


@dataclasses.dataclass
class FuzzCorpus:
    """The files and what a correct loader yields from them."""

    files: list[Path]
    good: list[tuple[str, str, str]]  # (example_id, problem, solution) in source order
    bad_rows: int  # rows a correct loader skips (files it cannot read not included)
    deliberate: dict[str, int]  # lower bound per reason: damage written on purpose
    unreadable: list[Path]  # files skipped whole
    first_bad: str  # ``path:line`` of the first bad row in source order
    rows_written: int


def expected_row(line: bytes) -> tuple[str, str] | None:
    """The (problem, solution) of one line if it is a usable row, else None.

    The definition of a usable row, written independently of the loader: at most MAX_ROW_BYTES,
    strict UTF-8, valid JSON, an object whose problem and solution are non-blank text with no
    NUL character and no unpaired surrogate.
    """
    if len(line) > MAX_ROW_BYTES:
        return None
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(row, dict):
        return None
    values = [row.get("problem"), row.get("solution")]
    for value in values:
        if not isinstance(value, str) or not value.strip() or "\0" in value:
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return None
    return values[0], values[1]


def _damaged(kind: str, good: dict, rng: random.Random) -> bytes:
    p, s = good["problem"], good["solution"]
    line = json.dumps({"problem": p, "solution": s}).encode()
    cut = rng.randint(2, len(line) - 2)
    return {
        "invalid_utf8": lambda: line[:cut] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"]) + line[cut:],
        "nul_character": lambda: rng.choice(
            [line[:cut] + b"\x00" + line[cut:], json.dumps({"problem": p + "\0", "solution": s}).encode()]
        ),
        "row_too_long": lambda: json.dumps({"problem": p + " x" * MAX_ROW_BYTES, "solution": s}).encode(),
        "invalid_json": lambda: rng.choice(
            [line[:cut], b"[" * 2000 + b"]" * 2000, b'{"problem": 1' + b"9" * 4300 + b"}"]
        ),
        "not_an_object": lambda: rng.choice([b'["a", "list"]', b"42", b'"text"', b"null"]),
        "missing_problem": lambda: json.dumps({"solution": s}).encode(),
        "missing_solution": lambda: json.dumps({"problem": p, "solution": None}).encode(),
        "non_text_problem": lambda: json.dumps({"problem": 7, "solution": s}).encode(),
        "non_text_solution": lambda: json.dumps({"problem": p, "solution": ["a"]}).encode(),
        "empty_problem": lambda: json.dumps({"problem": " \t", "solution": s}).encode(),
        "empty_solution": lambda: json.dumps({"problem": p, "solution": ""}).encode(),
    }[kind]()


def _mutated(good: dict, rng: random.Random) -> bytes:
    """1-3 random byte flips, insertions or deletions; never a newline (that would split the row)."""
    data = bytearray(json.dumps({"problem": good["problem"], "solution": good["solution"]}).encode())
    for _ in range(rng.randint(1, 3)):
        at, byte = rng.randrange(len(data)), rng.choice([b for b in range(256) if b != 0x0A])
        op = rng.choice(("flip", "insert", "delete"))
        if op == "flip":
            data[at] = byte
        elif op == "insert":
            data.insert(at, byte)
        else:
            del data[at]
    return bytes(data)


def _jsonl_lines(count: int, rng: random.Random, pool: list[dict]) -> list[bytes]:
    lines = [json.dumps({"problem": pool[0]["problem"], "solution": pool[0]["solution"]}).encode()]
    kinds = [k for k, n in DELIBERATE.items() for _ in range(n)]
    plan = kinds + ["mutated"] * (count // 4) + ["good"] * (count - len(kinds) - count // 4 - 1)
    rng.shuffle(plan)
    for kind in plan:
        good = rng.choice(pool)
        if kind == "good":
            lines.append(json.dumps({"problem": good["problem"], "solution": good["solution"]}).encode())
        elif kind == "mutated":
            lines.append(_mutated(good, rng))
        else:
            lines.append(_damaged(kind, good, rng))
        if rng.random() < 0.05:
            lines.append(b"   ")  # blank lines are not rows but still count in line numbers
    return lines


def make_fuzz_corpus(root: Path, seed: int = 19, rows: int = 1200) -> FuzzCorpus:
    """Write the corpus under ``root``; ``rows`` jsonl rows in two files plus parquet files."""
    rng = random.Random(seed)
    pool = make_examples(64, seed=seed)
    root.mkdir(parents=True, exist_ok=True)
    good: list[tuple[str, str, str]] = []
    bad_rows, first_bad = 0, ""
    files: list[Path] = []
    # File a: LF line ends. File b: a byte-order mark and CRLF line ends (a Windows editor).
    for name, newline, bom in (("a.jsonl", b"\n", b""), ("b.jsonl", b"\r\n", b"\xef\xbb\xbf")):
        lines = _jsonl_lines(rows // 2, rng, pool)
        path = root / name
        path.write_bytes(bom + newline.join(lines) + newline)
        files.append(path)
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            usable = expected_row(line)
            if usable is None:
                bad_rows += 1
                first_bad = first_bad or f"{path}:{line_no}"
            else:
                good.append((f"{path}:{line_no}", *usable))
    # Parquet: null cells, a NUL, a blank, an over-long cell and a wrongly typed column.
    mixed = root / "c.parquet"
    long_text = "x" * (MAX_ROW_BYTES + 1)
    problems = [pool[i]["problem"] for i in range(8)] + [None, "", "p\0q", pool[9]["problem"], long_text]
    solutions = [pool[i]["solution"] for i in range(8)] + ["s", "s", "s", None, "s"]
    pq.write_table(pa.table({"problem": problems, "solution": solutions}), mixed)
    good += [(f"{mixed}:{i + 1}", problems[i], solutions[i]) for i in range(8)]
    typed = root / "d.parquet"  # the solution column holds integers: every row non_text_solution
    pq.write_table(pa.table({"problem": ["p1", "p2", "p3"], "solution": [1, 2, 3]}), typed)
    corrupt = root / "e.parquet"  # a truncated parquet file: unreadable, skipped whole
    corrupt.write_bytes(mixed.read_bytes()[: len(mixed.read_bytes()) // 2])
    files += [mixed, typed, corrupt]
    deliberate = {**DELIBERATE}
    deliberate["non_text_solution"] += 3
    return FuzzCorpus(
        files=files,
        good=good,
        bad_rows=bad_rows + 5 + 3,
        deliberate=deliberate,
        unreadable=[corrupt],
        first_bad=first_bad,
        rows_written=bad_rows + len(good) + 5 + 3,
    )
