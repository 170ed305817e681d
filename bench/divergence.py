"""Benchmark: vocab-parallel chunked JSD vs the naive full-vocab autograd JSD, TP2 on CPU.

Setup: 2 gloo ranks (spawned here, one CPU thread each), 4096 tokens, vocab 32768 (16384 per
rank), float32, JSD beta 0.5, temperature 1, forward + backward, every token unmasked.

- ours:  ``megaopsd.loss.vocab_parallel_divergence`` on each rank's [T, V/2] shards, the torch
  path (``loss.implementation=torch``, what ``auto`` runs on CPU).
- compiled: the same call with ``implementation="compiled"``: the fused chunk bodies of
  ``megaopsd/loss/fused.py`` built by torch.compile (C++ here; the warm-up run compiles).
- naive: the official OPSD / GKD recipe: all-gather the vocab shards into full-vocab logits
  [batch=1, T, V] (backward: keep this rank's slice, as Megatron's gather does), log_softmax of
  both, mixture log-probs by logsumexp over a stack, two ``kl_div``s, plain autograd backward.
  Each rank computes the whole loss, as a TP rank would.
- chunked: what a careful user writes with autograd: vocab-parallel log-softmax on each rank's
  shard (max and sum-exp all-reduced; the sum-exp through ``torch.distributed.nn`` so its
  backward is an all-reduce too), the JSD per chunk of ``--chunk`` tokens under
  ``torch.utils.checkpoint`` (nothing full-size kept for backward), each rank backpropagating its
  shard's partial sum.

On CPU the time ratios are driven by page faults: every fresh full-size temporary is faulted in
page by page (glibc returns big blocks to the OS on free), so the bench also reports the minor
page faults of the timed runs. GPU figures (no page faults) are in the gpu_check section.

Method: each variant runs in a FRESH pair of processes. After the inputs exist, a rank reads its
current RSS and resets the kernel's peak-RSS mark (writing "5" to /proc/self/clear_refs; where
that is not allowed it falls back to ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, a lifetime
peak that may include input creation). After one warm-up and ``--repeats`` timed runs it
reads the peak (VmHWM in /proc/self/status). peak_mb is the larger rank's difference, i.e. the
extra host memory a forward + backward needs on top of the inputs (the gradient included). Time is the median over repeats of the slower rank's wall time
(barrier before and after each run). The two variants' losses and gradient norms are printed so
the comparison is between equal computations.

    .venv/bin/python bench/divergence.py [--tokens 4096 --vocab 32768 --chunk 64 --repeats 3]

The last line is ``RESULT divergence mem_ratio=... time_ratio=... time_ratio_vs_chunked=...
mem_ratio_vs_chunked=... ours_ms=... chunked_ms=... naive_ms=... ... compiled_ms=...
compiled_over_ours=...`` (ratios are ours / baseline; compiled_over_ours: compiled / torch path).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import resource
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._rss import peak_rss_mb, reset_peak_rss, rss_mb
from megaopsd.loss import vocab_parallel_divergence

TP = 2
BETA, TAU = 0.5, 1.0


class _GatherVocab(torch.autograd.Function):
    """All-gather vocab shards into full-vocab logits; backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x_TW, group):
        ctx.rank, ctx.width = dist.get_rank(group), x_TW.shape[1]
        parts = [torch.empty_like(x_TW) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x_TW.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad_TV):
        lo = ctx.rank * ctx.width
        return grad_TV[:, lo : lo + ctx.width].contiguous(), None


def naive_jsd(student_TW, teacher_TW, mask_T, group) -> torch.Tensor:
    """Generalized JSD the way the official OPSD code computes it, on gathered full-vocab logits."""
    student_BTV = _GatherVocab.apply(student_TW, group)[None]
    with torch.no_grad():
        teacher_BTV = _GatherVocab.apply(teacher_TW, group)[None]
    logp_s = F.log_softmax(student_BTV / TAU, dim=-1)
    logp_t = F.log_softmax(teacher_BTV / TAU, dim=-1)
    log_mix = torch.logsumexp(torch.stack([logp_s + math.log(1 - BETA), logp_t + math.log(BETA)]), dim=0)
    kl_teacher = F.kl_div(log_mix, logp_t, reduction="none", log_target=True)
    kl_student = F.kl_div(log_mix, logp_s, reduction="none", log_target=True)
    jsd_BT = (BETA * kl_teacher + (1 - BETA) * kl_student).sum(-1)
    return (jsd_BT * mask_T[None]).sum()


