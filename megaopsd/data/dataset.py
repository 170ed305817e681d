"""Problems and reference solutions: loading, validation, seeded shuffling and a resumable position.

Sources are local ``.jsonl``/``.json`` (one JSON object per line) or ``.parquet`` files, or a
Hugging Face dataset id (``owner/name`` or ``owner/name:split``, loaded through ``datasets``
when the hub is reachable) for anything that is not an existing path.

Bad rows (unparsable JSON, not an object, a missing, non-text or empty problem/solution) are
skipped and counted per reason, or, with ``strict=True``, rejected with the file and the
1-based line (or row) number of the first one. A column that is missing from a whole parquet
file or dataset is a configuration error and always raises.

``ProblemDataset`` walks the examples epoch after epoch, each epoch in its own seeded order.
Its position is ``(epoch, index)``; ``state_dict``/``load_state_dict`` restore it so a resumed
run sees exactly the prompts an uninterrupted run would have seen next.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)


class DataError(ValueError):
    """A data source that cannot be used; the message names the file and line or the fix."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProblemExample:
    """One usable row.

    Attributes:
        example_id: ``path:line`` (jsonl), ``path:row`` (parquet) or ``dataset[row]``, 1-based.
        problem: the problem text.
        solution: the reference solution text.
    """

    example_id: str
    problem: str
    solution: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoadedExamples:
    """The usable examples of all sources and the skipped rows counted per reason."""

    examples: list[ProblemExample]
    skipped: dict[str, int]


