"""Every recipe dry-runs: valid config, the parallel layout, a per-GPU memory estimate, no weights.

The Qwen3 recipes point at checkpoints that are not here; their public config.json values
(sizes only) are written to a temporary directory and passed as model.hf_path.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from megaopsd.config import ConfigError, load_config, validate
from megaopsd.dry_run import DryRunPlan, describe_layout, dry_run_report, estimate_memory_gib
from megaopsd.train import build_config
from tools.make_tiny_model import QWEN3_MOE_SHAPES, QWEN3_SHAPES, write_qwen3_config

REPO = Path(__file__).resolve().parents[2]

QWEN3 = QWEN3_SHAPES
LAYOUTS = {
    "qwen3_1p7b": "TP 1 x PP 1 x DP 8",
    "qwen3_4b": "TP 2 x PP 1 x DP 4",
    "qwen3_8b": "TP 4 x PP 1 x DP 2",
}


def qwen3_config_dir(tmp_path: Path, recipe: str) -> Path:  # a dense or MoE shape name
    return write_qwen3_config(recipe, tmp_path / recipe)


@pytest.mark.parametrize("recipe", sorted(QWEN3))
def test_qwen3_recipes_fit_an_8_gpu_node(recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "0")
    hf = qwen3_config_dir(tmp_path, recipe)
    cfg = _compose(recipe, hf)
    assert cfg.teacher.mode == "fixed" and cfg.loss.kind == "jsd" and cfg.trainer.prompts_per_step == 32
    assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k) == (1.1, 0.95, 20)
    assert cfg.model.dtype == "bfloat16"
    assert cfg.trainer.dry_run_world_size == 8  # the dry run plans the same node
    assert LAYOUTS[recipe] in describe_layout(cfg, 8)
    assert cfg.trainer.dry_run_gpu_gib == 80


GPU_RECIPES = sorted(p.stem for p in (REPO / "conf" / "recipe").glob("*.yaml") if not p.stem.endswith("_cpu"))


@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_every_gpu_recipe_fits_its_node(recipe, tmp_path):
    """The dry run's verdict for the node each recipe names (8 GPUs of 80 GB): both phases fit,
    activations of the largest microbatch the recipe allows included."""
    size = next(name for name in {**QWEN3, **QWEN3_MOE_SHAPES} if name.removeprefix("qwen3_") in recipe)
    cfg = _config(recipe, qwen3_config_dir(tmp_path, size), dry_run=True)
    assert (cfg.trainer.dry_run_world_size, cfg.trainer.dry_run_gpu_gib) == (8, 80)
    report = dry_run_report(cfg, 8)
    assert "generation: fits" in report and "training: fits" in report, report


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


def test_readme_dry_run_command_works_as_written(tmp_path):
    """The README's command, with only a config.json and no launcher variables: the recipe names
    its target (trainer.dry_run_world_size=8), so a laptop plans the 8-GPU job."""
    hf = qwen3_config_dir(tmp_path, "qwen3_8b")
    readme = (REPO / "README.md").read_text()
    command = "python -m megaopsd.train recipe=qwen3_8b model.hf_path=/models/Qwen3-8B trainer.dry_run=true"
    assert command in readme
    argv = command.replace("/models/Qwen3-8B", str(hf)).split()[1:]
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "SLURM_"))
    }
    out = subprocess.run(
        [sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "world size 8 = TP 4 x PP 1 x DP 2, sequence parallel" in out.stdout
    memory = dict(
        (line.split()[0], float(line.split()[-4]))
        for line in out.stdout.splitlines()
        if line.endswith("GiB per GPU")
    )
    assert set(memory) >= {"weights", "optimizer", "total"}, out.stdout
    expected = estimate_memory_gib(_config("qwen3_8b", hf, dry_run=True), 8)
    assert abs(memory["total"] - expected["total"]) < 0.01
    # bf16 weights of an 8B model over TP4: 36 layers + embedding + output layer, about 3.8 GiB
    assert 3.5 < memory["weights"] < 4.1, memory


def test_dry_run_without_a_target_names_the_setting(tmp_path):
    hf = qwen3_config_dir(tmp_path, "qwen3_8b")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "SLURM_"))}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "megaopsd.train",
            "recipe=qwen3_8b",
            f"model.hf_path={hf}",
            "trainer.dry_run=true",
            "trainer.dry_run_world_size=null",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 2
    assert "does not divide the world size 1" in out.stderr and "trainer.dry_run_world_size" in out.stderr


def _config(recipe: str, hf: Path, **trainer):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        raw = compose(config_name="config", overrides=[f"recipe={recipe}", f"model.hf_path={hf}"])
    data = OmegaConf.to_container(raw, resolve=True)
    data["trainer"].update(trainer)
    return load_config(data)


def test_uneven_stages_in_the_dry_run(tmp_path):
    """Qwen3-8B's 36 layers on PP8: refused evenly, planned with a lighter first stage."""
    hf = qwen3_config_dir(tmp_path, "qwen3_8b")
    cfg = _config("qwen3_8b", hf, dry_run=True)
    even = dataclasses.replace(
        cfg,
        parallel=dataclasses.replace(
            cfg.parallel,
            tensor_model_parallel_size=1,
            sequence_parallel=False,
            pipeline_model_parallel_size=8,
        ),
    )
    with pytest.raises(ConfigError, match="num_layers_in_first_pipeline_stage=1"):
        validate(even, world_size=8)
    uneven = dataclasses.replace(
        even, parallel=dataclasses.replace(even.parallel, num_layers_in_first_pipeline_stage=1)
    )
    validate(uneven, world_size=8)
    assert "layers per pipeline stage: 1 + 5 + 5 + 5 + 5 + 5 + 5 + 5" in describe_layout(uneven, 8)
    # the largest stage is the last: 5 layers and the output layer (the first has 1 + the embedding)
    plan = DryRunPlan.of(uneven, 8)
    params = plan.stage_params()
    assert max(params) == params[-1] and params[0] < params[1]


