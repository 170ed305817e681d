"""Evaluation benchmarks: a registry of hub datasets and their columns, and a loader.

A benchmark is a list of (problem id, problem, reference answer). It comes from the Hugging
Face hub (through ``datasets``, when reachable) or from a local ``.jsonl``/``.json`` (JSON
lines) or ``.parquet`` file, read by the training data's readers (``megaopsd.data.dataset``).

    load_benchmark("aime24")                                  # HuggingFaceH4/aime_2024 from the hub
    load_benchmark("aime24", "data/aime24.jsonl")             # a local copy, the registry's columns
    load_benchmark("mine", "x.parquet", problem_column="question", answer_column="gt")

Columns of the registered datasets (from their dataset cards):

============  ===========================  =====  =======  ======  ===========
name          hub id                       split  problem  answer  id
============  ===========================  =====  =======  ======  ===========
aime24        HuggingFaceH4/aime_2024      train  problem  answer  id
aime25        yentinglin/aime_2025         train  problem  answer  id
hmmt25        MathArena/hmmt_feb_2025      train  problem  answer  problem_idx
math500       HuggingFaceH4/MATH-500       test   problem  answer  unique_id
============  ===========================  =====  =======  ======  ===========

A file or dataset that lacks the problem or answer column is an error naming the columns it
has; a row with a missing or empty problem or answer is an error naming its file and line (a
benchmark silently shorter than the published one would give numbers that compare with
nothing). The id column is optional: without it a problem's id is ``file:line`` (or
``dataset[row]``). Integer answers (AIME files often store them as numbers) become text.
"""

from __future__ import annotations

import dataclasses
import itertools
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from megaopsd.data.dataset import PARQUET_SUFFIXES, DataError, _read_source


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchmarkSpec:
    """Where a registered benchmark lives on the hub and which columns hold what.

    Attributes:
        hub_id: Hugging Face dataset id.
        split: the split holding the problems.
        problem_column: the problem text.
        answer_column: the reference final answer.
        id_column: a per-problem id (optional in the data; row position otherwise).
    """

    hub_id: str
    split: str
    problem_column: str = "problem"
    answer_column: str = "answer"
    id_column: str | None = "id"


REGISTRY: Mapping[str, BenchmarkSpec] = types.MappingProxyType(
    {
        "aime24": BenchmarkSpec(hub_id="HuggingFaceH4/aime_2024", split="train"),
        "aime25": BenchmarkSpec(hub_id="yentinglin/aime_2025", split="train"),
        "hmmt25": BenchmarkSpec(hub_id="MathArena/hmmt_feb_2025", split="train", id_column="problem_idx"),
        "math500": BenchmarkSpec(hub_id="HuggingFaceH4/MATH-500", split="test", id_column="unique_id"),
    }
)

# Columns of a benchmark file whose name is not registered.
GENERIC = BenchmarkSpec(hub_id="", split="", problem_column="problem", answer_column="answer", id_column="id")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchmarkProblem:
    """One problem: its id (unique within the benchmark), text and reference answer."""

    problem_id: str
    problem: str
    answer: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Benchmark:
    """A named list of problems and where they came from."""

    name: str
    source: str
    problems: tuple[BenchmarkProblem, ...]

    def __len__(self) -> int:
        return len(self.problems)


def parse_benchmark_arg(text: str) -> tuple[str, str | None]:
    """``name`` or ``name=path`` (a command-line benchmark) -> ``(name, path or None)``."""
    name, sep, path = text.partition("=")
    name, path = name.strip(), path.strip()
    if not name or (sep and not path):
        raise DataError(f"benchmark {text!r}: use NAME (a registered benchmark) or NAME=PATH (a local file)")
    return name, path or None


