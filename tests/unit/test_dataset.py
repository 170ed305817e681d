"""Problem/solution loading, bad-row accounting, seeded epochs and an exactly resumable position."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megaopsd.config import DataConfig
from megaopsd.data.dataset import DataError, ProblemDataset, ProblemExample, load_examples
from tools.make_demo_data import make_examples, write_demo_data


def _write_jsonl(path, rows):
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _examples(n):
    return [ProblemExample(example_id=f"f:{i}", problem=f"p{i}", solution=f"s{i}") for i in range(n)]


def test_jsonl_and_parquet_load_in_source_order(tmp_path):
    jsonl = _write_jsonl(tmp_path / "a.jsonl", [{"problem": "p1", "solution": "s1", "extra": 3}])
    table = pa.table({"problem": ["p2", "p3"], "solution": ["s2", "s3"], "other": [1, 2]})
    pq.write_table(table, tmp_path / "b.parquet")
    loaded = load_examples([str(jsonl), str(tmp_path / "b.parquet")])
    assert [(e.problem, e.solution) for e in loaded.examples] == [("p1", "s1"), ("p2", "s2"), ("p3", "s3")]
    assert [e.example_id for e in loaded.examples] == [
        f"{jsonl}:1",
        f"{tmp_path / 'b.parquet'}:1",
        f"{tmp_path / 'b.parquet'}:2",
    ]
    assert loaded.skipped == {}


def test_custom_column_names(tmp_path):
    jsonl = _write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer_text": "a"}])
    pq.write_table(pa.table({"question": ["q2"], "answer_text": ["a2"]}), tmp_path / "b.parquet")
    loaded = load_examples(
        [str(jsonl), str(tmp_path / "b.parquet")], problem_key="question", solution_key="answer_text"
    )
    assert [(e.problem, e.solution) for e in loaded.examples] == [("q", "a"), ("q2", "a2")]
    with pytest.raises(DataError, match="no column 'problem'; columns are question, answer_text"):
        load_examples([str(tmp_path / "b.parquet")])


BAD_ROWS = [
    {"problem": "good 1", "solution": "s"},
    "{not json",
    '["a", "list"]',
    {"solution": "s"},
    {"problem": "p", "solution": "   "},
    {"problem": 42, "solution": "s"},
    "",
    {"problem": "good 2", "solution": "s"},
    {"problem": "p", "solution": None},
    {"problem": "", "solution": "s"},
]


def test_bad_rows_are_skipped_and_counted_by_reason(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    loaded = load_examples([str(path)])
    assert [e.problem for e in loaded.examples] == ["good 1", "good 2"]
    assert [e.example_id for e in loaded.examples] == [f"{path}:1", f"{path}:8"]
    assert loaded.skipped == {
        "empty_problem": 1,
        "empty_solution": 1,
        "invalid_json": 1,
        "missing_problem": 1,
        "missing_solution": 1,
        "non_text_problem": 1,
        "not_an_object": 1,
    }


def test_bad_parquet_values_are_counted(tmp_path):
    pq.write_table(
        pa.table({"problem": ["p", None, " "], "solution": ["s", "s", "s"]}), tmp_path / "b.parquet"
    )
    loaded = load_examples([str(tmp_path / "b.parquet")])
    assert len(loaded.examples) == 1
    assert loaded.skipped == {"empty_problem": 1, "missing_problem": 1}


def test_strict_mode_names_the_file_and_first_bad_line(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS)
    with pytest.raises(DataError, match=rf"^{path}:2: invalid_json \("):
        load_examples([str(path)], strict=True)
    pq.write_table(pa.table({"problem": ["p", "p"], "solution": ["s", ""]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'b.parquet'}:2: empty_solution"):
        load_examples([str(tmp_path / "b.parquet")], strict=True)


def test_unusable_sources_raise(tmp_path):
    with pytest.raises(DataError, match="train_files is empty"):
        load_examples([])
    with pytest.raises(DataError, match="no such file"):
        load_examples([str(tmp_path / "missing.jsonl")])
    (tmp_path / "a.csv").write_text("problem,solution\n")
    with pytest.raises(DataError, match="unknown file type"):
        load_examples([str(tmp_path / "a.csv")])
    only_bad = _write_jsonl(tmp_path / "only_bad.jsonl", [{"q": "x", "solution": "s"}] * 3)
    with pytest.raises(DataError, match=r"no usable examples .*missing_problem=3.*problem_key='problem'"):
        load_examples([str(only_bad)])


def test_shuffle_is_seeded_and_differs_per_epoch():
    a, b = ProblemDataset(_examples(50), shuffle_seed=7), ProblemDataset(_examples(50), shuffle_seed=7)
    other = ProblemDataset(_examples(50), shuffle_seed=8)
    first_a = [e.problem for e in a.next_examples(100)]
    assert first_a == [e.problem for e in b.next_examples(100)]
    assert first_a[:50] != [e.problem for e in other.next_examples(50)]
    epoch0, epoch1 = first_a[:50], first_a[50:]
    assert sorted(epoch0) == sorted(epoch1) == sorted(f"p{i}" for i in range(50))
    assert epoch0 != epoch1
    assert np.array_equal(a.epoch_order(1), b.epoch_order(1))
    unshuffled = ProblemDataset(_examples(5), shuffle=False)
    assert [e.problem for e in unshuffled.next_examples(7)] == ["p0", "p1", "p2", "p3", "p4", "p0", "p1"]


def test_epoch_wrap_position():
    ds = ProblemDataset(_examples(10), shuffle_seed=1)
    ds.next_examples(13)
    assert (ds.epoch, ds.index) == (1, 3)
    ds.next_examples(7)
    assert (ds.epoch, ds.index) == (1, 10)  # the wrap happens when the next example is drawn
    ds.next_example()
    assert (ds.epoch, ds.index) == (2, 1)


def test_resume_sees_exactly_the_same_next_examples():
    straight = ProblemDataset(_examples(10), shuffle_seed=3)
    straight.next_examples(17)
    state = json.loads(json.dumps(straight.state_dict()))  # survives a JSON round trip
    expected = [e.example_id for e in straight.next_examples(25)]

    resumed = ProblemDataset(_examples(10), shuffle_seed=3)
    resumed.load_state_dict(state)
    assert [e.example_id for e in resumed.next_examples(25)] == expected
    assert state["epoch"] == 1 and state["index"] == 7

    with pytest.raises(DataError, match="fingerprint"):
        ProblemDataset(
            [*_examples(9), ProblemExample(example_id="x", problem="other", solution="s")], shuffle_seed=3
        ).load_state_dict(state)
    with pytest.raises(DataError, match="shuffle_seed"):
        ProblemDataset(_examples(10), shuffle_seed=4).load_state_dict(state)


def test_demo_data_is_deterministic_and_loads(tmp_path):
    path = write_demo_data(tmp_path / "demo.jsonl", count=40, seed=0)
    assert path.read_bytes() == write_demo_data(tmp_path / "again.jsonl", count=40, seed=0).read_bytes()
    loaded = load_examples(DataConfig(train_files=(str(path),)).train_files)
    assert len(loaded.examples) == 40 and loaded.skipped == {}
    for row in make_examples(40):
        assert row["solution"].endswith(f"\\boxed{{{row['answer']}}}.")


def test_a_dataset_repository_on_disk_loads_through_datasets(tmp_path):
    """The hub reader (``datasets.load_dataset``) on a local directory in the hub's layout, as a
    downloaded dataset repository has it: the default split, a named one, a missing column."""
    repo = tmp_path / "owner" / "math_opsd"
    (repo / "data").mkdir(parents=True)
    train = pa.table({"question": ["p1", "p2"], "answer": ["s1", "s2"], "source": ["a", "b"]})
    pq.write_table(train, repo / "data" / "train-00000-of-00001.parquet")
    pq.write_table(
        pa.table({"question": ["q"], "answer": ["t"]}), repo / "data" / "test-00000-of-00001.parquet"
    )
    keys = dict(problem_key="question", solution_key="answer")
    loaded = load_examples([str(repo)], **keys)
    assert [(e.problem, e.solution) for e in loaded.examples] == [("p1", "s1"), ("p2", "s2")]
    assert loaded.examples[0].example_id == f"{repo}[1]"
    assert [e.problem for e in load_examples([f"{repo}:test"], **keys).examples] == ["q"]
    with pytest.raises(DataError, match=r"math_opsd.*problem"):
        load_examples([str(repo)])  # its columns are question/answer, not problem/solution