def test_tiny_cpu_recipe_is_valid_for_two_processes(tiny_qwen3, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = build_config(
            compose(config_name="config", overrides=["recipe=tiny_cpu", f"model.hf_path={tiny_qwen3}"])
        )
    assert "world size 2 = TP 1 x PP 2 x DP 1" in describe_layout(cfg, 2)


# ----------------------------------------------------------------------------- official-run recipes

OFFICIAL = {
    # recipe: (model sizes, layout, per-entry clip, teacher thinking)
    "opsd_qwen3_1p7b": ("qwen3_1p7b", "TP 1 x PP 1 x DP 8", 0.05, True),
    "opsd_qwen3_1p7b_nothink": ("qwen3_1p7b", "TP 1 x PP 1 x DP 8", 1e-6, False),
    "opsd_qwen3_4b": ("qwen3_4b", "TP 2 x PP 1 x DP 4", 0.05, True),
    "opsd_qwen3_4b_nothink": ("qwen3_4b", "TP 2 x PP 1 x DP 4", 1e-6, False),
    "opsd_qwen3_8b": ("qwen3_8b", "TP 4 x PP 1 x DP 2", 0.06, True),
    "opsd_qwen3_8b_nothink": ("qwen3_8b", "TP 4 x PP 1 x DP 2", 1e-7, False),
}


@pytest.mark.parametrize("recipe", sorted(OFFICIAL))
def test_official_run_recipes_carry_the_released_values(recipe, tmp_path, monkeypatch):
    sizes, layout, clip, teacher_thinking = OFFICIAL[recipe]
    hf = qwen3_config_dir(tmp_path, sizes)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "megaopsd.train",
            f"recipe={recipe}",
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
    assert f"world size 8 = {layout}" in out.stdout
    assert "GiB per GPU" in out.stdout and "total" in out.stdout
    assert f"forward_kl (beta 0.0, entry clip {clip:g})" in out.stdout
    print(out.stdout)  # the layout and memory estimate, visible with pytest -s
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "0")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = build_config(
            compose(config_name="config", overrides=[f"recipe={recipe}", f"model.hf_path={hf}"])
        )
    assert (cfg.loss.kind, cfg.loss.beta, cfg.loss.clip, cfg.loss.clip_mode) == (
        "forward_kl",
        0.0,
        clip,
        "entry",
    )
    assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k, cfg.loss.temperature) == (
        1.1,
        0.95,
        20,
        1.1,
    )
    assert (cfg.rollout.max_new_tokens, cfg.rollout.n) == (1024, 1)
    assert (cfg.trainer.prompts_per_step, cfg.trainer.max_steps, cfg.trainer.clip_grad) == (32, 100, 0.1)
    assert cfg.teacher.mode == "fixed" and cfg.data.prompt_style == "opsd"
    assert (cfg.data.student_enable_thinking, cfg.data.teacher_enable_thinking) == (False, teacher_thinking)
    assert cfg.data.train_files == ("data/openthoughts_math_30k_opsd.parquet",)


@pytest.mark.parametrize("recipe", sorted(OFFICIAL))
def test_official_recipes_are_the_released_runs(recipe, tmp_path, monkeypatch):
    """``<recipe>_official`` is the released run itself: the official recipe plus LoRA r 64 / alpha
    128 on every linear layer at lr 5e-6 on the local spec (LoRA refuses the TE spec); nothing
    else changes, and the dry run counts no teacher copy and adapter-sized gradients."""
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "0")
    hf = qwen3_config_dir(tmp_path, OFFICIAL[recipe][0])
    full, lora = _compose(recipe, hf), _compose(f"{recipe}_official", hf)
    assert (lora.lora.rank, lora.lora.alpha, lora.trainer.lr) == (64, 128.0, 5e-6)
    assert len(lora.lora.target_modules) == 7 and lora.model.transformer_impl == "local"
    same = dict(lora=full.lora, trainer=full.trainer, model=full.model)
    assert dataclasses.replace(lora, logging=full.logging, checkpoint=full.checkpoint, **same) == full
    assert dataclasses.replace(lora.trainer, lr=full.trainer.lr) == full.trainer
    full_mem, lora_mem = estimate_memory_gib(full, 8), estimate_memory_gib(lora, 8)
    assert lora_mem["teacher copy"] == 0.0 and lora_mem["grads (fp32)"] < 0.1 * full_mem["grads (fp32)"]


