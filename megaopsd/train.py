"""megaopsd entry point: compose the Hydra config, validate it, and run.

    python -m megaopsd.train [overrides]                     # one process
    torchrun --nproc-per-node 2 -m megaopsd.train parallel=tp2
    python -m megaopsd.train --cfg job parallel=tp2           # print the resolved config (Hydra)

Hydra lives only here: the composed config becomes a plain dict, then frozen dataclasses
(``megaopsd.config``), validated against the launch's world size before any process group
starts. An invalid config exits with status 2 and one line naming the field and the fix.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from megaopsd.config import Config, ConfigError, load_config, read_hf_config, validate, world_size_from_env


def describe_layout(cfg: Config, world_size: int) -> str:
    """One line per fact about the parallel layout this config asks for."""
    par = cfg.parallel
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    hf = read_hf_config(cfg.model.hf_path)
    return "\n".join(
        [
            f"model: {hf.get('architectures', ['?'])[0]} from {cfg.model.hf_path} "
            f"({hf['num_hidden_layers']} layers, hidden {hf['hidden_size']}, vocab {hf['vocab_size']})",
            f"world size {world_size} = TP {tp} x PP {pp} x DP {world_size // (tp * pp)}"
            + (
                f", VPP {par.virtual_pipeline_model_parallel_size}"
                if par.virtual_pipeline_model_parallel_size
                else ""
            )
            + (", sequence parallel" if par.sequence_parallel else ""),
            f"loss {cfg.loss.kind} (beta {cfg.loss.beta}), teacher {cfg.teacher.mode}",
        ]
    )


def build_config(raw: DictConfig) -> Config:
    """Resolve, type and validate the composed config; exit(2) with one line if it is invalid."""
    try:
        cfg = load_config(OmegaConf.to_container(raw, resolve=True))
        validate(cfg, world_size=world_size_from_env())
    except ConfigError as err:
        print(f"megaopsd: {err}", file=sys.stderr)
        sys.exit(2)
    return cfg


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(raw: DictConfig) -> None:
    cfg = build_config(raw)
    print(describe_layout(cfg, world_size_from_env()))
    print("config is valid; the OPSD training loop is not part of this build yet", file=sys.stderr)
    sys.exit(3)


if __name__ == "__main__":
    main()
