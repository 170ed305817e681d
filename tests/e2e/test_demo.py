"""`make demo` from this checkout: the README's command, with what it promises checked."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_make_demo_trains_logs_checkpoints_and_exports():
    from transformers import AutoModelForCausalLM

    from tests.e2e.test_trainer import TAGS, scalars

    out = subprocess.run(["make", "demo"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "step 8/8" in out.stdout and "demo finished:" in out.stdout
    demo = REPO / "outputs" / "demo"
    values = scalars(demo / "tensorboard")
    for tag in TAGS:
        assert sorted(values[tag]) == list(range(1, 9)), tag
    assert values["train/divergence"][8] < values["train/divergence"][1]
    # the thinking boundary (docs/prompts.md), logged every step
    for tag in ("train/first_token_divergence", "train/first_token_teacher_think_fraction"):
        assert sorted(values[tag]) == list(range(1, 9)), tag
    assert all(0.0 <= v <= 1.0 for v in values["train/first_token_teacher_think_fraction"].values())
    assert values["train/first_token_divergence"][1] > 0.0
    assert (demo / "checkpoints" / "latest").read_text().strip() == "iter_0000008"
    model = AutoModelForCausalLM.from_pretrained(demo / "hf")
    assert model.config.architectures == ["Qwen3ForCausalLM"]
    assert (demo / "hf" / "tokenizer.json").is_file()
