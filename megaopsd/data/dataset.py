"""Problems and reference solutions: loading, validation, seeded shuffling and a resumable position.

Sources are local ``.jsonl``/``.json`` (one JSON object per line) or ``.parquet`` files, or a
Hugging Face dataset id (``owner/name`` or ``owner/name:split``, loaded through ``datasets``
when the hub is reachable) for anything that is not an existing path.

Bad rows are skipped and counted per reason, or, with ``strict=True``, rejected with the file
and the 1-based line (or row) number of the first one. Reasons: ``invalid_utf8`` (bytes that are
not UTF-8, or text with an unpaired surrogate escape), ``nul_character``, ``row_too_long`` (over
``max_row_bytes``), ``invalid_json``, ``not_an_object``, ``missing_``/``non_text_``/``empty_``
``problem``/``solution``. A UTF-8 byte-order mark at the start of a file and CRLF line ends are
accepted. A file that cannot be read at all (a corrupt parquet file, no permission) is named and
counted as ``unreadable_file`` while the other sources still load. A column that is missing from
a whole parquet file or dataset is a configuration error and always raises.

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
from typing import Any, BinaryIO

import numpy as np

from megaopsd.config import DataConfig

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
    unreadable: list[str] = dataclasses.field(default_factory=list)  # "path: why", per skipped file


# ----------------------------------------------------------------------------- reading


BOM = b"\xef\xbb\xbf"  # what Windows editors put at the start of a UTF-8 file


@dataclasses.dataclass(frozen=True)
class _TooLong:
    size: int  # bytes in the line, terminator excluded


def _raw_lines(handle: BinaryIO, limit: int) -> Iterator[bytes | _TooLong]:
    """Lines without their LF / CRLF ending; a line over ``limit`` bytes is never held whole."""
    while True:
        chunk = handle.readline(limit + 2)  # room for the limit plus CRLF
        if not chunk:
            return
        if len(chunk) == limit + 2 and not chunk.endswith(b"\n"):  # longer still: skip to its end
            size = len(chunk)
            while True:
                rest = handle.readline(1 << 20)
                size += len(rest)
                if not rest or rest.endswith(b"\n"):
                    break
            yield _TooLong(size - rest.endswith(b"\n"))
            continue
        line = chunk[:-1] if chunk.endswith(b"\n") else chunk
        line = line[:-1] if line.endswith(b"\r") else line
        yield _TooLong(len(line)) if len(line) > limit else line


def _parse_line(raw: bytes) -> Any:
    """The JSON value of one line, or a ``_Bad`` saying why there is none."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return _Bad("invalid_utf8", f"byte 0x{raw[err.start]:02x} at column {err.start + 1} is not UTF-8")
    if "\0" in text:
        return _Bad("nul_character", f"a NUL character at column {text.index(chr(0)) + 1}")
    try:
        return json.loads(text)
    # ValueError: JSONDecodeError and Python's digit limit on huge integers; RecursionError: deep nesting
    except (ValueError, RecursionError) as err:
        return _Bad("invalid_json", (str(err).splitlines() or [type(err).__name__])[0][:200])


def _read_jsonl(path: Path, max_row_bytes: int) -> Iterator[tuple[str, Any]]:
    """Yield ``(path:line, parsed object)``; an unusable line yields a ``_Bad`` marker."""
    with path.open("rb") as handle:  # bytes: a non-UTF-8 line is one bad row, not a crash
        for line_no, raw in enumerate(_raw_lines(handle, max_row_bytes), start=1):
            where = f"{path}:{line_no}"
            if isinstance(raw, _TooLong):
                detail = f"{raw.size} bytes, over data.max_row_bytes={max_row_bytes}"
                yield where, _Bad("row_too_long", detail)
                continue
            if line_no == 1 and raw.startswith(BOM):
                raw = raw[len(BOM) :]
            if not raw.strip():
                continue  # blank lines (a trailing newline) are not rows
            yield where, _parse_line(raw)


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
    """A Hugging Face dataset, ``NAME`` or ``NAME:split`` (default split ``train``): a hub id
    ``owner/name``, or a local directory in the hub's layout (a downloaded dataset repository:
    ``data/train-*.parquet`` and the like), read by ``datasets.load_dataset``."""
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