def test_pw_opsd_recipe_is_the_released_run_with_position_weights(tmp_path, monkeypatch):
    """pw_opsd_qwen3_4b: the official launcher's weights and reduction on the released OPSD run;
    nothing else changes but the step count (and the checkpoints that keep step 100)."""
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "0")
    hf = qwen3_config_dir(tmp_path, "qwen3_4b")
    base, pw = _compose("opsd_qwen3_4b_official", hf), _compose("pw_opsd_qwen3_4b", hf)
    alg = pw.algorithm
    assert alg.name == "pw_opsd"
    assert (alg.position_w_min, alg.position_tau, alg.position_s, alg.position_reduction) == (
        0.25,
        0.3,
        0.1,
        "sequence",
    )
    assert (pw.trainer.max_steps, pw.checkpoint.save_interval) == (150, 50)
    same = dataclasses.replace(
        pw,
        algorithm=base.algorithm,
        trainer=dataclasses.replace(pw.trainer, max_steps=base.trainer.max_steps),
        checkpoint=base.checkpoint,
        logging=base.logging,
    )
    assert same == base


def test_qwen3_30b_a3b_recipe_plans_one_node_and_full_parameters_on_two(tmp_path):
    """The MoE recipe: EP8 over one node of 80 GB GPUs with attention LoRA fits; full-parameter
    Adam on one node does not (the verdict says so), on two nodes with EP16 it fits."""
    hf = qwen3_config_dir(tmp_path, "qwen3_30b_a3b")
    cfg = _config("qwen3_30b_a3b", hf, dry_run=True)
    report = dry_run_report(cfg, 8)
    assert "EP 8 x expert TP 1 x expert DP 1: 16 experts per GPU; 30.5B parameters in all" in report, report
    assert "generation: fits" in report and "training: fits" in report, report
    full = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=0))
    assert "training: does not fit" in dry_run_report(full, 8)
    two_nodes = dataclasses.replace(
        full,
        parallel=dataclasses.replace(cfg.parallel, expert_model_parallel_size=16),
        teacher=dataclasses.replace(cfg.teacher, mode="current"),
    )
    report = dry_run_report(two_nodes, 16)
    assert "8 experts per GPU" in report and "training: fits" in report, report
    # the experts' Adam state is not sharded over DP (each expert lives on one GPU): the
    # optimizer is the experts' 12 bytes a parameter plus the dense part's share
    estimate = estimate_memory_gib(two_nodes, 16)
    plan = DryRunPlan.of(two_nodes, 16)
    experts = plan.stage_expert_params()[0]
    dense = plan.stage_params()[0] - experts
    assert estimate["optimizer"] == pytest.approx((experts * 12 + dense * 12 / 16) / 2**30)


# The model directories the documents' commands name, as the configs the tests write.
DOC_MODELS = {"/models/Qwen3-30B-A3B": "qwen3_30b_a3b", "/models/Qwen3-8B": "qwen3_8b"}


def test_documented_printouts_are_what_the_commands_print(tmp_path):
    """Every ``$ python -m megaopsd.train recipe=...`` block of README.md and docs/memory.md
    (dry runs and a config error) ends with what the command prints today; a ``...`` line
    stands for the lines left out. A change to the memory model fails here until they match."""
    dirs = {path: qwen3_config_dir(tmp_path / name, name) for path, name in DOC_MODELS.items()}
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "SLURM_"))
    }
    checked = []
    for doc in ("README.md", "docs/memory.md"):
        blocks = [
            b
            for b in (REPO / doc).read_text().split("```")
            if b.startswith("\n$ python -m megaopsd.train recipe=")
        ]
        for block in blocks:
            lines = block.strip().splitlines()
            command_lines = [lines[0]] + [line for line in lines[1:] if line.startswith("    ")]
            printed = lines[len(command_lines) :]
            printed = printed[1:] if printed[:1] == ["..."] else printed
            command = " ".join(line.strip().rstrip("\\") for line in command_lines).removeprefix("$ ").split()
            path = next(a.split("=", 1)[1] for a in command if a.startswith("model.hf_path="))
            argv = [a.replace(path, str(dirs[path])) for a in command[1:]]
            out = subprocess.run(
                [sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=120, env=env
            )
            text = out.stdout if out.returncode == 0 else out.stdout + out.stderr
            got = [line for line in text.replace(str(dirs[path]), path).splitlines() if line.strip()]
            assert len(printed) >= 1 and got[-len(printed) :] == printed, (
                doc,
                command_lines[0],
                "\n".join(got),
            )
            checked.append(doc)
    assert checked.count("README.md") == 4 and checked.count("docs/memory.md") == 2, checked


def test_gpu_recipes_size_the_engine_by_gpu_memory_utilization():
    """``rollout.kv_cache_gib`` sizes CPU engines only; a GPU recipe that sets it would mislead."""
    for path in sorted((REPO / "conf" / "recipe").glob("*qwen3*.yaml")):
        assert "kv_cache_gib" not in path.read_text(), path.name
