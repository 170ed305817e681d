"""`make demo` from this checkout: the README's command, with what it promises checked.

The run is the session's ``pp2_run`` (tests/e2e/conftest.py): ``make demo`` with the fixed
prompts and 10 steps, shared with tests/e2e/test_trainer.py and tests/e2e/test_slurm.py.
"""

from __future__ import annotations

from tests.e2e.conftest import PP2_STEPS
from tests.e2e.runs import TAGS, scalars


def test_make_demo_trains_logs_checkpoints_and_exports(pp2_run):
    from transformers import AutoModelForCausalLM

    steps = list(range(1, PP2_STEPS + 1))
    assert f"step {PP2_STEPS}/{PP2_STEPS}" in pp2_run.stdout and "demo finished:" in pp2_run.stdout
    assert (pp2_run.model / "config.json").is_file()  # made by `make demo` itself
    demo = pp2_run.out
    values = scalars(demo / "tensorboard")
    for tag in TAGS:
        assert sorted(values[tag]) == steps, tag
    assert values["train/divergence"][PP2_STEPS] < values["train/divergence"][1]
    # the thinking boundary (docs/prompts.md), logged every step
    for tag in ("train/first_token_divergence", "train/first_token_teacher_think_fraction"):
        assert sorted(values[tag]) == steps, tag
    assert all(0.0 <= v <= 1.0 for v in values["train/first_token_teacher_think_fraction"].values())
    assert values["train/first_token_divergence"][1] > 0.0
    assert (demo / "checkpoints" / "latest").read_text().strip() == f"iter_{PP2_STEPS:07d}"
    assert (demo / "hydra" / ".hydra" / "config.yaml").is_file()  # resolved config next to the logs
    model = AutoModelForCausalLM.from_pretrained(demo / "hf")
    assert model.config.architectures == ["Qwen3ForCausalLM"]
    assert (demo / "hf" / "tokenizer.json").is_file()
