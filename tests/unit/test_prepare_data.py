"""tools/prepare_data.py on local rows: the official dataset's shape, mapped columns, bad rows, CLI.

No network: the rows below stand in for ``siyanzhao/Openthoughts_math_30k_opsd`` (the same
``problem`` / ``solution`` columns, written to a local parquet file).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from megaopsd.data.dataset import DataError, load_examples
from tools.prepare_data import DEFAULT_OUT, OFFICIAL_DATASET, prepare

REPO = Path(__file__).resolve().parents[2]
ROWS = [
    {"problem": "Find $x$ if $2x = 6$.", "solution": "Divide by 2: $x = 3$. \\boxed{3}", "source": "a"},
    {"problem": "What is $1+1$?", "solution": "$1 + 1 = 2$, so \\boxed{2}.", "source": "b"},
    {"problem": "Find $x$ if $2x = 6$.", "solution": "Halve both sides. \\boxed{3}", "source": "c"},
    {"problem": "   ", "solution": "no problem text", "source": "d"},
]


def test_official_shaped_parquet_becomes_the_recipe_file(tmp_path):
    src = tmp_path / "train-00000.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), src)
    out = tmp_path / "openthoughts_math_30k_opsd.parquet"
    counts = prepare([str(src)], out, dedupe=True)
    assert counts == {"read": 3, "written": 2, "duplicates": 1, "skipped_empty_problem": 1}
    assert pq.read_schema(out).names == ["problem", "solution"]
    loaded = load_examples([str(out)])
    assert [(e.problem, e.solution) for e in loaded.examples] == [
        (ROWS[0]["problem"], ROWS[0]["solution"]),
        (ROWS[1]["problem"], ROWS[1]["solution"]),
    ]


def test_local_jsonl_with_mapped_columns_and_strict(tmp_path):
    src = tmp_path / "mine.jsonl"
    lines = [json.dumps({"question": r["problem"], "worked": r["solution"]}) for r in ROWS]
    src.write_text("\n".join(lines) + "\nnot json\n")
    out = tmp_path / "out.jsonl"
    counts = prepare([str(src)], out, problem_key="question", solution_key="worked", limit=2)
    assert counts == {
        "read": 3,
        "written": 2,
        "duplicates": 0,
        "skipped_empty_problem": 1,
        "skipped_invalid_json": 1,
    }
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == [{"problem": r["problem"], "solution": r["solution"]} for r in ROWS[:2]]
    with pytest.raises(DataError, match=r"mine.jsonl:4: empty_problem"):
        prepare(
            [str(src)], tmp_path / "strict.jsonl", problem_key="question", solution_key="worked", strict=True
        )
    with pytest.raises(DataError, match="no column 'problem'"):
        pq.write_table(pa.Table.from_pylist([{"q": "x", "solution": "y"}]), tmp_path / "bad.parquet")
        prepare([str(tmp_path / "bad.parquet")], out)
    with pytest.raises(DataError, match="unknown file type"):
        prepare([str(src)], tmp_path / "out.csv", problem_key="question", solution_key="worked")


def test_cli_defaults_name_the_official_dataset_and_the_recipe_file(tmp_path):
    recipe = yaml.safe_load((REPO / "conf/recipe/opsd_qwen3_4b.yaml").read_text())
    assert recipe["data"]["train_files"] == [DEFAULT_OUT]
    assert OFFICIAL_DATASET == "siyanzhao/Openthoughts_math_30k_opsd"
    src = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), src)
    out = tmp_path / "data.parquet"
    done = subprocess.run(
        [sys.executable, "tools/prepare_data.py", str(src), "--out", str(out), "--dedupe"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}: read=3 written=2 duplicates=1 skipped_empty_problem=1" in done.stdout
    missing = subprocess.run(
        [sys.executable, "tools/prepare_data.py", str(tmp_path / "nope.jsonl"), "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "no such file" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