def _answer_text(value: Any) -> str | None:
    """A reference answer as text: strings stripped, whole numbers without ``.0``; None if unusable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _parquet_columns(source: str) -> list[str] | None:
    """The columns of a local parquet file; None for any other source."""
    path = Path(source)
    if not (path.is_file() and path.suffix in PARQUET_SUFFIXES):
        return None
    import pyarrow.parquet as pq

    return list(pq.read_schema(path).names)


def _rows(source: str, required: tuple[str, str], id_column: str | None) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` from any source; the optional id column is read only where it exists."""
    columns = _parquet_columns(source)
    if columns is not None:
        missing = [c for c in required if c not in columns]
        if missing:
            raise DataError(
                f"{source}: no column {missing[0]!r}; columns are {', '.join(columns)}; "
                "set the problem/answer column (--problem-column / --answer-column)"
            )
        return _read_source(source, required + ((id_column,) if id_column in columns else ()))
    if id_column is None:
        return _read_source(source, required)
    rows = _read_source(source, (*required, id_column))  # jsonl rows are whole objects anyway
    try:
        first = next(rows, None)  # the hub reader loads and checks its columns here
    except DataError as err:
        if repr(id_column) not in str(err):
            raise
        return _read_source(source, required)  # a hub dataset without the optional id column
    return iter(()) if first is None else itertools.chain([first], rows)


def _problem(where: str, row: Any, spec: BenchmarkSpec) -> BenchmarkProblem:
    """One row as a problem, or a DataError naming the row and the fix."""
    if not isinstance(row, dict):
        detail = getattr(row, "detail", f"a {type(row).__name__}, not a JSON object")
        raise DataError(f"{where}: unusable row ({detail})")
    for column in (spec.problem_column, spec.answer_column):
        if column not in row:
            raise DataError(
                f"{where}: no {column!r} field; fields are {', '.join(map(str, row))}; "
                "set the problem/answer column (--problem-column / --answer-column)"
            )
    problem = row[spec.problem_column]
    if not isinstance(problem, str) or not problem.strip():
        raise DataError(f"{where}: {spec.problem_column!r} is empty or not text")
    answer = _answer_text(row[spec.answer_column])
    if answer is None:
        raise DataError(f"{where}: {spec.answer_column!r} is empty or not a text/number answer")
    problem_id = row.get(spec.id_column) if spec.id_column else None
    return BenchmarkProblem(
        problem_id=where if problem_id is None else str(problem_id), problem=problem, answer=answer
    )


def load_benchmark(
    name: str,
    path: str | None = None,
    *,
    problem_column: str | None = None,
    answer_column: str | None = None,
    id_column: str | None = None,
    limit: int | None = None,
) -> Benchmark:
    """Load a benchmark from a local file or, without ``path``, from the hub.

    Args:
        name: the benchmark's name; a registered name (``aime24``, ``aime25``, ``hmmt25``,
            ``math500``) supplies the hub id and default columns, any other name needs ``path``
            and defaults to the columns ``problem``, ``answer`` and ``id``.
        path: a local ``.jsonl``/``.json``/``.parquet`` file, or a hub id (``owner/name[:split]``).
        problem_column: overrides the problem column.
        answer_column: overrides the answer column.
        id_column: overrides the id column (``""``: no id column, ids are row positions).
        limit: keep only the first ``limit`` problems.

    Raises:
        DataError: an unknown name without a path, a missing file, a missing column, a bad row,
            duplicate ids or no problems.
    """
    spec = REGISTRY.get(name)
    if spec is None and path is None:
        raise DataError(
            f"benchmark {name!r} is not registered ({', '.join(REGISTRY)}); give a file as {name}=PATH"
        )
    spec = spec or GENERIC
    spec = dataclasses.replace(
        spec,
        problem_column=problem_column or spec.problem_column,
        answer_column=answer_column or spec.answer_column,
        id_column=spec.id_column if id_column is None else (id_column or None),
    )
    source = path or f"{spec.hub_id}:{spec.split}"
    required = (spec.problem_column, spec.answer_column)
    problems: list[BenchmarkProblem] = []
    try:
        for where, row in _rows(source, required, spec.id_column):
            if limit is not None and len(problems) >= limit:
                break
            problems.append(_problem(where, row, spec))
    except DataError as err:
        hint = f"; without the hub, give a local copy as {name}=PATH" if path is None else ""
        raise DataError(f"benchmark {name}: {err}{hint}") from err
    if not problems:
        raise DataError(f"benchmark {name}: {source} holds no problems")
    seen: set[str] = set()
    for p in problems:
        if p.problem_id in seen:
            raise DataError(
                f"benchmark {name}: id {p.problem_id!r} appears twice in column {spec.id_column!r}; "
                "fix the file or set the id column to '' (row positions)"
            )
        seen.add(p.problem_id)
    return Benchmark(name=name, source=source, problems=tuple(problems))
