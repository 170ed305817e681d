"""Config: Hydra composition -> typed dataclasses -> one-line validation errors, before any process group."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from megaopsd.config import (
    LOSS_KINDS,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    default_tree,
    load_config,
    read_hf_config,
    validate,
)
from megaopsd.train import build_config  # also registers the dataclass defaults with Hydra

CONF = Path(__file__).resolve().parents[2] / "conf"
CONF_DIR = str(CONF)


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name="config", overrides=overrides)


def test_default_tree_composes_into_typed_config(tiny_qwen3, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    raw = compose_config([f"model.hf_path={tiny_qwen3}", "parallel=tp2", "loss.beta=0.25"])
    cfg = build_config(raw)
    assert isinstance(cfg, Config)
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.loss.beta == 0.25
    assert cfg.data.train_files == ("data/demo/train.jsonl",)
    assert cfg.checkpoint.dir == "outputs/tiny/checkpoints"  # interpolation resolved
    with pytest.raises(AttributeError):
        cfg.loss.beta = 0.3  # frozen


# (overrides, world size, words the one-line message must contain)
INVALID = [
    (
        ["parallel.tensor_model_parallel_size=3"],
        3,
        ["parallel.tensor_model_parallel_size=3", "num_attention_heads=4"],
    ),
    (["parallel.tensor_model_parallel_size=4"], 4, ["num_key_value_heads=2"]),
    (["parallel.tensor_model_parallel_size=2"], 3, ["does not divide the world size 3"]),
    (["parallel.pipeline_model_parallel_size=3"], 3, ["num_hidden_layers=4"]),
    (["parallel.virtual_pipeline_model_parallel_size=2"], 1, ["virtual_pipeline_model_parallel_size=2"]),
    (
        ["parallel=pp2", "parallel.virtual_pipeline_model_parallel_size=2", "trainer.prompts_per_step=3"],
        2,
        ["prompts_per_step=3", "3 rollouts per replica", "PP2 x VPP2 needs 4 microbatches", "warm-up"],
    ),
    (
        ["parallel.sequence_parallel=true"],
        1,
        ["parallel.sequence_parallel", "tensor_model_parallel_size > 1"],
    ),
    (
        ["model.dtype=bfloat16"],
        1,
        ["parallel.use_distributed_optimizer=False", "checkpoint a bfloat16 model"],
    ),
    (["loss.beta=1.5"], 1, ["loss.beta=1.5", "outside [0, 1]"]),
    (["loss.kind=kl"], 1, ["loss.kind='kl'", "jsd, forward_kl"]),
    (["loss.kind=topk", "loss.top_k=0"], 1, ["loss.top_k=0", ">= 1"]),
    (["loss.temperature=0"], 1, ["loss.temperature=0.0"]),
    (["loss.clip=-1"], 1, ["loss.clip=-1.0"]),
    (["teacher.mode=frozen"], 1, ["teacher.mode='frozen'", "current, fixed, ema"]),
    (["teacher.mode=ema", "teacher.ema_decay=1.0"], 1, ["teacher.ema_decay=1.0"]),
    (["rollout.temperature=0"], 1, ["rollout.temperature=0.0"]),
    (["rollout.top_p=1.5"], 1, ["rollout.top_p=1.5"]),
    (["trainer.max_steps=0"], 1, ["trainer.max_steps=0"]),
    (["trainer.lr_schedule=linear"], 1, ["trainer.lr_schedule='linear'"]),
    (["runtime.device=tpu"], 1, ["runtime.device='tpu'"]),
    (["+loss.gamma=1"], 1, ["unknown key loss.gamma"]),
    (["parallel.tensor_model_parallel_size=two"], 1, ["parallel.tensor_model_parallel_size='two'", "int"]),
    (["model.hf_path=/nonexistent/model"], 1, ["model.hf_path='/nonexistent/model'", "no config.json"]),
    (["trainer.prompts_per_step=3"], 2, ["3 rollouts do not split evenly over 2 data-parallel replicas"]),
    (["checkpoint.save_interval=0"], 1, ["checkpoint.save_interval=0", ">= 1"]),
    (["rollout.in_process=true", "++rollout.placement=rank0"], 2, ["rollout.in_process=True", "hangs"]),
    (["++rollout.placement=everywhere"], 2, ["rollout.placement='everywhere'", "colocated, rank0"]),
    (["++rollout.tensor_parallel_size=3"], 2, ["rollout.tensor_parallel_size=3", "world size 2"]),
    (
        ["++rollout.tensor_parallel_size=3", "trainer.prompts_per_step=3"],
        3,
        ["rollout.tensor_parallel_size=3", "num_attention_heads=4"],
    ),
    (
        ["++rollout.tensor_parallel_size=2", "++rollout.placement=rank0"],
        2,
        ["rollout.tensor_parallel_size=2", "placement=colocated"],
    ),
    (
        ["trainer.prompts_per_step=6", "parallel.tensor_model_parallel_size=2"],
        4,
        ["prompts_per_step=6", "4 colocated engines"],
    ),
    (["rollout.weight_transport=directory"], 2, ["rollout.weight_transport='directory'", "placement=rank0"]),
    (["++rollout.sleep_level=3"], 1, ["rollout.sleep_level=3"]),
    (["++rollout.gpu_memory_utilization=0"], 1, ["rollout.gpu_memory_utilization=0.0"]),
    (["loss.kind=pg", "loss.clip=2.0"], 1, ["loss.clip=2.0", "not defined for loss.kind=pg"]),
    (["loss.clip=0.05", "loss.clip_mode=vocab"], 1, ["loss.clip_mode='vocab'", "token, entry"]),
    (["loss.clip_mode=entry"], 1, ["loss.clip_mode='entry'", "needs loss.clip"]),
    (["teacher.reason_first=true"], 1, ["teacher.reason_max_new_tokens=4096", "rollout.max_model_len=4096"]),
    (["data.prompt_style=v0"], 1, ["data.prompt_style='v0'", "opsd, opsd_first_release"]),
    (["rollout.max_new_tokens=4000"], 1, ["rollout.max_model_len=4096", "rollout.max_new_tokens=4000"]),
    (
        ["parallel.overlap_param_gather=true"],
        1,
        ["parallel.overlap_param_gather=True", "distributed optimizer"],
    ),
    (
        ["model.recompute_granularity=everything"],
        1,
        ["model.recompute_granularity='everything'", "selective"],
    ),
    (["model.recompute_method=ring"], 1, ["model.recompute_method='ring'", "uniform, block"]),
    (
        ["model.recompute_granularity=full", "model.recompute_num_layers=3", "parallel=pp2"],
        2,
        ["model.recompute_num_layers=3", "2 layers of a pipeline chunk"],
    ),
    (
        ["+model.transformer_overrides.recompute_granularity=full"],
        1,
        ["model.transformer_overrides.recompute_granularity", "set model.recompute_granularity"],
    ),
    (["runtime.device_peak_tflops=0"], 1, ["runtime.device_peak_tflops=0.0", "> 0"]),
    (["lora.rank=-1"], 1, ["lora.rank=-1", "must be >= 0"]),
    (["lora.rank=8", "lora.target_modules=[q_proj,lm_head]"], 1, ["lora.target_modules", "lm_head"]),
    (["lora.rank=8", "lora.alpha=0"], 1, ["lora.alpha=0.0", "must be > 0"]),
    (
        ["lora.rank=8", "lora.target_modules=[q_proj,o_proj]"],
        1,
        ["lora.target_modules", "fuses", "all of them"],
    ),
    (
        ["lora.rank=8", "model.transformer_impl=transformer_engine"],
        1,
        ["model.transformer_impl='transformer_engine'", "not supported with LoRA"],
    ),
]


@pytest.mark.parametrize(("overrides", "world_size", "words"), INVALID, ids=lambda v: str(v))
def test_invalid_config_fails_with_one_line_and_no_process_group(
    tiny_qwen3, monkeypatch, capsys, overrides, world_size, words
):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", "0")
    raw = compose_config([f"model.hf_path={tiny_qwen3}", *overrides])
    with pytest.raises(SystemExit) as exit_info:
        build_config(raw)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    assert not dist.is_initialized()


def test_cli_prints_resolved_config_and_rejects_bad_config(tiny_qwen3):
    ok = subprocess.run(
        [sys.executable, "-m", "megaopsd.train", "--cfg", "job", "parallel.tensor_model_parallel_size=2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "tensor_model_parallel_size: 2" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "megaopsd.train", f"model.hf_path={tiny_qwen3}", "loss.beta=-0.5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "megaopsd: config: loss.beta=-0.5 is outside [0, 1]; use 0 (forward KL) .. 1 (reverse KL)"
    ]


def test_required_and_typed_fields():
    with pytest.raises(ConfigError, match=r"model\.hf_path is required"):
        load_config({"model": {}})
    cfg = load_config({"model": {"hf_path": "x"}, "loss": {"beta": 1}, "data": {"train_files": "a.jsonl"}})
    assert cfg.loss.beta == 1.0 and isinstance(cfg.loss.beta, float)
    assert cfg.data.train_files == ("a.jsonl",)
    with pytest.raises(ConfigError, match="must be true or false"):
        load_config({"model": {"hf_path": "x"}, "parallel": {"sequence_parallel": "yes"}})


def test_validate_takes_hf_config_without_files():
    cfg = load_config({"model": {"hf_path": "unused"}, "parallel": {"tensor_model_parallel_size": 8}})
    hf = {
        "architectures": ["Qwen3ForCausalLM"],
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_hidden_layers": 28,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "vocab_size": 151936,
    }
    validate(cfg, world_size=16, hf_config=hf)
    with pytest.raises(ConfigError, match="num_key_value_heads=8"):
        validate(
            load_config({"model": {"hf_path": "u"}, "parallel": {"tensor_model_parallel_size": 16}}),
            world_size=16,
            hf_config=hf,
        )


def _conf_sections(path: Path) -> dict[str, dict]:
    """A conf file's values by config section (a group file holds one section's keys)."""
    data = yaml.safe_load(path.read_text()) or {}
    data.pop("defaults", None)
    if path.parent == CONF:
        return {k: v for k, v in data.items() if k not in ("hydra", "run_name", "output_dir")}
    return {path.parent.name: data}


def test_conf_holds_only_what_differs_from_the_dataclass_defaults():
    defaults = default_tree()
    files = [p for p in CONF.rglob("*.yaml") if p.parent.name != "recipe"]
    assert len(files) >= 5, files
    for path in files:
        for section, values in _conf_sections(path).items():
            assert section in defaults, (path, section)
            for key, value in values.items():
                where = f"{path.relative_to(CONF)}: {section}.{key}"
                assert key in defaults[section], f"{where} is not a field of the dataclass"
                assert value != defaults[section][key], (
                    f"{where}={value!r} repeats the dataclass default; remove it from the YAML"
                )


def test_composed_default_tree_is_the_dataclass_defaults_plus_conf(tiny_qwen3):
    raw = compose_config([f"model.hf_path={tiny_qwen3}"])
    cfg = load_config(OmegaConf.to_container(raw, resolve=True))
    assert cfg == Config(
        model=ModelConfig(hf_path=str(tiny_qwen3)),
        data=DataConfig(train_files=("data/demo/train.jsonl",)),
        checkpoint=CheckpointConfig(dir="outputs/tiny/checkpoints"),
        logging=LoggingConfig(tensorboard_dir="outputs/tiny/tensorboard"),
    )


def test_choices_are_checked_for_configs_built_in_code(tiny_qwen3):
    hf = read_hf_config(str(tiny_qwen3))
    with pytest.raises(ConfigError, match=r"loss.kind='kl' is unknown; use one of jsd, forward_kl"):
        validate(
            Config(model=ModelConfig(hf_path="x"), loss=LossConfig(kind="kl")), world_size=1, hf_config=hf
        )
    with pytest.raises(ConfigError, match=r"rollout.dtype='fp16' is unknown"):
        load_config({"model": {"hf_path": "x"}, "rollout": {"dtype": "fp16"}})


def test_every_loss_kind_has_an_implementation():
    from megaopsd.loss import KINDS
    from megaopsd.loss.divergence import _PATHS

    assert tuple(KINDS) == LOSS_KINDS and set(_PATHS) == set(LOSS_KINDS)


def test_unsupported_architecture_fails_in_validation_before_any_process_group(
    tiny_qwen3, tmp_path, monkeypatch, capsys
):
    model = tmp_path / "mistral"
    model.mkdir()
    hf = read_hf_config(str(tiny_qwen3))
    (model / "config.json").write_text(json.dumps({**hf, "architectures": ["MistralForCausalLM"]}))
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit) as exit_info:
        build_config(compose_config([f"model.hf_path={model}"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "unsupported architecture 'MistralForCausalLM'" in err and "docs/adding-a-model-family.md" in err
    assert not dist.is_initialized()


def test_every_field_is_documented_where_it_is_declared():
    from megaopsd.config.fields import describe, field_docs

    docs = field_docs()
    assert len(docs) > 100 and [d.name for d in docs if not d.doc] == []
    listing = describe("loss")
    assert "loss.beta = 0.5\n    JSD mixture weight" in listing and "rollout." not in listing
    out = subprocess.run(
        [sys.executable, "-m", "megaopsd.config", "teacher"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "teacher.ema_decay = 0.99\n    ema: teacher <- decay" in out.stdout


@pytest.mark.parametrize(
    ("parallel", "world", "message"),
    [
        (
            {"expert_model_parallel_size": 3},
            3,
            r"expert_model_parallel_size=3 does not divide num_experts=128",
        ),
        (
            {"expert_model_parallel_size": 8, "pipeline_model_parallel_size": 2},
            8,
            r"expert_model_parallel_size=8 x expert_tensor_parallel_size=1 x pipeline_model_parallel_size=2 "
            r"does not divide the world size 8",
        ),
        (
            {"expert_model_parallel_size": 4, "tensor_model_parallel_size": 2},
            8,
            r"parallel\.sequence_parallel=False must be true with tensor_model_parallel_size=2 and "
            r"expert_model_parallel_size=4 .* set parallel\.sequence_parallel=true",
        ),
        (
            {"expert_tensor_parallel_size": 5},
            5,
            r"expert_tensor_parallel_size=5 does not divide moe_intermediate_size=768",
        ),
    ],
)
def test_expert_parallel_rules_fail_in_one_line_before_any_process_group(parallel, world, message):
    from tools.make_tiny_model import qwen3_config

    hf = qwen3_config("qwen3_30b_a3b")
    validate(
        load_config({"model": {"hf_path": "u"}, "parallel": {"expert_model_parallel_size": 8}}),
        world_size=8,
        hf_config=hf,
    )
    with pytest.raises(ConfigError, match=message):
        validate(
            load_config({"model": {"hf_path": "u"}, "parallel": parallel}), world_size=world, hf_config=hf
        )
    dense = qwen3_config("qwen3_1p7b")
    with pytest.raises(ConfigError, match=r"expert_model_parallel_size=2 needs a mixture-of-experts model"):
        validate(
            load_config({"model": {"hf_path": "u"}, "parallel": {"expert_model_parallel_size": 2}}),
            world_size=2,
            hf_config=dense,
        )
