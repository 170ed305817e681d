"""The training loop of OPSD and its baselines (``algorithm.name``: opsd | grpo | sft).

    prompts -> rollouts (vLLM engines) -> paired step (all ranks) -> optimizer -> teacher update
    -> weight sync (Megatron export -> engines, in memory) -> log -> checkpoint

GRPO grades its ``rollout.n`` responses per prompt, keeps the groups with mixed rewards and
trains the student stream alone (plus a frozen reference with a KL penalty); SFT replaces the
rollouts by the reference solutions and generates only for evaluation (docs/baselines.md).

Every rank builds the same prompts from the same data stream. The engines (one in-process
engine, a vLLM worker in every trainer process, or one engine on rank 0: ``rollout.placement``)
sit behind one ``EngineFleet``; each data-parallel replica receives the rollouts it trains on. The
student starts from a Hugging Face directory (imported on the fly) and resumes from
``<checkpoint.dir>/latest`` when it exists. SIGTERM / SIGUSR1 ask for a checkpoint and a clean
exit at the next step boundary (Slurm preemption).
"""

from __future__ import annotations

import math
import sys
from typing import Any

from megaopsd.algorithm.batch import build_microbatches, microbatch_count_rule
from megaopsd.algorithm.methods import StepInputs, TrainingBatch, make_algorithm
from megaopsd.algorithm.step import StepResult, microbatches_for_expert_groups, train_step
from megaopsd.checkpoint import CheckpointError
from megaopsd.checkpoint_manager import CheckpointManager
from megaopsd.components import build_components
from megaopsd.config import Config, engine_layout
from megaopsd.data.dataset import DataError
from megaopsd.data.prompts import PromptTemplates
from megaopsd.data.stream import build_prompt_stream
from megaopsd.eval.in_training import InTrainingEvaluator, eval_due
from megaopsd.flops import utilisation_scalars
from megaopsd.loss.boundary import think_token_ids
from megaopsd.metrics import MetricsWriter, PhaseTimer, status_line, step_scalars
from megaopsd.models.builder import unwrap_chunk
from megaopsd.rollout.fleet import start_fleet
from megaopsd.rollout.reason_first import ReasonFirst, reason_first_sampling
from megaopsd.rollout.refit import Refitter
from megaopsd.rollout.types import SamplingSettings
from megaopsd.runtime.distributed import dp_sum
from megaopsd.runtime.parallel import Runtime
from megaopsd.runtime.signals import StopRequest