def _vocab_parallel_logp(x_CW: torch.Tensor, group) -> torch.Tensor:
    from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

    row_max = x_CW.detach().amax(dim=1, keepdim=True)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    sum_exp = differentiable_all_reduce((x_CW - row_max).exp().sum(dim=1, keepdim=True), group=group)
    return x_CW - row_max - sum_exp.log()


def _chunk_partial_jsd(s_CW: torch.Tensor, t_CW: torch.Tensor, m_C: torch.Tensor, group) -> torch.Tensor:
    """This rank's vocab-shard share of the chunk's masked JSD sum."""
    logp_s = _vocab_parallel_logp(s_CW / TAU, group)
    with torch.no_grad():
        logp_t = _vocab_parallel_logp(t_CW / TAU, group)
    log_mix = torch.logsumexp(torch.stack([logp_s + math.log(1 - BETA), logp_t + math.log(BETA)]), dim=0)
    terms = BETA * logp_t.exp() * (logp_t - log_mix) + (1 - BETA) * logp_s.exp() * (logp_s - log_mix)
    return (terms.sum(dim=1) * m_C).sum()


def chunked_autograd_jsd(student_TW, teacher_TW, mask_T, group, chunk: int) -> torch.Tensor:
    """Sum of the per-rank partial JSD over chunks, each chunk recomputed in backward."""
    from torch.utils.checkpoint import checkpoint

    total = student_TW.new_zeros(())
    for r0 in range(0, student_TW.shape[0], chunk):
        rows = slice(r0, r0 + chunk)
        total = total + checkpoint(
            _chunk_partial_jsd, student_TW[rows], teacher_TW[rows], mask_T[rows], group, use_reentrant=False
        )
    return total


def _rank_main(rank: int, port: int, variant: str, args: argparse.Namespace, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(TP))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    width = args.vocab // TP
    gen = torch.Generator().manual_seed(1234)
    # Same full-vocab logits on both ranks; each keeps its shard (generated row block by block).
    student, teacher = torch.empty(args.tokens, width), torch.empty(args.tokens, width)
    for r0 in range(0, args.tokens, 512):
        s_full = 3.0 * torch.randn(min(512, args.tokens - r0), args.vocab, generator=gen)
        t_full = s_full + torch.randn(s_full.shape, generator=gen)
        student[r0 : r0 + 512] = s_full[:, rank * width : (rank + 1) * width]
        teacher[r0 : r0 + 512] = t_full[:, rank * width : (rank + 1) * width]
    del s_full, t_full
    student.requires_grad_()
    mask = torch.ones(args.tokens, dtype=torch.bool)
    group = dist.group.WORLD

    def step() -> float:
        student.grad = None
        if variant in ("ours", "compiled"):
            loss, _ = vocab_parallel_divergence(
                student,
                teacher,
                mask,
                kind="jsd",
                beta=BETA,
                temperature=TAU,
                vocab_size=args.vocab,
                tp_group=group,
                chunk_tokens=args.chunk,
                implementation="torch" if variant == "ours" else "compiled",
            )
        elif variant == "chunked":
            partial = chunked_autograd_jsd(student, teacher, mask, group, args.chunk)
            partial.backward()
            return dist_sum(partial.detach().clone(), group)
        else:
            loss = naive_jsd(student, teacher, mask, group)
        loss.backward()
        return loss.item()

    base_mb, was_reset = rss_mb(), reset_peak_rss()
    times, faults = [], 0
    for i in range(args.repeats + 1):
        dist.barrier()
        t0, f0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        loss = step()
        dist.barrier()
        if i:  # the first run is a warm-up
            times.append(time.perf_counter() - t0)
            faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    peak_mb = peak_rss_mb(was_reset) - base_mb
    grad_sq = dist_sum(student.grad.double().pow(2).sum(), group)
    result = dict(times=times, peak_mb=peak_mb, loss=loss, grad_norm=math.sqrt(grad_sq), faults=faults)
    queue.put((rank, result))
    dist.destroy_process_group()


def dist_sum(x: torch.Tensor, group) -> float:
    dist.all_reduce(x, group=group)
    return x.item()


