"""Benchmark loading from local jsonl/parquet files: registry columns, overrides, clear errors.

python -m pytest tests/unit/test_benchmarks.py      # ~2 s
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megaopsd.data.dataset import DataError
from megaopsd.eval.benchmarks import REGISTRY, load_benchmark, parse_benchmark_arg


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _parquet(path: Path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def test_registry_holds_the_paper_benchmarks():
    expected = {
        "aime24": ("HuggingFaceH4/aime_2024", "train", "problem", "answer", "id"),
        "aime25": ("yentinglin/aime_2025", "train", "problem", "answer", "id"),
        "hmmt25": ("MathArena/hmmt_feb_2025", "train", "problem", "answer", "problem_idx"),
        "math500": ("HuggingFaceH4/MATH-500", "test", "problem", "answer", "unique_id"),
    }
    got = {
        name: (s.hub_id, s.split, s.problem_column, s.answer_column, s.id_column)
        for name, s in REGISTRY.items()
    }
    assert got == expected
    with pytest.raises(TypeError):
        REGISTRY["mine"] = REGISTRY["aime24"]  # read-only


def test_jsonl_with_registry_columns(tmp_path):
    path = _jsonl(
        tmp_path / "aime.jsonl",
        [
            {"id": 60, "problem": "Find x.", "answer": 70, "url": "u"},  # numeric id and answer
            {"id": 61, "problem": "Find y.", "answer": " 009 "},
            {"id": 62, "problem": "Find z.", "answer": 12.0},
        ],
    )
    bench = load_benchmark("aime24", path)
    assert bench.name == "aime24" and bench.source == path and len(bench) == 3
    assert [(p.problem_id, p.problem, p.answer) for p in bench.problems] == [
        ("60", "Find x.", "70"),
        ("61", "Find y.", "009"),
        ("62", "Find z.", "12"),
    ]


def test_jsonl_without_id_column_uses_line_numbers(tmp_path):
    path = _jsonl(tmp_path / "b.jsonl", [{"problem": "p1", "answer": "1"}, {"problem": "p2", "answer": "2"}])
    (tmp_path / "b.jsonl").write_text((tmp_path / "b.jsonl").read_text() + "\n")  # trailing blank line
    bench = load_benchmark("mine", path)
    assert [p.problem_id for p in bench.problems] == [f"{path}:1", f"{path}:2"]
    assert len(load_benchmark("mine", path, limit=1)) == 1


def test_parquet_with_custom_columns(tmp_path):
    path = _parquet(
        tmp_path / "b.parquet",
        {"question": ["q1", "q2"], "gt": [r"\frac12", "3"], "qid": ["a", "b"], "other": [1, 2]},
    )
    bench = load_benchmark("mine", path, problem_column="question", answer_column="gt", id_column="qid")
    assert [(p.problem_id, p.problem, p.answer) for p in bench.problems] == [
        ("a", "q1", r"\frac12"),
        ("b", "q2", "3"),
    ]
    positional = load_benchmark("mine", path, problem_column="question", answer_column="gt", id_column="")
    assert [p.problem_id for p in positional.problems] == [f"{path}:1", f"{path}:2"]


def test_parquet_with_registry_columns_and_without_the_id_column(tmp_path):
    hmmt = _parquet(
        tmp_path / "hmmt.parquet", {"problem_idx": [1, 2], "problem": ["a", "b"], "answer": ["1", "2"]}
    )
    assert [p.problem_id for p in load_benchmark("hmmt25", hmmt).problems] == ["1", "2"]
    no_id = _parquet(tmp_path / "math.parquet", {"problem": ["a"], "answer": ["1"]})
    assert [p.problem_id for p in load_benchmark("math500", no_id).problems] == [f"{no_id}:1"]


def test_missing_column_is_a_clear_error(tmp_path):
    path = _jsonl(tmp_path / "b.jsonl", [{"question": "q", "answer": "1"}])
    with pytest.raises(
        DataError,
        match=rf"benchmark mine: {re.escape(path)}:1: no 'problem' field; fields are question, answer",
    ):
        load_benchmark("mine", path)
    pq_path = _parquet(tmp_path / "b.parquet", {"problem": ["q"], "solution": ["s"]})
    with pytest.raises(
        DataError, match=r"no column 'answer'; columns are problem, solution; set the problem/answer"
    ):
        load_benchmark("aime24", pq_path)
    with pytest.raises(DataError, match=r"no column 'gt'"):
        load_benchmark("aime24", pq_path, answer_column="gt")


def test_missing_file_and_unknown_name_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        load_benchmark("aime24", str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"'mine' is not registered \(aime24, aime25, hmmt25, math500\)"):
        load_benchmark("mine")


def test_bad_rows_are_errors_not_skips(tmp_path):
    cases = [
        ({"problem": "p", "answer": ""}, "'answer' is empty"),
        ({"problem": "p", "answer": None}, "'answer' is empty"),
        ({"problem": "", "answer": "1"}, "'problem' is empty"),
        ({"problem": "p", "answer": True}, "'answer' is empty or not a text/number answer"),
        ([1, 2], "not a JSON object"),
    ]
    for i, (row, message) in enumerate(cases):
        path = _jsonl(tmp_path / f"bad{i}.jsonl", [{"problem": "ok", "answer": "1"}, row])
        with pytest.raises(DataError, match=rf"{re.escape(path)}:2: .*{message}"):
            load_benchmark("mine", path)
    (tmp_path / "broken.jsonl").write_text('{"problem": "a", "answer": "1"}\n{not json\n')
    with pytest.raises(DataError, match=r"broken\.jsonl:2: unusable row"):
        load_benchmark("mine", str(tmp_path / "broken.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no problems"):
        load_benchmark("mine", str(tmp_path / "empty.jsonl"))


def test_duplicate_ids_are_an_error(tmp_path):
    path = _jsonl(
        tmp_path / "b.jsonl",
        [{"id": 1, "problem": "a", "answer": "1"}, {"id": 1, "problem": "b", "answer": "2"}],
    )
    with pytest.raises(DataError, match="id '1' appears twice in column 'id'"):
        load_benchmark("mine", path)
    assert len(load_benchmark("mine", path, id_column="")) == 2


def test_parse_benchmark_arg():
    assert parse_benchmark_arg("aime24") == ("aime24", None)
    assert parse_benchmark_arg("aime24=/data/a=b.jsonl") == ("aime24", "/data/a=b.jsonl")
    for bad in ("", "=x.jsonl", "aime24="):
        with pytest.raises(DataError, match="use NAME"):
            parse_benchmark_arg(bad)


def test_hub_path_with_and_without_the_id_column(monkeypatch):
    """The hub branch, offline: ``datasets.load_dataset`` answers with an in-memory dataset."""
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        columns = {"problem": ["p1", "p2"], "answer": ["1", "2"], "solution": ["s1", "s2"]}
        if name == "HuggingFaceH4/aime_2024":
            columns["id"] = [60, 61]
        return datasets.Dataset.from_dict(columns)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    aime24 = load_benchmark("aime24")
    assert aime24.source == "HuggingFaceH4/aime_2024:train"
    assert [(p.problem_id, p.answer) for p in aime24.problems] == [("60", "1"), ("61", "2")]
    # a hub copy without the optional id column: row positions
    math500 = load_benchmark("math500")
    assert [p.problem_id for p in math500.problems] == [
        "HuggingFaceH4/MATH-500[1]",
        "HuggingFaceH4/MATH-500[2]",
    ]
    assert ("HuggingFaceH4/MATH-500", "test") in calls
    with pytest.raises(DataError, match="no column 'question'"):
        load_benchmark("aime25", problem_column="question")
