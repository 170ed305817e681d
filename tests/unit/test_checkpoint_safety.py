"""Checkpoint files from elsewhere: nothing unpickled, damage found before a load, fallbacks named.

Pickle payloads here create a marker file when unpickled; every test asserts the marker never
appears. The trainer runs over real damaged checkpoints are in tests/e2e/test_checkpoint_damage.py.
"""

from __future__ import annotations

import io
import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from megaopsd.checkpoint import (
    FORMAT_VERSION,
    LATEST,
    MANIFEST_FILE,
    STATE_FILE,
    CheckpointError,
    _write_manifest,
    find_latest,
    find_resumable,
    verify_checkpoint,
)
from megaopsd.convert.safe_load import (
    UnsafeCheckpointError,
    _common_strategy,
    _safe_load_bytes,
    read_metadata_safely,
)
from megaopsd.runtime.rng import load_rng_file, save_rng_file


class MarkerPayload:
    """Unpickling this opens (creates) ``path``: what a hostile checkpoint file would do."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_rng_state_round_trips_through_safetensors(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    random.random(), np.random.rand(), torch.rand(1)  # advance every generator
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": None,
        "tracker": {
            "model-parallel-rng": torch.get_rng_state(),
            "data-parallel-rng": torch.zeros(8, dtype=torch.uint8),
        },
    }
    expected = (random.random(), np.random.rand(), torch.rand(3))
    save_rng_file(state, tmp_path / "rank_00000.safetensors")
    loaded = load_rng_file(tmp_path / "rank_00000.safetensors")
    random.setstate(loaded["python"])
    np.random.set_state(loaded["numpy"])
    torch.set_rng_state(loaded["torch"])
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])
    assert loaded["cuda"] is None
    assert sorted(loaded["tracker"]) == ["data-parallel-rng", "model-parallel-rng"]
    assert torch.equal(loaded["tracker"]["model-parallel-rng"], state["tracker"]["model-parallel-rng"])


def test_a_pickle_in_place_of_the_rng_file_is_refused_unrun(tmp_path):
    marker = tmp_path / "pwned"
    rng = tmp_path / "rank_00000.safetensors"
    rng.write_bytes(pickle.dumps(MarkerPayload(marker)))
    with pytest.raises(ValueError, match=r"rank_00000.safetensors is not an RNG state file"):
        load_rng_file(rng)
    torch.save(MarkerPayload(marker), rng)  # torch.save's zip-wrapped pickle
    with pytest.raises(ValueError, match=r"is not an RNG state file"):
        load_rng_file(rng)
    assert not marker.exists()


def test_dist_checkpoint_pickles_go_through_allow_lists(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"state_dict_metadata": MarkerPayload(marker)})
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to unpickle (builtins|io)\.open"):
        read_metadata_safely(io.BytesIO(payload))
    torch.save({"scheduler": MarkerPayload(marker)}, tmp_path / "common.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        _common_strategy().load_common(tmp_path)
    blob = io.BytesIO()
    torch.save(MarkerPayload(marker), blob)
    blob.seek(0)

    class Planner:  # the two attributes DefaultLoadPlanner.load_bytes reads
        flatten_state_dict = False

        def __init__(self):
            self.state_dict = {}

    class Item:
        class dest_index:
            fqn = "x"

    with pytest.raises(pickle.UnpicklingError):
        _safe_load_bytes(Planner(), Item(), blob)
    assert not marker.exists()
    # What torch_dist really writes still loads: plain metadata classes and tensors.
    from torch.distributed.checkpoint.metadata import Metadata, TensorProperties, TensorStorageMetadata

    real = Metadata(
        state_dict_metadata={"w": TensorStorageMetadata(TensorProperties(torch.float32), torch.Size([2]), [])}
    )
    assert read_metadata_safely(io.BytesIO(pickle.dumps(real))) == real


# ----------------------------------------------------------------------------- damage and fallback


def fake_checkpoint(root: Path, step: int, *, version: int = FORMAT_VERSION) -> Path:
    """A directory with the files a torch_dist checkpoint of ours has, and its manifest."""
    path = root / f"iter_{step:07d}"
    (path / "rng").mkdir(parents=True)
    for name, size in ((".metadata", 300), ("metadata.json", 50), ("common.pt", 90), ("__0_0.distcp", 4000)):
        (path / name).write_bytes(b"x" * size)
    (path / "rng" / "rank_00000.safetensors").write_bytes(b"r" * 64)
    state = {"step": step, **({"format_version": version} if version > 1 else {})}
    (path / STATE_FILE).write_text(json.dumps(state))
    if version >= 2:
        _write_manifest(path)
    (root / LATEST).write_text(path.name)
    return path


def test_verify_finds_truncated_missing_and_unlisted_damage(tmp_path):
    path = fake_checkpoint(tmp_path, 4)
    assert verify_checkpoint(path) is None
    (path / "__0_0.distcp").write_bytes(b"x" * 1000)
    assert verify_checkpoint(path) == "__0_0.distcp has 1000 bytes, 4000 when saved"
    (path / "__0_0.distcp").unlink()
    assert verify_checkpoint(path) == "__0_0.distcp is missing"
    other = fake_checkpoint(tmp_path, 5)
    (other / MANIFEST_FILE).unlink()
    assert verify_checkpoint(other) == "manifest.json is missing or unreadable"
    (other / STATE_FILE).write_text("{garbage")
    assert verify_checkpoint(other) == "trainer_state.json is missing or unreadable"
    legacy = fake_checkpoint(tmp_path, 6, version=1)  # before manifests: presence only
    assert verify_checkpoint(legacy) is None
    (legacy / "common.pt").unlink()
    assert verify_checkpoint(legacy) == "common.pt is missing or empty"
    assert verify_checkpoint(tmp_path / "iter_0000099") == "missing"


def test_resume_passes_over_damaged_checkpoints_and_names_both(tmp_path):
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step)
    assert find_resumable(tmp_path) == ([tmp_path / f"iter_{s:07d}" for s in (6, 4, 2)], [])
    (tmp_path / "iter_0000006" / "__0_0.distcp").write_bytes(b"")  # truncated
    complete, warnings = find_resumable(tmp_path)
    assert complete[0].name == "iter_0000004"
    assert warnings == [
        "damaged checkpoint iter_0000006: __0_0.distcp has 0 bytes, 4000 when saved; "
        "resuming from iter_0000004 instead"
    ]
    (tmp_path / LATEST).write_bytes(b"\x00\xffgarbage")
    complete, warnings = find_resumable(tmp_path)
    assert complete[0].name == "iter_0000004"
    assert (
        warnings[0]
        == f"{tmp_path / LATEST} holds b'\\x00\\xffgarbage', not a checkpoint name; looking for the newest complete checkpoint"
    )
    (tmp_path / LATEST).write_text("iter_0000008")  # names a directory that is not there
    assert find_resumable(tmp_path)[1][0] == (
        "damaged checkpoint iter_0000008 (named by latest) is missing; resuming from iter_0000004 instead"
    )
    (tmp_path / LATEST).write_text("iter_0000002\n")  # newer directories: an abandoned future
    assert find_resumable(tmp_path) == ([tmp_path / "iter_0000002"], [])
    (tmp_path / LATEST).unlink()
    complete, warnings = find_resumable(tmp_path)
    assert complete[0].name == "iter_0000004" and warnings[0].startswith("no ")


def test_nothing_complete_is_one_line_naming_the_path_and_the_fix(tmp_path):
    assert find_latest(tmp_path) is None  # empty: a fresh start
    path = fake_checkpoint(tmp_path, 3)
    (path / "common.pt").unlink()
    with pytest.raises(CheckpointError) as err:
        find_resumable(tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        f"{tmp_path}: no complete checkpoint to resume from (iter_0000003: common.pt is missing)"
    )
    assert message.endswith("or set checkpoint.resume=false")


def test_no_code_path_unpickles_from_disk_or_trusts_remote_code():
    """A regression guard over megaopsd/ and tools/: the loaders above are the only way in."""
    import re

    root = Path(__file__).resolve().parents[2]
    pattern = re.compile(r"weights_only\s*=\s*False|pickle\.loads?\(|\bUnpickler\(\)|trust_remote_code")
    offenders = [
        f"{path.relative_to(root)}:{number}: {line.strip()}"
        for folder in ("megaopsd", "tools")
        for path in sorted((root / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert offenders == []
