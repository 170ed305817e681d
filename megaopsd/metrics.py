"""TensorBoard logging, phase timers and the one-line console status.

Only the main rank writes; the others get a writer that drops everything, so call sites do
not branch on rank. Tags are ``<section>/<name>`` (``train/loss``, ``perf/step_time_s``, ...);
``step_scalars`` names every per-step tag in one place.

    writer = MetricsWriter(cfg.logging.tensorboard_dir, enabled=runtime.is_main)
    timer = PhaseTimer()
    with timer.phase("rollout"):
        ...
    writer.scalars(step, {"train/loss": 0.3, **timer.as_scalars()})
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megaopsd.algorithm.step import StepResult


class MetricsWriter:
    """A TensorBoard ``SummaryWriter`` on the main rank, a sink elsewhere."""

    def __init__(self, log_dir: str | Path, *, enabled: bool):
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), global_step=step)

    def text(self, step: int, tag: str, body: str) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, body, global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class PhaseTimer:
    """Wall-clock seconds per named phase of one step (``perf/<phase>_time_s``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def as_scalars(self) -> dict[str, float]:
        return {f"perf/{name}_time_s": value for name, value in self.seconds.items()}


def status_line(step: int, max_steps: int, values: Mapping[str, float]) -> str:
    """``step 3/10 | loss 0.1234 | div 0.1234 | gnorm 1.23 | len 41.0 | 2.31 s``."""
    parts = [f"step {step}/{max_steps}"]
    for label, tag, fmt in (
        ("loss", "train/loss", ".4f"),
        ("div", "train/divergence", ".4f"),
        ("gnorm", "train/grad_norm", ".3f"),
        ("lr", "train/lr", ".2e"),
        ("len", "rollout/response_length_mean", ".1f"),
        ("lp-diff", "rollout/logprob_abs_diff", ".1e"),
        ("tok/s", "perf/train_tokens_per_s", ".0f"),
    ):
        if tag in values:
            parts.append(f"{label} {format(values[tag], fmt)}")
    if "perf/step_time_s" in values:
        parts.append(f"{values['perf/step_time_s']:.2f} s")
    return " | ".join(parts)


def step_scalars(
    result: StepResult,
    rollout_totals: tuple[float, float, float],
    timer: PhaseTimer,
    *,
    train_tokens: Mapping[str, float],
    data_skipped: Mapping[str, int],
    engines: int = 1,
) -> dict[str, float]:
    """The scalars of one training step, by TensorBoard tag.

    Args:
        result: the paired update's result (losses are token means over the global batch).
        rollout_totals: response tokens, rollouts and truncated rollouts of the whole step.
        timer: the step's phase timer (``perf/<phase>_time_s``).
        train_tokens: ``{"real": ..., "padded": ...}`` student + teacher tokens fed through the
            model without and with padding, summed over data-parallel ranks.
        data_skipped: prompts skipped so far by reason (``data/skipped_<reason>``).
        engines: rollout engines that generated the step (``rollout/engines``).
    """
    m = result.metrics
    length_sum, count, truncated = rollout_totals
    values = {
        "train/loss": result.loss,
        "train/grad_norm": result.grad_norm,
        "train/lr": result.lr,
        "train/clipped_fraction": m.get("clipped_sum", 0.0),
        "train/loss_tokens": result.num_tokens,
        "train/skipped_nonfinite": float(result.skipped),
        "rollout/response_length_mean": length_sum / max(count, 1.0),
        "rollout/truncated_fraction": truncated / max(count, 1.0),
        "rollout/engines": float(engines),
        **timer.as_scalars(),
        # Real tokens only: padding is work, not throughput.
        "perf/train_tokens_per_s": train_tokens["real"] / max(timer.seconds["train"], 1e-9),
        "perf/padding_fraction": 1.0 - train_tokens["real"] / max(train_tokens["padded"], 1.0),
    }
    # Only what the algorithm measured: SFT has no rollouts and no divergence, GRPO no teacher.
    for tag, key in _OPTIONAL_TAGS:
        if key in m:
            values[tag] = m[key]
    if m.get("first_token_count", 0.0) > 0:  # the thinking boundary (loss/boundary.py)
        values["train/first_token_divergence"] = m["first_token_divergence_sum"] / m["first_token_count"]
        values["train/first_token_teacher_think_fraction"] = (
            m["first_token_teacher_think_sum"] / m["first_token_count"]
        )
    if "entry_sum" in m:  # loss.clip_mode=entry: the share of entries and of the loss at the cap
        values["train/clipped_entry_fraction"] = m["clipped_entry_sum"] / max(m["entry_sum"], 1e-30)
        values["train/clipped_loss_share"] = m["clipped_loss_sum"] / max(m["positive_loss_sum"], 1e-30)
    if "teacher_topk_mass_sum" in m:
        values["train/teacher_topk_mass"] = m["teacher_topk_mass_sum"]
    values.update(_baseline_scalars(m))
    for reason, count in data_skipped.items():
        values[f"data/skipped_{reason}"] = count
    return values


_OPTIONAL_TAGS = (
    ("train/divergence", "divergence_sum"),
    ("train/student_entropy", "student_entropy_sum"),
    ("train/teacher_entropy", "teacher_entropy_sum"),
    ("rollout/logprob_abs_diff", "logprob_abs_diff_sum"),
    ("rollout/logprob_abs_diff_max", "logprob_abs_diff_max"),
    ("train/moe_aux_loss", "moe_aux_loss"),  # mixture-of-experts models: the load-balancing loss
)


def _baseline_scalars(m: Mapping[str, float]) -> dict[str, float]:
    """GRPO's and SFT's token means (``megaopsd/algorithm/policy_loss.py`` reports the sums)."""
    values = {}
    if "nll_sum" in m:
        values["train/cross_entropy"] = m["nll_sum"]
    if "advantage_sum" in m:
        mean = m["advantage_sum"]
        values.update(
            {
                "train/advantage_mean": mean,
                "train/advantage_std": math.sqrt(max(m["advantage_sq_sum"] - mean * mean, 0.0)),
                "train/clip_fraction": m["clip_low_sum"] + m["clip_high_sum"],
                "train/clip_low_fraction": m["clip_low_sum"],
                "train/clip_high_fraction": m["clip_high_sum"],
                "train/ratio_mean": m["ratio_sum"],
                "train/is_weight_mean": m["is_weight_sum"],
                "train/kl": m["kl_sum"],
            }
        )
    if "rlsd_weight_sum" in m:  # RLSD: the teacher's token weights and its log-prob gap to the student
        values["train/rlsd_weight_mean"] = m["rlsd_weight_sum"]
        values["train/rlsd_logprob_gap"] = m["rlsd_delta_sum"]
    if "position_weight_sum" in m:  # position-weighted OPSD: the tokens' mean position weight
        values["train/position_weight_mean"] = m["position_weight_sum"]
    return values
