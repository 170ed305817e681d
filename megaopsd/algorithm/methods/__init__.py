"""The training methods, one module each, registered by ``algorithm.name``.

    method = make_algorithm(cfg)                 # an instance for this run (close() it)
    algorithm_class("grpo").check_config(cfg, dp_size=2)

Adding a method: a module here with an ``Algorithm`` subclass, one line in ``ALGORITHMS``, its
name in ``megaopsd.config.schema.AlgorithmName``, its tests, and a line in docs/architecture.md.
"""

from __future__ import annotations

from megaopsd.algorithm.methods.base import Algorithm, StepInputs, TrainingBatch
from megaopsd.algorithm.methods.grpo import Grpo
from megaopsd.algorithm.methods.opsd import Opsd
from megaopsd.algorithm.methods.pw_opsd import PwOpsd
from megaopsd.algorithm.methods.rlsd import Rlsd
from megaopsd.algorithm.methods.sft import Sft
from megaopsd.config import Config

ALGORITHMS: dict[str, type[Algorithm]] = {method.name: method for method in (Opsd, Grpo, Sft, Rlsd, PwOpsd)}


def algorithm_class(name: str) -> type[Algorithm]:
    """The method registered as ``name`` (the config's Literal already limits it to these)."""
    return ALGORITHMS[name]


def make_algorithm(cfg: Config) -> Algorithm:
    """This run's method, built from its config."""
    return algorithm_class(cfg.algorithm.name)(cfg)


__all__ = ["ALGORITHMS", "Algorithm", "StepInputs", "TrainingBatch", "algorithm_class", "make_algorithm"]
