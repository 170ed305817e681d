"""tools/convert_checkpoint.py end to end: import at TP2 (torchrun), export in one process,
resharded loading at TP1 x PP2, and the error messages.

The TP2 import of the tied qwen3 model is done once per module (about 20 s on 2 cores).
Every command runs with a marker in its environment; afterwards no process carrying the
marker may be alive (torch_dist saving starts a Manager process that must not be orphaned).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from tests.dist_harness import run_ranks

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "convert_checkpoint.py"
BIN = Path(sys.executable).parent


def _marked_env(marker: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MEGAOPSD_TEST_MARKER": marker}


def _processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker.encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def run_cli(*args: str, nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the converter (under torchrun when ``nproc`` > 1) and check nothing is left running."""
    marker = uuid.uuid4().hex
    if nproc > 1:
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(nproc), str(SCRIPT), *args]
    else:
        cmd = [sys.executable, str(SCRIPT), *args]
    result = subprocess.run(
        cmd, env=_marked_env(marker), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    leftover = _processes_with(marker)
    assert leftover == [], f"processes left behind by {args[0]}: {leftover}"
    return result


@pytest.fixture(scope="module")
def tp2_checkpoint(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "qwen3-tp2"
    result = run_cli(
        "import-hf",
        "--hf-dir",
        str(tiny_models["qwen3"]),
        "--out",
        str(out),
        "--tp",
        "2",
        "--pp",
        "1",
        nproc=2,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_import_writes_self_describing_checkpoint(tp2_checkpoint, tiny_models):
    names = {p.name for p in tp2_checkpoint.iterdir()}
    assert {
        "metadata.json",
        "common.pt",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "megaopsd.json",
    } <= names
    assert not any(n.endswith(".safetensors") for n in names)
    manifest = json.loads((tp2_checkpoint / "megaopsd.json").read_text())
    assert manifest["saved_layout"] == {"tp": 2, "pp": 1} and manifest["dtype"] == "float32"
    assert (tp2_checkpoint / "config.json").read_text() == (tiny_models["qwen3"] / "config.json").read_text()


def test_export_single_process_is_bit_exact(tp2_checkpoint, tiny_models, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("left over from an earlier run")
    refused = run_cli("export-hf", "--ckpt", str(tp2_checkpoint), "--out", str(out))
    assert refused.returncode == 2 and "--force" in refused.stderr and "not empty" in refused.stderr

    result = run_cli("export-hf", "--ckpt", str(tp2_checkpoint), "--out", str(out), "--force")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "stale.txt").exists()
    original = load_file(str(tiny_models["qwen3"] / "model.safetensors"))
    exported = load_file(str(out / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[name], original[name]) for name in original)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (tiny_models["qwen3"] / name).read_bytes(), name


def reshard_worker(
    ckpt: Path, model_dir: Path, input_ids: torch.Tensor, reference: torch.Tensor
) -> dict | None:
    """At TP1 x PP2: logits after loading the TP2 checkpoint vs after importing HF directly."""
    from megaopsd.config import ParallelConfig, RuntimeConfig
    from megaopsd.convert import load_model_checkpoint
    from megaopsd.runtime import Runtime
    from tests.distributed.test_model_parity import megatron_logits

    runtime = Runtime.start(ParallelConfig(pipeline_model_parallel_size=2), RuntimeConfig())
    try:
        resharded = megatron_logits(
            runtime, model_dir, input_ids, load=lambda chunks: load_model_checkpoint(chunks, ckpt)
        )
        direct = megatron_logits(runtime, model_dir, input_ids)
        if resharded is None:
            return None
        return {
            "equal": torch.equal(resharded, direct),
            "hf_diff": (resharded - reference).abs().max().item(),
        }
    finally:
        runtime.shutdown()


def test_tp2_checkpoint_loads_at_pp2_with_equal_logits(tp2_checkpoint, tiny_models):
    from tests.distributed.test_model_parity import hf_logits, make_batch

    input_ids = make_batch(549, seed=7)
    reference = hf_logits(tiny_models["qwen3"], input_ids)
    results = run_ranks(
        reshard_worker, world_size=2, args=(tp2_checkpoint, tiny_models["qwen3"], input_ids, reference)
    )
    last = results[1]
    assert last["equal"], "logits from the resharded checkpoint differ from a direct import at PP2"
    assert last["hf_diff"] <= 1e-4


def test_missing_directory_is_reported(tmp_path):
    result = run_cli("import-hf", "--hf-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "nope: no such directory" in result.stderr


def test_unknown_architecture_lists_supported(tiny_models, tmp_path):
    model_dir = tmp_path / "mistral"
    shutil.copytree(tiny_models["llama"], model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (model_dir / "config.json").write_text(json.dumps(config))
    result = run_cli("import-hf", "--hf-dir", str(model_dir), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "unsupported architecture 'MistralForCausalLM'" in result.stderr
    for name in ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM"):
        assert name in result.stderr


def test_tp_that_does_not_divide_heads_is_refused(tiny_models, tmp_path):
    result = run_cli(
        "import-hf", "--hf-dir", str(tiny_models["qwen2"]), "--out", str(tmp_path / "out"), "--tp", "3"
    )
    assert result.returncode == 2
    assert "does not divide num_attention_heads=4" in result.stderr


def test_missing_checkpoint_files_are_reported(tiny_models, tmp_path):
    result = run_cli("export-hf", "--ckpt", str(tiny_models["qwen3"]), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "missing metadata.json" in result.stderr


def test_uneven_stages_import_and_export_reshard_bit_exact(tiny_qwen3_3layers, tmp_path):
    """3 layers saved at PP2 as 2 + 1, loaded at PP2 as 1 + 2 for export: every tensor bit for bit."""
    from safetensors.torch import load_file

    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    refused = run_cli("import-hf", "--hf-dir", str(tiny_qwen3_3layers), "--out", str(ckpt), "--pp", "2")
    assert refused.returncode == 2
    assert "--last-stage-layers=2" in refused.stderr and "num_hidden_layers=3" in refused.stderr
    imported = run_cli(
        "import-hf",
        *("--hf-dir", str(tiny_qwen3_3layers), "--out", str(ckpt), "--pp", "2"),
        *("--first-stage-layers", "2"),
        nproc=2,
    )
    assert imported.returncode == 0, imported.stderr[-3000:]
    manifest = json.loads((ckpt / "megaopsd.json").read_text())
    assert manifest["saved_layout"] == {"tp": 1, "pp": 2, "first_stage_layers": 2}
    exported = run_cli(
        "export-hf", "--ckpt", str(ckpt), "--out", str(out), "--pp", "2", "--last-stage-layers", "2", nproc=2
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    original = load_file(str(tiny_qwen3_3layers / "model.safetensors"))
    written = load_file(str(out / "model.safetensors"))
    assert sorted(written) == sorted(original) and any(".layers.2." in n for n in written)
    assert all(torch.equal(written[name], original[name]) for name in original)


def test_moe_import_at_ep2_exports_bit_exact_at_ep1(tiny_qwen3_moe, tmp_path):
    """The tiny Qwen3-MoE imported at EP2 (each rank reads and saves only its own experts),
    exported in one process (EP1): every tensor equals the source bit for bit."""
    from safetensors.torch import load_file

    ckpt, hf = tmp_path / "ep2", tmp_path / "hf"
    result = run_cli("import-hf", "--hf-dir", str(tiny_qwen3_moe), "--out", str(ckpt), "--ep", "2", nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((ckpt / "megaopsd.json").read_text())["saved_layout"]["ep"] == 2
    result = run_cli("export-hf", "--ckpt", str(ckpt), "--out", str(hf))
    assert result.returncode == 0, result.stderr[-3000:]
    source, exported = (
        load_file(str(tiny_qwen3_moe / "model.safetensors")),
        load_file(str(hf / "model.safetensors")),
    )
    assert sorted(exported) == sorted(source)
    assert [n for n, t in source.items() if not torch.equal(exported[n], t)] == []
    refused = run_cli("import-hf", "--hf-dir", str(tiny_qwen3_moe), "--out", str(tmp_path / "x"), "--ep", "3")
    assert refused.returncode == 2 and "--ep 3 does not fit the model (num_experts=8)" in refused.stderr
