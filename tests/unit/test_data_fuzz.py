"""Hostile data: every damaged row is skipped and counted by reason, never a traceback.

A seeded corpus of 1200+ rows (tests/data_fuzz.py) mixes every damage class with random byte
mutations of good rows; the rows a correct loader keeps are decided by re-parsing each line.
The trainer's run over the same corpus is in tests/e2e/test_hostile_data.py.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megaopsd.data.dataset import DataError, load_examples
from tests.data_fuzz import MAX_ROW_BYTES, make_fuzz_corpus

KNOWN_REASONS = {
    "invalid_utf8",
    "nul_character",
    "row_too_long",
    "invalid_json",
    "not_an_object",
    "missing_problem",
    "missing_solution",
    "non_text_problem",
    "non_text_solution",
    "empty_problem",
    "empty_solution",
    "unreadable_file",
}


def test_fuzzed_corpus_keeps_every_good_row_and_counts_every_bad_one(tmp_path):
    corpus = make_fuzz_corpus(tmp_path / "fuzz", seed=19, rows=1200)
    assert corpus.rows_written >= 1000
    loaded = load_examples([str(f) for f in corpus.files], max_row_bytes=MAX_ROW_BYTES)
    assert [(e.example_id, e.problem, e.solution) for e in loaded.examples] == corpus.good
    skipped = dict(loaded.skipped)
    assert skipped.pop("unreadable_file") == len(corpus.unreadable) == 1
    assert sum(skipped.values()) == corpus.bad_rows, skipped
    assert set(skipped) <= KNOWN_REASONS
    for reason, at_least in corpus.deliberate.items():
        assert skipped.get(reason, 0) >= at_least, (reason, skipped)
    # Both jsonl files start with a good row: the byte-order mark of the CRLF file is accepted.
    assert {e.example_id for e in loaded.examples} >= {f"{corpus.files[0]}:1", f"{corpus.files[1]}:1"}
    assert loaded.unreadable == [
        f"{corpus.unreadable[0]}: unreadable, skipped ({loaded.unreadable[0].split('(', 1)[1]}"
    ]
    assert "e.parquet" in loaded.unreadable[0]
    print(f"fuzz: {corpus.rows_written} rows, {len(corpus.good)} good, skipped {loaded.skipped}")


def test_fuzzed_corpus_in_strict_mode_names_the_first_bad_row(tmp_path):
    corpus = make_fuzz_corpus(tmp_path / "fuzz", seed=19, rows=1200)
    with pytest.raises(DataError) as err:
        load_examples([str(f) for f in corpus.files], max_row_bytes=MAX_ROW_BYTES, strict=True)
    message = str(err.value)
    assert message.startswith(f"{corpus.first_bad}: "), message
    assert "\n" not in message
    reason = message.split(": ", 2)[1].split(" ")[0]
    assert reason in KNOWN_REASONS


def test_each_damage_class_has_its_reason(tmp_path):
    good = b'{"problem": "p", "solution": "s"}'
    lines = [
        b"\xef\xbb\xbf" + good,  # 1: a byte-order mark: accepted
        b'{"problem": "caf\xe9", "solution": "s"}',  # 2: latin-1, not UTF-8
        b'{"problem": "p\x00", "solution": "s"}',  # 3: a raw NUL byte
        b'{"problem": "p\\u0000", "solution": "s"}',  # 4: an escaped NUL
        b'{"problem": "\\ud800", "solution": "s"}',  # 5: an unpaired surrogate
        b'{"problem": "' + b"x" * 200 + b'", "solution": "s"}',  # 6: over the limit
        b"[" * 60 + b"]" * 60,  # 7: valid JSON, not an object
        b"[" * 50 + b"]" * 49,  # 8: truncated
        good + b"\r",  # 9: CRLF: accepted
    ]
    path = tmp_path / "damaged.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    loaded = load_examples([str(path)], max_row_bytes=128)
    assert [e.example_id for e in loaded.examples] == [f"{path}:1", f"{path}:9"]
    assert loaded.skipped == {
        "invalid_json": 1,
        "invalid_utf8": 2,
        "not_an_object": 1,
        "nul_character": 2,
        "row_too_long": 1,
    }
    for line_no, reason in [(2, "invalid_utf8"), (3, "nul_character"), (6, "row_too_long")]:
        path.write_bytes(b"\n".join([good, lines[line_no - 1]]) + b"\n")
        with pytest.raises(DataError, match=rf"^{path}:2: {reason} \("):
            load_examples([str(path)], max_row_bytes=128, strict=True)


def test_a_line_far_over_the_limit_is_skipped_without_reading_it_whole(tmp_path):
    path = tmp_path / "huge.jsonl"
    huge = b'{"problem": "' + b"y" * (3 << 20) + b'", "solution": "s"}'
    path.write_bytes(huge + b"\n" + json.dumps({"problem": "p", "solution": "s"}).encode())  # no final \n
    loaded = load_examples([str(path)], max_row_bytes=1024)
    assert loaded.skipped == {"row_too_long": 1}
    assert [(e.example_id, e.problem) for e in loaded.examples] == [(f"{path}:2", "p")]


def test_a_corrupt_file_is_named_and_the_others_load(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"problem": ["p1", "p2"], "solution": ["s1", "s2"]}), good)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1" + bytes(range(256)) * 4)
    jsonl = tmp_path / "good.jsonl"
    jsonl.write_text('{"problem": "p3", "solution": "s3"}\n')
    loaded = load_examples([str(good), str(corrupt), str(jsonl)])
    assert [e.problem for e in loaded.examples] == ["p1", "p2", "p3"]
    assert loaded.skipped == {"unreadable_file": 1}
    assert len(loaded.unreadable) == 1 and loaded.unreadable[0].startswith(
        f"{corrupt}: unreadable, skipped ("
    )
    with pytest.raises(DataError, match=rf"^{corrupt}: unreadable_file \(.*\); repair or remove the file$"):
        load_examples([str(good), str(corrupt), str(jsonl)], strict=True)


def test_parquet_null_and_mistyped_cells_are_counted(tmp_path):
    path = tmp_path / "typed.parquet"
    table = pa.table(
        {
            "problem": pa.array(["p1", None, "p3", "p\x004"]),
            "solution": pa.array([[1], [2], None, [4]], type=pa.list_(pa.int64())),
        }
    )
    pq.write_table(table, path)
    with pytest.raises(
        DataError, match=r"\(missing_problem=1, missing_solution=1, non_text_solution=1, nul_character=1\)"
    ):
        load_examples([str(path)])