# ----------------------------------------------------------------------------- reading


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(path:line, parsed object)``; an unparsable line yields a ``_Bad`` marker."""
    with path.open("r", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue  # blank lines (a trailing newline) are not rows
            where = f"{path}:{line_no}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                yield where, _Bad("invalid_json", str(err))


def _require_columns(columns: Sequence[str], keys: Sequence[str], source: str) -> None:
    missing = [k for k in keys if k not in columns]
    if missing:
        raise DataError(
            f"{source}: no column {missing[0]!r}; columns are {', '.join(map(str, columns))}; "
            "set data.problem_key / data.solution_key to the right names"
        )


def _read_parquet(path: Path, keys: Sequence[str]) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    schema_names = pq.read_schema(path).names
    _require_columns(schema_names, keys, str(path))
    table = pq.read_table(path, columns=list(keys))
    for row_no, row in enumerate(table.to_pylist(), start=1):
        yield f"{path}:{row_no}", row


def _read_hub(source: str, keys: Sequence[str]) -> Iterator[tuple[str, Any]]:
    """A Hugging Face dataset id, ``owner/name`` or ``owner/name:split`` (default split ``train``)."""
    import datasets

    name, _, split = source.partition(":")
    try:
        table = datasets.load_dataset(name, split=split or "train")
    except Exception as err:  # the hub raises many types; all mean "cannot use this source"
        raise DataError(
            f"{source}: not a local file and not loadable as a Hugging Face dataset ({err}); "
            "check data.train_files"
        ) from err
    _require_columns(table.column_names, keys, source)
    for row_no, row in enumerate(table.select_columns(list(keys)), start=1):
        yield f"{name}[{row_no}]", row


def _read_source(source: str, keys: Sequence[str]) -> Iterator[tuple[str, Any]]:
    path = Path(source)
    if path.is_file():
        if path.suffix in JSONL_SUFFIXES:
            return _read_jsonl(path)
        if path.suffix in PARQUET_SUFFIXES:
            return _read_parquet(path, keys)
        raise DataError(f"{source}: unknown file type; use .jsonl, .json (JSON lines) or .parquet")
    looks_like_path = (
        path.exists()
        or path.suffix in JSONL_SUFFIXES + PARQUET_SUFFIXES
        or source.startswith((".", "/", "~"))
        or source.count("/") > 1
    )
    if looks_like_path:
        raise DataError(f"{source}: no such file (and not a Hugging Face dataset id owner/name[:split])")
    return _read_hub(source, keys)


# ----------------------------------------------------------------------------- validation


@dataclasses.dataclass(frozen=True)
class _Bad:
    reason: str
    detail: str


def _check_row(row: Any, problem_key: str, solution_key: str) -> tuple[str, str] | _Bad:
    """The (problem, solution) of a row, or why it is unusable."""
    if isinstance(row, _Bad):
        return row
    if not isinstance(row, dict):
        return _Bad("not_an_object", f"expected a JSON object, got {type(row).__name__}")
    values = []
    for role, key in (("problem", problem_key), ("solution", solution_key)):
        value = row.get(key)
        if value is None:
            return _Bad(f"missing_{role}", f"no {key!r} field")
        if not isinstance(value, str):
            return _Bad(f"non_text_{role}", f"{key!r} is a {type(value).__name__}, not text")
        if not value.strip():
            return _Bad(f"empty_{role}", f"{key!r} is empty")
        values.append(value)
    return values[0], values[1]


def load_examples(
    sources: Sequence[str],
    *,
    problem_key: str = "problem",
    solution_key: str = "solution",
    strict: bool = False,
) -> LoadedExamples:
    """Read every source, keep the usable rows and count the others per reason.

    Args:
        sources: local files (``.jsonl``, ``.json`` lines, ``.parquet``) or Hugging Face ids.
        problem_key: the column holding the problem.
        solution_key: the column holding the reference solution.
        strict: raise on the first bad row instead of skipping it.

    Returns:
        The examples in source order and ``{reason: count}`` of the skipped rows.

    Raises:
        DataError: no sources, a bad row when strict (message ``file:line: reason (detail)``),
            a column missing from a whole file, or no usable row at all.
    """
    if not sources:
        raise DataError("data.train_files is empty; give at least one .jsonl/.parquet file or dataset id")
    keys = (problem_key, solution_key)
    examples: list[ProblemExample] = []
    skipped: collections.Counter[str] = collections.Counter()
    for source in sources:
        for where, row in _read_source(source, keys):
            checked = _check_row(row, problem_key, solution_key)
            if isinstance(checked, _Bad):
                if strict:
                    raise DataError(
                        f"{where}: {checked.reason} ({checked.detail}); fix the row or set strict off"
                    )
                skipped[checked.reason] += 1
                continue
            examples.append(ProblemExample(example_id=where, problem=checked[0], solution=checked[1]))
    if not examples:
        counts = ", ".join(f"{reason}={n}" for reason, n in sorted(skipped.items())) or "no rows"
        raise DataError(
            f"no usable examples in {', '.join(sources)} ({counts}); "
            f"check data.problem_key={problem_key!r} and data.solution_key={solution_key!r}"
        )
    return LoadedExamples(examples=examples, skipped=dict(sorted(skipped.items())))


# ----------------------------------------------------------------------------- iteration


class ProblemDataset:
    """Examples served in a seeded order per epoch, from a resumable ``(epoch, index)`` position.

    Args:
        examples: the usable examples (from ``load_examples``).
        shuffle: visit each epoch in a seeded random order (else in source order).
        shuffle_seed: the seed; epoch ``e`` uses the order drawn from ``(shuffle_seed, e)``, so
            the order of any epoch is known without replaying the earlier ones.
    """

    def __init__(self, examples: Sequence[ProblemExample], *, shuffle: bool = True, shuffle_seed: int = 0):
        if not examples:
            raise DataError("ProblemDataset needs at least one example")
        self.examples = list(examples)
        self.shuffle = shuffle
        self.shuffle_seed = shuffle_seed
        self.epoch = 0
        self.index = 0  # position inside the current epoch's order
        self._order_epoch = -1
        self._order: np.ndarray = np.arange(0)
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Indices of ``examples`` in the order epoch ``epoch`` visits them."""
        if not self.shuffle:
            return np.arange(len(self.examples))
        return np.random.default_rng([self.shuffle_seed, epoch]).permutation(len(self.examples))

    def _current_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order, self._order_epoch = self.epoch_order(self.epoch), self.epoch
        return self._order

    def next_example(self) -> ProblemExample:
        """The next example; wraps to the next epoch (new order) at the end of one."""
        if self.index >= len(self.examples):
            self.epoch, self.index = self.epoch + 1, 0
        example = self.examples[int(self._current_order()[self.index])]
        self.index += 1
        return example

    def next_examples(self, count: int) -> list[ProblemExample]:
        """The next ``count`` examples (crossing epoch boundaries as needed)."""
        return [self.next_example() for _ in range(count)]

    def fingerprint(self) -> str:
        """A hash of the examples' text: a resumed run must see the same data."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for example in self.examples:
                for text in (example.problem, example.solution):
                    digest.update(text.encode("utf-8"))
                    digest.update(b"\0")
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def state_dict(self) -> dict[str, Any]:
        """The position plus what must match on resume (size, seed, content hash)."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "num_examples": len(self.examples),
            "shuffle": self.shuffle,
            "shuffle_seed": self.shuffle_seed,
            "fingerprint": self.fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by ``state_dict``.

        Raises:
            DataError: the saved state belongs to other data or another shuffle setting.
        """
        expected = {k: v for k, v in self.state_dict().items() if k not in ("epoch", "index")}
        for key, value in expected.items():
            if state.get(key) != value:
                raise DataError(
                    f"data position saved with {key}={state.get(key)!r} but the data now has {value!r}; "
                    "resume with the same data.train_files and shuffle settings"
                )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