class NonFiniteLossError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient."""


class Trainer:
    """Owns the model, teacher, optimizer, data stream, rollout engine and logs of one run."""

    def __init__(self, cfg: Config, runtime: Runtime, stop: StopRequest):
        from transformers import AutoTokenizer

        self.cfg, self.runtime, self.parallel = cfg, runtime, runtime.parallel
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        templates = PromptTemplates.from_style(
            cfg.data.prompt_style,
            student_enable_thinking=cfg.data.student_enable_thinking,
            teacher_enable_thinking=cfg.data.teacher_enable_thinking,
            teacher_think_prefix=cfg.data.teacher_think_prefix,
        )
        self.prompts = build_prompt_stream(
            cfg.data,
            self.tokenizer,
            templates=templates,
            max_teacher_prompt_tokens=cfg.data.max_teacher_prompt_tokens,
        )
        for problem in self.prompts.unreadable:  # the other sources loaded; say which one did not
            self._say(f"warning: data: {problem}")
        self.method = make_algorithm(cfg)  # opsd | grpo | sft (megaopsd/algorithm/methods/)
        parts = build_components(
            cfg, runtime, think_token_ids=think_token_ids(self.tokenizer), method=self.method
        )
        self.spec, self.teacher, self.student = parts.spec, parts.teacher, parts.student
        self.loss_fn, self.logprob_fn = parts.loss_fn, parts.logprob_fn
        self.checkpoints = CheckpointManager(cfg, runtime, student=self.student, teacher=self.teacher)
        self.writer = MetricsWriter(cfg.logging.tensorboard_dir, enabled=runtime.is_main)
        # Benchmarks load (and may fail) before the engines start, so a failure leaks no engine.
        # Every rank evaluates: its engine generates part of the samples (grading is repeated).
        self.evaluator = InTrainingEvaluator.start(cfg.eval, templates.student)
        self.method.start()
        self.fleet = self._start_engines()
        self.refitter = None  # the weight sync's plan and shared memory, built at the first sync
        # Every rank rewrites the same teacher prompts (the fleet's generate is collective).
        self.reason_first = self._make_reason_first() if cfg.teacher.reason_first else None
        # An in-process vLLM engine installs its own SIGTERM handler; take the signals back.
        self.stop = stop.install()
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.generated_tokens = 0.0  # response tokens the engines generated for training, all replicas

    # ------------------------------------------------------------------ loop

    def train(self) -> int:
        """Run to ``trainer.max_steps`` (or a stop signal); return the last completed step."""
        try:
            if self._resume():
                self._sync_weights()  # the engine started from model.hf_path, not from the checkpoint
            if self.cfg.eval.at_start and self.step == 0:
                self._log(self._evaluate(PhaseTimer()), force=True)
            while self.step < self.cfg.trainer.max_steps:
                # One check per step boundary: a signal during step N stops before step N + 1.
                if self.checkpoints.stop_agreed(self.stop):
                    self.checkpoints.save_before_stop(self.step, self._trainer_state())
                    self._say(
                        f"stopping after step {self.step} on signal {self.stop.signum}; checkpoint saved"
                    )
                    break
                self.step += 1
                self._log(self._train_one_step())
                if self.checkpoints.should_save(self.step):
                    self.checkpoints.save(self.step, self._trainer_state())
        finally:
            self.close()
        return self.step

    def _train_one_step(self) -> dict[str, float]:
        timer = PhaseTimer()
        with timer.phase("step"):
            with timer.phase("rollout"):
                prompts = self.prompts.next_prompts(self.cfg.trainer.prompts_per_step)
                batch = self._training_batch(prompts)
            with timer.phase("train"):
                result, train_tokens = self._paired_update(batch)
            due = eval_due(self.cfg.eval, self.step)
            with timer.phase("weight_sync"):
                wanted = not result.skipped and self.method.sync_after_step(eval_due=due)
                sync = (
                    self._sync_weights() if (wanted and not batch.empty) or self.fleet.needs_weights else {}
                )
            evaluation = self._evaluate(timer) if due else {}
        self._check_nonfinite(result)
        totals = self._rollout_totals(batch.sampled)
        if self.method.samples_rollouts:
            self.generated_tokens += totals[0]
        values = step_scalars(
            result,
            totals,
            timer,
            train_tokens=train_tokens,
            data_skipped=self.prompts.skipped(),
            engines=self.fleet.layout.num_engines,
        )
        values["rollout/generated_tokens_total"] = self.generated_tokens
        values.update(batch.scalars)
        values.update(evaluation)
        values.update(
            utilisation_scalars(
                self.spec,
                batch.train,
                timer.seconds["train"],
                device=self.runtime.device,
                dtype=self.cfg.model.dtype,
                peak_tflops_configured=self.cfg.runtime.device_peak_tflops,
                world_size=self.runtime.world_size,
                dp_group=self.parallel.dp_group,
                teacher_stream=self.teacher is not None,
            )
        )
        values.update(sync)
        if self.step == 1 or (
            self.cfg.logging.text_sample_interval and self.step % self.cfg.logging.text_sample_interval == 0
        ):
            self._text_sample(prompts, batch.sampled)
        return values

    def _training_batch(self, prompts: list) -> TrainingBatch:
        """What this replica trains on this step: the method decides (rollouts, groups, references)."""
        inputs = StepInputs(
            tokenizer=self.tokenizer,
            parallel=self.parallel,
            rollouts=self._rollouts,
            next_prompts=self.prompts.next_prompts,
            has_teacher=self.teacher is not None,
            teacher_prompt_ids=self.prompts.builder.teacher_prompt_ids,
            completed_steps=self.step - 1,
        )
        return self.method.training_batch(prompts, inputs)

    def _rollouts(self, prompts: list) -> list:
        """The rollouts this rank's data-parallel replica trains on (the engines split the prompts)."""
        prompts = list(prompts)
        if self.reason_first is not None:  # teacher prompts become prompt + rationale + transition
            prompts = self.reason_first.apply(self.fleet, prompts, step=self.step)
        sampling = SamplingSettings.from_config(self.cfg.rollout)
        return self.fleet.rollouts(prompts, sampling, step=self.step)

    def _rollout_totals(self, rollouts: list) -> tuple[float, float, float]:
        """Response tokens, rollouts and truncated rollouts, summed over the data-parallel replicas."""
        length_sum, count, truncated = dp_sum(
            [
                sum(len(r.response_ids) for r in rollouts),
                len(rollouts),
                sum(r.finish_reason == "length" for r in rollouts),
            ],
            self.parallel.dp_group,
        )
        return length_sum, count, truncated

    def _paired_update(self, batch: TrainingBatch) -> tuple[StepResult, dict[str, float]]:
        """One optimizer step on this replica's share; returns the result and the global
        (real, padded) token counts the two streams fed through the model."""
        par, tr = self.parallel, self.cfg.trainer
        if batch.empty:
            # Every group of the step was uniform: nothing to learn from, no update (not an error).
            lr = self.student.optimizer.param_groups[0]["lr"]
            return StepResult(
                loss=math.nan, grad_norm=math.nan, lr=lr, num_tokens=0, skipped=False, metrics={}
            ), {"real": 0.0, "padded": 0.0}
        count_multiple, min_count = microbatch_count_rule(par.pp_size, par.vpp_size)
        microbatches = microbatches_for_expert_groups(
            lambda count: build_microbatches(
                batch.train,
                max_tokens=tr.microbatch_tokens,
                pad_id=self.pad_id,
                pad_multiple=par.tp_size if par.sequence_parallel else 1,
                skip_first_tokens=tr.skip_first_tokens,
                count_multiple=count_multiple,
                min_count=count,
                student_only=self.teacher is None,
                advantages=batch.advantages,
                in_loss=batch.in_loss,
            ),
            par,
            min_count,
        )
        result = train_step(
            student=self.student,
            teacher=self.teacher,
            microbatches=microbatches,
            loss_fn=self.loss_fn,
            parallel=par,
            logprob_fn=self.logprob_fn,
        )
        real, padded = dp_sum(
            [sum(mb.real_tokens for mb in microbatches), sum(mb.padded_tokens for mb in microbatches)],
            par.dp_group,
        )
        return result, {"real": real, "padded": padded}

    def _check_nonfinite(self, result: StepResult) -> None:
        if not result.skipped:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        self._say(
            f"step {self.step}: non-finite loss or gradient; update skipped ({self.nonfinite_in_a_row} in a row)"
        )
        if self.nonfinite_in_a_row >= self.cfg.trainer.max_nonfinite_steps:
            self.checkpoints.save(self.step, self._trainer_state())
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient (step {self.step}); "
                f"checkpoint saved under {self.cfg.checkpoint.dir}. Lower trainer.lr or check the data, then resume."
            )

    # ------------------------------------------------------------------ engine and weights

    def _start_engines(self):
        layout = engine_layout(self.cfg.rollout, self.runtime.world_size)
        self._say(f"starting {layout.num_engines} rollout engine(s), placement {layout.placement}")
        return start_fleet(self.cfg, self.runtime)

    def _make_reason_first(self):
        sampling = reason_first_sampling(self.cfg.teacher, self.cfg.rollout)
        return ReasonFirst(self.tokenizer, sampling, cache=self.cfg.teacher.reason_cache)

    def _sync_weights(self) -> dict[str, float]:
        """Refit every engine from the student's own shards, in memory (``rollout/refit.py``)."""

        modules = [unwrap_chunk(c) for c in self.student.chunks]
        if self.refitter is None:
            shared = self.cfg.rollout.shared_memory_export
            self.refitter = Refitter(self.fleet, modules, self.spec, self.parallel, shared_memory=shared)
            self._say(self.refitter.transport)
        return self.refitter(modules)

    # ------------------------------------------------------------------ evaluation and checkpoints

    def _evaluate(self, timer: PhaseTimer) -> dict[str, float]:
        """``eval/<benchmark>/...`` through all engines; every rank grades the same samples."""
        with timer.phase("eval"):
            return self.evaluator.evaluate(self.fleet, self.tokenizer)

    def _resume(self) -> bool:
        """Continue from the latest checkpoint if there is one; whether it did."""
        state = self.checkpoints.resume()
        if state is None:
            return False
        self.step = state["step"]
        self.prompts.load_state_dict(state["data"])
        self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)
        self.generated_tokens = state.get("generated_tokens", 0.0)
        return True

    def _trainer_state(self) -> dict[str, Any]:
        """What a checkpoint holds besides model, optimizer, teacher and RNG."""
        return {
            "data": self.prompts.state_dict(),
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "generated_tokens": self.generated_tokens,
        }

    # ------------------------------------------------------------------ logging

    def _log(self, values: dict[str, float], *, force: bool = False) -> None:
        if force or self.step % self.cfg.logging.log_interval == 0 or self.step == 1:
            self.writer.scalars(self.step, values)
            self.writer.flush()
            self._say(status_line(self.step, self.cfg.trainer.max_steps, values))

    def _text_sample(self, prompts: list, rollouts: list) -> None:
        if not self.runtime.is_main or not rollouts:
            return
        first = rollouts[0]
        body = (
            f"**problem**\n\n{prompts[first.prompt_index].problem}\n\n"
            f"**student response** ({len(first.response_ids)} tokens, {first.finish_reason})\n\n"
            f"{self.tokenizer.decode(first.response_ids)}"
        )
        self.writer.text(self.step, "rollout/sample", body)
        if self.reason_first is not None:
            self.writer.text(self.step, "teacher/reason_first", self.reason_first.text_sample())

    def _say(self, message: str) -> None:
        if self.runtime.is_main:
            print(f"[megaopsd] {message}", flush=True)

    def close(self) -> None:
        self.writer.close()
        self.method.close()
        if self.evaluator is not None:
            self.evaluator.close()
            self.evaluator = None
        if self.refitter is not None:
            self.refitter.close()
            self.refitter = None
        if self.fleet is not None:
            self.fleet.close()
            self.fleet = None


def run(cfg: Config) -> int:
    """Start the runtime, train, shut down; the process exit code."""

    stop = StopRequest().install()  # before anything slow: a notice during start-up is not fatal
    runtime = Runtime.start(cfg.parallel, cfg.runtime)
    try:
        Trainer(cfg, runtime, stop).train()
    except DataError as err:
        print(f"megaopsd: data: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"megaopsd: {err}", file=sys.stderr)
        return 4
    except CheckpointError as err:
        print(f"megaopsd: checkpoint: {err}", file=sys.stderr)
        return 3
    finally:
        runtime.shutdown()
    return 0
