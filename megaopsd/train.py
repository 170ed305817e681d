"""megaopsd entry point: compose the Hydra config, validate it, and run.

    python -m megaopsd.train [overrides]                     # one process
    torchrun --nproc-per-node 2 -m megaopsd.train parallel=tp2
    python -m megaopsd.train --cfg job parallel=tp2           # print the resolved config (Hydra)

Hydra lives only here: the defaults come from the dataclasses in ``megaopsd.config`` (stored
in Hydra's ConfigStore below, so ``conf/`` holds only what differs); the composed config becomes
a plain dict, then frozen dataclasses, validated against the launch's world size before any process group
starts. An invalid config exits with status 2 and one line naming the field and the fix.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from megaopsd.config import (
    Config,
    ConfigError,
    data_parallel_size,
    default_tree,
    load_config,
    validate,
)
from megaopsd.dry_run import describe_layout, dry_run_report, estimate_memory_gib  # noqa: F401 (public API)
from megaopsd.runtime.distributed import exit_without_teardown, target_world_size

DEFAULTS_NAME = "megaopsd_defaults"  # the first entry of conf/config.yaml's defaults list


def register_defaults() -> None:
    """Give Hydra the dataclass defaults as config ``megaopsd_defaults`` (the single source).

    Importing this module registers them; anything that composes ``conf/`` (the entry point,
    Hydra's compose API in tests) must import it first, or Hydra reports the config missing.
    """
    ConfigStore.instance().store(name=DEFAULTS_NAME, node=default_tree())


register_defaults()


def build_config(raw: DictConfig) -> Config:
    """Resolve, type and validate the composed config; exit(2) with one line if it is invalid."""
    # The methods import torch and megatron-core: not needed to print a config (--cfg job).
    from megaopsd.algorithm.methods import algorithm_class

    try:
        cfg = load_config(OmegaConf.to_container(raw, resolve=True))
        world_size = target_world_size(cfg)
        validate(cfg, world_size=world_size)
        dp_size = data_parallel_size(cfg.parallel, world_size)
        algorithm_class(cfg.algorithm.name).check_config(cfg, dp_size=dp_size)
    except ConfigError as err:
        print(f"megaopsd: {err}", file=sys.stderr)
        sys.exit(2)
    return cfg


def quiet_libraries() -> None:
    """Keep the console to megaopsd's status lines: drop known-harmless library chatter.

    megatron-core warns at import that Transformer Engine / Apex are missing (expected on CPU)
    and logs every DDP bucket at INFO; vLLM logs each weight reload. Real warnings still show.
    """
    for pattern in (
        ".*Transformer Engine and Apex are not installed.*",
        ".*Apex is not installed.*",
        ".*full scope is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("megatron").setLevel(logging.WARNING)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(raw: DictConfig) -> None:
    quiet_libraries()
    cfg = build_config(raw)
    if cfg.trainer.dry_run:
        print(dry_run_report(cfg, target_world_size(cfg)))
        return
    from megaopsd.trainer import run

    sys.exit(run(cfg))


if __name__ == "__main__":
    try:
        main()
    except SystemExit as stop:
        if stop.code is not None and not isinstance(stop.code, int):
            raise
        exit_without_teardown(stop.code or 0)
    exit_without_teardown(0)
