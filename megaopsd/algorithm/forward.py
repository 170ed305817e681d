"""The paired forward step: teacher and student streams in one megatron-core schedule.

Every pipeline stage runs, for each microbatch, the teacher stream without grad and the
student stream with grad, and sends both downstream as ONE tensor ``cat([student, teacher])``
along the sequence dimension (``variable_seq_lengths`` carries the varying lengths). The next
stage splits it at the student length (``Ls / TP`` with sequence parallel). The teacher half
is detached, so the gradient that flows upstream through it is exactly zero. The last stage
runs both streams' decoders without the output layer, applies the (vocab-parallel) output
layer only to the rows that predict response tokens, and returns the divergence SUM with the
token count; megatron's ``calculate_per_token_loss`` divides the gradients by the global (all
microbatches, all DP ranks) token count. Prompt positions never get logits: for OPSD's long
teacher prompts that is most of the output-layer cost, and most of what the last stage keeps
for backward. ``all_position_logits=True`` keeps the older path (logits at every position,
rows picked afterwards) for comparisons; both give the same loss and gradients.

Student-only algorithms (GRPO without a reference, SFT) pass ``teacher=None`` and microbatches
with an empty teacher stream: no teacher forward runs and stages send the student tensor alone.
GRPO with a KL penalty passes the frozen initial weights as the "teacher" and the student's own
prompt as the teacher sequence, so the reference rides the same paired schedule. A
``StudentLoss`` (GRPO, SFT) receives the whole microbatch (advantages, engine logprobs).

Shapes: S/T stream lengths, B batch, H hidden, V vocab shard (vocab / TP), N response tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch

from megaopsd.algorithm.batch import PairedMicrobatch
from megaopsd.algorithm.policy_loss import StudentLoss
from megaopsd.algorithm.teacher import Teacher
from megaopsd.loss.boundary import first_token_mask
from megaopsd.models.builder import unwrap_chunk
from megaopsd.models.forward import decoder_hidden, rows_logits
from megaopsd.rollout.metrics import logprob_abs_diff_tokens

# The per-token loss the last stage applies: (student_NV, teacher_NV, mask_N, target_N, first_N=)
# -> (sum, metrics); first_N marks each response's first token (thinking-boundary metrics).
LossFn = Callable[..., tuple[torch.Tensor, dict]]
# Log-probabilities of given tokens at temperature 1: (logits_NV, ids_N) -> logp_N (no grad)
LogprobFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairedForward:
    """A ``forward_step_func`` for ``megatron.core.pipeline_parallel.get_forward_backward_func``."""

    student_chunks: Sequence[torch.nn.Module]  # DDP-wrapped (or plain) student chunks, one per VPP stage
    teacher: Teacher | None  # None: the student stream only (microbatches carry no teacher rows)
    loss_fn: LossFn | StudentLoss
    sequence_parallel_size: int = 1  # TP size when sequence parallel is on, else 1
    # When set, microbatches carrying the engine's logprobs also report the mismatch
    # sum and max of |engine logprob - student logprob| over loss tokens
    # (``logprob_abs_diff_sum``, ``logprob_abs_diff_max``).
    logprob_fn: LogprobFn | None = None
    # The older path: the output layer at every position (for comparisons and the benchmark).
    all_position_logits: bool = False

    def _chunk_index(self, model: torch.nn.Module) -> int:
        for index, chunk in enumerate(self.student_chunks):
            if chunk is model:
                return index
        raise ValueError("the schedule passed a model chunk that is not one of the student chunks")

    def __call__(self, data_iterator: Iterator[PairedMicrobatch], model: torch.nn.Module):
        student = unwrap_chunk(model)
        mb = next(data_iterator).to(next(student.parameters()).device)
        if self.teacher is None:
            return self._student_only(mb, model, student)
        teacher = self.teacher.chunk(self._chunk_index(model))
        received = student.decoder.input_tensor  # set by the schedule; None on the first stage
        s_split = mb.student_len // self.sequence_parallel_size
        t_rows = mb.teacher_len // self.sequence_parallel_size
        s_input = t_input = None
        if received is not None:
            # A mis-sized message is silent in gloo without variable_seq_lengths; fail loudly.
            if received.shape[0] != s_split + t_rows:
                raise RuntimeError(
                    f"received {received.shape[0]} rows, expected {s_split} student + {t_rows} teacher"
                )
            s_input, t_input = received[:s_split], received[s_split:].detach()
        last = student.post_process
        if t_input is not None:
            teacher.set_input_tensor(t_input)
        with torch.no_grad():
            t_out = self._stream(teacher, teacher, mb.teacher_tokens_BL, mb.teacher_index_T, last)
        if s_input is not None:
            student.set_input_tensor(s_input)
        s_out = self._stream(model, student, mb.student_tokens_BL, mb.student_index_T, last)
        if not last:
            return torch.cat([s_out, t_out], dim=0), _never_called
        return s_out, partial(self._loss, mb, t_out)

    def _stream(
        self,
        model: torch.nn.Module,
        inner: torch.nn.Module,
        tokens_BL: torch.Tensor,
        rows_T: torch.Tensor,
        last: bool,
    ) -> torch.Tensor:
        """Hidden states to send on (``[L, B, H]``), or on the last stage the logits of ``rows_T``."""
        positions_BL = PairedMicrobatch.position_ids(tokens_BL)
        if not last or self.all_position_logits:
            out = model(tokens_BL, positions_BL, None)
            if not last:
                return out
            return out.reshape(-1, out.shape[-1]).index_select(0, rows_T)
        return rows_logits(inner, decoder_hidden(model, tokens_BL, positions_BL), rows_T)

    def _student_only(self, mb: PairedMicrobatch, model: torch.nn.Module, student: torch.nn.Module):
        received = student.decoder.input_tensor
        if received is not None:
            s_rows = mb.student_len // self.sequence_parallel_size
            if received.shape[0] != s_rows:
                raise RuntimeError(f"received {received.shape[0]} rows, expected {s_rows} student rows")
            student.set_input_tensor(received)
        last = student.post_process
        s_out = self._stream(model, student, mb.student_tokens_BL, mb.student_index_T, last)
        if not last:
            return s_out, _never_called
        return s_out, partial(self._loss, mb, None)

    def _loss(self, mb: PairedMicrobatch, teacher_NV: torch.Tensor | None, student_NV: torch.Tensor):
        if isinstance(self.loss_fn, StudentLoss):
            loss_sum, metrics = self.loss_fn(student_NV, teacher_NV, mb)
        else:
            loss_sum, metrics = self.loss_fn(
                student_NV, teacher_NV, mb.loss_mask_T, mb.target_ids_T, first_N=first_token_mask(mb.sample_T)
            )
        num_tokens = mb.loss_mask_T.sum().to(torch.int)
        reported = {name: value.detach().clone().reshape(()) for name, value in metrics.items()}
        # clone: the schedule may scale the returned loss in place
        reported["loss_sum"] = loss_sum.detach().clone()
        if self.logprob_fn is not None and mb.engine_logprobs_T is not None:
            student_logp = self.logprob_fn(student_NV.detach(), mb.target_ids_T)
            diff = logprob_abs_diff_tokens(mb.engine_logprobs_T, student_logp, mb.loss_mask_T)
            reported["logprob_abs_diff_sum"] = diff.sum()
            # the worst token: a mean hides a few badly synced weights
            reported["logprob_abs_diff_max"] = diff.max() if diff.numel() else diff.new_zeros(())
        return loss_sum, num_tokens, reported


def _never_called(_output: torch.Tensor):
    raise AssertionError("loss_func runs on the last pipeline stage only")
