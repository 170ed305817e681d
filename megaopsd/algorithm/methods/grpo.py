"""GRPO: ``rollout.n`` responses per prompt graded by math-verify, group-relative advantages,
dynamic sampling, the clipped policy loss on the student stream (plus a frozen reference and a
k3 KL penalty when ``algorithm.kl_coef > 0``). The math is in ``megaopsd/algorithm/grpo.py``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from megaopsd.algorithm.baselines import grpo_batch
from megaopsd.algorithm.batch import microbatch_count_rule
from megaopsd.algorithm.grpo import groups_to_keep
from megaopsd.algorithm.methods.base import Algorithm, StepInputs, TrainingBatch
from megaopsd.algorithm.policy_loss import GrpoLoss
from megaopsd.algorithm.teacher import make_teacher
from megaopsd.config import Config, ConfigError, TeacherConfig
from megaopsd.runtime.distributed import dp_sum


class Grpo(Algorithm):
    name = "grpo"
    whole_prompts = True
    teacher_reads_student_prompt = True  # the KL reference scores the student's own sequence

    def start(self) -> None:
        self._start_grader()  # before any engine

    @classmethod
    def check_config(cls, cfg: Config, *, dp_size: int) -> None:
        if cfg.rollout.n < 2:
            raise ConfigError(
                f"config: rollout.n={cfg.rollout.n!r} gives GRPO groups of one; use rollout.n >= 2 (e.g. 8)"
            )
        super().check_config(cfg, dp_size=dp_size)

    @classmethod
    def uses_teacher(cls, cfg: Config) -> bool:
        return cfg.algorithm.kl_coef > 0

    def make_teacher(self, chunks, build):
        if not self.uses_teacher(self.cfg):
            return None  # no KL penalty: no reference copy is built and no second stream runs
        return make_teacher(TeacherConfig(mode="fixed"), chunks, build, lora=self.cfg.lora.enabled)

    def make_loss(self, *, vocab_size: int, tp_group, think_token_ids: Sequence[int] = ()):
        return GrpoLoss(
            self.cfg.algorithm,
            vocab_size=vocab_size,
            tp_group=tp_group,
            chunk_tokens=self.cfg.loss.chunk_tokens,
        )

    def training_batch(self, prompts: list, inputs: StepInputs) -> TrainingBatch:
        par, alg = inputs.parallel, self.cfg.algorithm
        sampled, rewards = self._graded(prompts, inputs, group_offset=0)
        rollouts, rounds = sampled, 1
        if alg.dynamic_sampling == "refill":
            # More rounds from the next prompts until the step holds prompts_per_step mixed groups
            # (all replicas), then exactly that many: every replica decides from the same totals.
            while True:
                counts = _mixed_groups_per_replica(sampled, rewards, par)
                if sum(counts) >= len(prompts) or rounds == alg.refill_max_rounds:
                    break
                more, more_rewards = self._graded(
                    inputs.next_prompts(len(prompts)), inputs, group_offset=rounds * len(prompts)
                )
                sampled, rewards, rounds = sampled + more, rewards + more_rewards, rounds + 1
            quota = share_groups(counts, len(prompts))[par.dp_rank]
            rollouts, rewards = _first_mixed_groups(sampled, rewards, quota)
        grpo = grpo_batch(
            rollouts,
            rewards,
            alg,
            with_reference=inputs.has_teacher and self.teacher_reads_student_prompt,
            min_rollouts=max(microbatch_count_rule(par.pp_size, par.vpp_size)[1], 1),
        )
        reward_sum, correct, num, groups, kept = dp_sum(grpo.counts, par.dp_group)
        scalars = {
            "train/reward_mean": reward_sum / max(num, 1.0),
            "train/accuracy": correct / max(num, 1.0),
            "train/kept_group_fraction": kept / max(groups, 1.0),
            "train/kept_groups": kept,
            "train/dropped_groups": groups - kept,
        }
        if alg.dynamic_sampling == "refill":
            scalars["train/generation_rounds"] = float(rounds)
        return TrainingBatch(
            sampled=sampled,
            train=grpo.rollouts,
            advantages=grpo.advantages,
            in_loss=grpo.in_loss,
            scalars=scalars,
            empty=kept == 0,
        )

    def _graded(self, prompts: list, inputs: StepInputs, *, group_offset: int) -> tuple[list, list[float]]:
        """This replica's rollouts of ``prompts`` and their rewards; groups renumbered from ``group_offset``."""
        rollouts = inputs.rollouts(prompts)
        rewards = self._rewards(rollouts, prompts, inputs)
        if group_offset:
            rollouts = [dataclasses.replace(r, prompt_index=r.prompt_index + group_offset) for r in rollouts]
        return rollouts, rewards


def _mixed_groups(rollouts: list, rewards: list[float]) -> list[int]:
    """The groups (``prompt_index``) whose rewards are not all equal, in generation order."""
    groups = [r.prompt_index for r in rollouts]
    kept = groups_to_keep(rewards, groups)
    return list(dict.fromkeys(g for g in groups if g in kept))


def _mixed_groups_per_replica(rollouts: list, rewards: list[float], par) -> list[int]:
    """Every replica's count of mixed groups (the same list on every rank)."""
    mine = len(_mixed_groups(rollouts, rewards))
    return [
        int(v) for v in dp_sum([mine if r == par.dp_rank else 0 for r in range(par.dp_size)], par.dp_group)
    ]


def share_groups(counts: Sequence[int], target: int) -> list[int]:
    """How many of its mixed groups each replica trains on: ``target`` in all, dealt one at a time
    round the replicas (a replica with fewer keeps all of its own); all of them when short."""
    quota = [0] * len(counts)
    left = min(target, sum(counts))
    while left:
        for replica, count in enumerate(counts):
            if left and quota[replica] < count:
                quota[replica] += 1
                left -= 1
    return quota


def _first_mixed_groups(rollouts: list, rewards: list[float], quota: int) -> tuple[list, list[float]]:
    """The rollouts of this replica's first ``quota`` mixed groups (uniform groups stay: the
    dynamic sampling that follows drops and counts them)."""
    mixed = _mixed_groups(rollouts, rewards)
    dropped = set(mixed[quota:])
    keep = [i for i, r in enumerate(rollouts) if r.prompt_index not in dropped]
    return [rollouts[i] for i in keep], [rewards[i] for i in keep]
