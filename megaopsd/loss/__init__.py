"""Vocab-parallel OPSD divergences on TP-sharded logits (torch and torch.distributed only).

loss_sum, metrics = vocab_parallel_divergence(student_TW, teacher_TW, mask_T, kind="jsd",
                                              beta=0.5, temperature=1.0, vocab_size=V, tp_group=tp)
loss = loss_sum / global_token_count
"""

from megaopsd.loss.divergence import KINDS, DivergenceMetrics, vocab_parallel_divergence

__all__ = ["KINDS", "DivergenceMetrics", "vocab_parallel_divergence"]
