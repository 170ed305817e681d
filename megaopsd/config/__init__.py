"""Typed, frozen configuration: the schema, loading a plain dict, and the one place it is validated.

    cfg = load_config(plain_dict)          # megaopsd.config.load: unknown keys and wrong types fail
    validate(cfg, world_size=4)            # megaopsd.config.validate: every cross-field rule

``schema`` holds the dataclasses (the single source of defaults), ``load`` turns Hydra's
composed dict into them, ``validate`` checks every rule before any process group exists (each
failure one line naming the field, the problem and the fix), ``hf_spec`` parses a model's
``config.json``. Nothing here imports torch, megatron-core, vLLM or Hydra.
"""

from megaopsd.config.engines import EngineLayout, engine_layout, rollout_placement
from megaopsd.config.load import default_tree, load_config
from megaopsd.config.schema import (
    ADD_A_MODEL,
    CLIP_MODES,
    DEVICES,
    DTYPES,
    LORA_TARGETS,
    LOSS_IMPLEMENTATIONS,
    LOSS_KINDS,
    PLACEMENTS,
    REQUIRED,
    TEACHER_MODES,
    WEIGHT_TRANSPORTS,
    AlgorithmConfig,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    ParallelConfig,
    RolloutConfig,
    RuntimeConfig,
    TeacherConfig,
    TrainerConfig,
    check_choice,
)
from megaopsd.config.validate import data_parallel_size, read_hf_config, validate

__all__ = [
    "ADD_A_MODEL",
    "CLIP_MODES",
    "DEVICES",
    "DTYPES",
    "LORA_TARGETS",
    "LOSS_IMPLEMENTATIONS",
    "LOSS_KINDS",
    "PLACEMENTS",
    "REQUIRED",
    "TEACHER_MODES",
    "WEIGHT_TRANSPORTS",
    "AlgorithmConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EngineLayout",
    "EvalConfig",
    "LoggingConfig",
    "LoraConfig",
    "LossConfig",
    "ModelConfig",
    "ParallelConfig",
    "RolloutConfig",
    "RuntimeConfig",
    "TeacherConfig",
    "TrainerConfig",
    "check_choice",
    "data_parallel_size",
    "default_tree",
    "engine_layout",
    "load_config",
    "read_hf_config",
    "rollout_placement",
    "validate",
]
