"""Every recipe dry-runs: valid config, the parallel layout, a per-GPU memory estimate, no weights.

The Qwen3 recipes point at checkpoints that are not here; their public config.json values
(sizes only) are written to a temporary directory and passed as model.hf_path.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from megaopsd.train import build_config, describe_layout, estimate_memory_gib

REPO = Path(__file__).resolve().parents[2]

QWEN3 = {
    "qwen3_1p7b": dict(
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    ),
    "qwen3_4b": dict(
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    ),
    "qwen3_8b": dict(
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
}
LAYOUTS = {
    "qwen3_1p7b": "TP 1 x PP 1 x DP 8",
    "qwen3_4b": "TP 2 x PP 1 x DP 4",
    "qwen3_8b": "TP 4 x PP 1 x DP 2",
}


def qwen3_config_dir(tmp_path: Path, recipe: str) -> Path:
    path = tmp_path / recipe
    path.mkdir()
    config = dict(
        architectures=["Qwen3ForCausalLM"],
        model_type="qwen3",
        vocab_size=151936,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        **QWEN3[recipe],
    )
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("recipe", sorted(QWEN3))
def test_qwen3_recipes_fit_an_8_gpu_node(recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "0")
    hf = qwen3_config_dir(tmp_path, recipe)
    cfg = _compose(recipe, hf)
    assert cfg.teacher.mode == "fixed" and cfg.loss.kind == "jsd" and cfg.trainer.prompts_per_step == 32
    assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k) == (1.1, 0.95, 20)
    assert cfg.model.dtype == "bfloat16"
    assert LAYOUTS[recipe] in describe_layout(cfg, 8)
    memory = estimate_memory_gib(cfg, 8)
    assert 1.0 < memory["total"] < 70.0, memory  # fits an 80 GB H100 with room for activations


def _compose(recipe: str, hf: Path):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return build_config(
            compose(config_name="config", overrides=[f"recipe={recipe}", f"model.hf_path={hf}"])
        )


@pytest.mark.parametrize("recipe", sorted(QWEN3))
def test_qwen3_lora_recipes_use_the_paper_values_and_need_less_memory(recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "0")
    hf = qwen3_config_dir(tmp_path, recipe)
    full, lora = _compose(recipe, hf), _compose(f"{recipe}_lora", hf)
    assert (lora.lora.rank, lora.lora.alpha, lora.trainer.lr) == (64, 128.0, 5e-6)
    assert len(lora.lora.target_modules) == 7 and lora.teacher.mode == "fixed"
    same = dict(lora=full.lora, trainer=full.trainer, model=full.model, checkpoint=full.checkpoint)
    assert dataclasses.replace(lora, logging=full.logging, **same) == full  # only the LoRA changes
    full_mem, lora_mem = estimate_memory_gib(full, 8), estimate_memory_gib(lora, 8)
    assert lora_mem["teacher copy"] == 0.0 and lora_mem["grads (fp32)"] < 0.1 * full_mem["grads (fp32)"]


def test_dry_run_cli_prints_layout_and_memory(tmp_path):
    hf = qwen3_config_dir(tmp_path, "qwen3_8b")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "megaopsd.train",
            "recipe=qwen3_8b",
            f"model.hf_path={hf}",
            "trainer.dry_run=true",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"WORLD_SIZE": "8", "RANK": "0", "PATH": ""},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "world size 8 = TP 4 x PP 1 x DP 2, sequence parallel" in out.stdout
    assert "GiB per GPU" in out.stdout and "total" in out.stdout


def test_tiny_cpu_recipe_is_valid_for_two_processes(tiny_qwen3, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = build_config(
            compose(config_name="config", overrides=["recipe=tiny_cpu", f"model.hf_path={tiny_qwen3}"])
        )
    assert "world size 2 = TP 1 x PP 2 x DP 1" in describe_layout(cfg, 2)