def _read_source(
    source: str, keys: Sequence[str], max_row_bytes: int = DataConfig.max_row_bytes
) -> Iterator[tuple[str, Any]]:
    path = Path(source)
    if Path(source.partition(":")[0]).is_dir():  # a dataset repository on disk (hub layout)
        return _read_hub(source, keys)
    if path.is_file():
        if path.suffix in JSONL_SUFFIXES:
            return _read_jsonl(path, max_row_bytes)
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


class _UnreadableFile(Exception):
    """A source whose bytes cannot be read as its format at all (one line: the reader's error)."""


def _source_rows(source: str, keys: Sequence[str], max_row_bytes: int) -> list[tuple[str, Any]]:
    """All rows of one source, read completely before any is used: a file loads whole or not at all."""
    try:
        return list(_read_source(source, keys, max_row_bytes))
    except DataError:
        raise  # configuration errors (no such file, missing column) are not damage
    # OSError: permissions, a directory, an I/O error; the rest: pyarrow's open-ended error set
    # for a corrupt or truncated parquet file (ArrowInvalid, ArrowNotImplementedError, ...).
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise _UnreadableFile(f"{type(err).__name__}: {first_line}") from err


# ----------------------------------------------------------------------------- validation


@dataclasses.dataclass(frozen=True)
class _Bad:
    reason: str
    detail: str


def _text_problem(role: str, key: str, value: str) -> _Bad | None:
    """Text that parses but would break later: tokenizers and C libraries choke on these."""
    if "\0" in value:
        return _Bad("nul_character", f"{key!r} holds a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # an escaped lone surrogate such as "\\ud800"
        return _Bad(
            "invalid_utf8", f"{key!r} holds an unpaired surrogate at {err.start}, which has no UTF-8 form"
        )
    if not value.strip():
        return _Bad(f"empty_{role}", f"{key!r} is empty")
    return None


def _check_row(row: Any, problem_key: str, solution_key: str, max_row_bytes: int) -> tuple[str, str] | _Bad:
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
        if (bad := _text_problem(role, key, value)) is not None:
            return bad
        values.append(value)
    size = sum(len(v.encode("utf-8")) for v in values)
    if size > max_row_bytes:  # parquet and hub rows; a jsonl line over the limit is caught unread
        return _Bad("row_too_long", f"{size} bytes of text, over data.max_row_bytes={max_row_bytes}")
    return values[0], values[1]


def load_examples(
    sources: Sequence[str],
    *,
    problem_key: str = "problem",
    solution_key: str = "solution",
    strict: bool = False,
    max_row_bytes: int = DataConfig.max_row_bytes,
) -> LoadedExamples:
    """Read every source, keep the usable rows and count the others per reason.

    Args:
        sources: local files (``.jsonl``, ``.json`` lines, ``.parquet``), Hugging Face ids, or dataset
            repositories on disk (a directory in the hub layout), each optionally ``:split``.
        problem_key: the column holding the problem.
        solution_key: the column holding the reference solution.
        strict: raise on the first bad row (or unreadable file) instead of skipping it.
        max_row_bytes: longest usable line (jsonl) or problem + solution text (parquet, hub).

    Returns:
        The examples in source order, ``{reason: count}`` of the skipped rows (plus
        ``unreadable_file``: files skipped whole) and one line per skipped file.

    Raises:
        DataError: no sources, a bad row when strict (message ``file:line: reason (detail)``),
            a column missing from a whole file, or no usable row at all.
    """
    if not sources:
        raise DataError("data.train_files is empty; give at least one .jsonl/.parquet file or dataset id")
    keys = (problem_key, solution_key)
    examples: list[ProblemExample] = []
    skipped: collections.Counter[str] = collections.Counter()
    unreadable: list[str] = []
    for source in sources:
        try:
            rows = _source_rows(source, keys, max_row_bytes)
        except _UnreadableFile as err:
            if strict:
                raise DataError(f"{source}: unreadable_file ({err}); repair or remove the file") from err
            skipped["unreadable_file"] += 1
            unreadable.append(f"{source}: unreadable, skipped ({err})")
            continue
        for where, row in rows:
            checked = _check_row(row, problem_key, solution_key, max_row_bytes)
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
    return LoadedExamples(examples=examples, skipped=dict(sorted(skipped.items())), unreadable=unreadable)


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