def _check_memory(variant: str, args: argparse.Namespace) -> None:
    """Refuse to start a variant that would not fit in the memory available now (shared machines)."""
    with open("/proc/meminfo") as f:
        avail_mb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 1024
    full_mb = args.tokens * args.vocab * 4 / 2**20  # one float32 [tokens, full vocab] tensor
    # Measured: the naive recipe peaks at ~15 full-vocab tensors per rank; ours at well under 1.
    need_mb = TP * (16 if variant == "naive" else 2) * full_mb
    if need_mb > 0.9 * avail_mb:
        sys.exit(f"{variant}: needs ~{need_mb:.0f} MB, only {avail_mb:.0f} MB available; use fewer --tokens")


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    """Run one variant on TP fresh processes; per-rank medians and peaks combined (max over ranks)."""
    _check_memory(variant, args)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=_rank_main, args=(r, port, variant, args, queue)) for r in range(TP)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=1800) for _ in range(TP))
    for p in procs:
        p.join()
    per_run = [max(r["times"][i] for r in results.values()) for i in range(args.repeats)]
    return dict(
        ms=1000 * statistics.median(per_run),
        runs_ms=[round(1000 * t) for t in per_run],
        peak_mb=max(r["peak_mb"] for r in results.values()),
        loss=results[0]["loss"],
        grad_norm=results[0]["grad_norm"],
        faults_per_run=max(r["faults"] for r in results.values()) / args.repeats,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--chunk", type=int, default=64, help="chunk_tokens of the chunked loss")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--only",
        choices=["ours", "compiled", "chunked", "naive"],
        help="run one variant (tuning); no RESULT line",
    )
    args = parser.parse_args()
    print(
        f"TP{TP} gloo, {args.tokens} tokens, vocab {args.vocab} ({args.vocab // TP}/rank), float32, "
        f"JSD beta={BETA}, fwd+bwd, torch {torch.__version__}, {os.cpu_count()} CPUs, chunk {args.chunk}"
    )
    if args.only:
        print(args.only, run_variant(args.only, args))
        return
    ours, compiled, chunked, naive = (run_variant(v, args) for v in ("ours", "compiled", "chunked", "naive"))
    print(
        f"{'variant':<8} {'median ms':>10} {'runs ms':>28} {'peak MB':>9} {'loss':>14} {'grad norm':>12} "
        f"{'faults/run':>11}"
    )
    for name, r in (("ours", ours), ("compiled", compiled), ("chunked", chunked), ("naive", naive)):
        print(
            f"{name:<8} {r['ms']:>10.0f} {r['runs_ms']!s:>28} {r['peak_mb']:>9.0f} {r['loss']:>14.6f} "
            f"{r['grad_norm']:>12.6e} {r['faults_per_run']:>11.0f}"
        )
    print(
        "note: on CPU the time ratio against the naive loss is driven by page faults (faults/run: every "
        "fresh full-vocab temporary is faulted in page by page); the chunked-autograd baseline is the "
        "fair comparison for time. GPU figures are measured separately (bench/gpu_check.py)."
    )
    print(
        f"loss rel diff {abs(ours['loss'] - naive['loss']) / abs(naive['loss']):.2e}, "
        f"grad-norm rel diff {abs(ours['grad_norm'] - naive['grad_norm']) / naive['grad_norm']:.2e}"
    )
    mem_ratio, time_ratio = ours["peak_mb"] / naive["peak_mb"], ours["ms"] / naive["ms"]
    print(
        f"RESULT divergence mem_ratio={mem_ratio:.3f} time_ratio={time_ratio:.3f} "
        f"time_ratio_vs_chunked={ours['ms'] / chunked['ms']:.3f} "
        f"mem_ratio_vs_chunked={ours['peak_mb'] / max(chunked['peak_mb'], 1e-9):.3f} ours_ms={ours['ms']:.0f} "
        f"chunked_ms={chunked['ms']:.0f} naive_ms={naive['ms']:.0f} ours_peak_mb={ours['peak_mb']:.0f} "
        f"chunked_peak_mb={chunked['peak_mb']:.0f} naive_peak_mb={naive['peak_mb']:.0f} "
        f"compiled_ms={compiled['ms']:.0f} compiled_over_ours={compiled['ms'] / ours['ms']:.3f} "
        f"compiled_peak_mb={compiled['peak_mb']:.0f}"
    )


if __name__ == "__main__":
    main()
