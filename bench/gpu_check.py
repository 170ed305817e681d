"""CUDA checks and figures for a lent GPU (one device, NCCL, bf16).

1. The vocab-parallel divergences on CUDA: every kind against a float64 full-vocab autograd
   reference (float32 and bf16 inputs), through the torch operations and, for the kinds that
   have it, the compiled chunk bodies (``loss.implementation``); then JSD(0.5) at Qwen3's
   vocabulary (151936) and 4096 tokens, torch path and compiled path, against the naive
   full-vocab autograd loss: peak memory and time (the compiled path's first call, which
   compiles, is not timed).
2. megatron-core on CUDA through megaopsd's runtime (NCCL, no CPU emulation): the `small`
   Qwen3 built from its HF config matches transformers' logits (float32), and 10 bf16 paired
   OPSD steps (fixed teacher) run with a falling loss.

    python bench/gpu_check.py                        # on a GPU: prints a table; ends with RESULT lines
    python bench/gpu_check.py --device cpu --smoke   # the same code at toy size on CPU (the suite runs it)

On CPU the figures mean nothing (no CUDA timing, no CUDA memory statistics: peaks print as 0);
the CPU path exists so that nothing in this script can break unnoticed between GPU sessions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = [
    ("jsd", 0.5),
    ("forward_kl", 0.0),
    ("reverse_kl", 1.0),
    ("topk", 0.5),
    ("topk_tail", 0.5),
    ("pg", 0.5),
]


def reference_grad(kind: str, beta: float, s: torch.Tensor, t: torch.Tensor, ids: torch.Tensor, k: int = 8):
    """float64 full-vocab autograd reference of the summed loss (kinds as in megaopsd.loss)."""
    s = s.detach().double().requires_grad_(True)
    t = t.detach().double()
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    if kind.startswith("topk"):
        top = lt.topk(k, dim=-1).indices
        a, b = ls.gather(-1, top), lt.gather(-1, top)
        if kind == "topk":
            ls, lt = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        else:
            tail = lambda x: torch.log1p(-x.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-12))  # noqa: E731
            ls, lt = torch.cat([a, tail(a)], -1), torch.cat([b, tail(b)], -1)
    if kind == "pg":
        lps, lpt = ls.gather(-1, ids[:, None]).squeeze(1), lt.gather(-1, ids[:, None]).squeeze(1)
        loss = (-(lpt - lps).detach() * lps).sum()
    elif beta == 0.0:
        loss = (lt.exp() * (lt - ls)).sum()
    elif beta == 1.0:
        loss = (ls.exp() * (ls - lt)).sum()
    else:
        lm = torch.logsumexp(
            torch.stack([lt + torch.tensor(beta).log(), ls + torch.tensor(1 - beta).log()]), 0
        )
        loss = (beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)).sum()
    loss.backward()
    return loss.detach(), s.grad


def check_divergences(device: torch.device) -> float:
    from megaopsd.loss import vocab_parallel_divergence

    worst = 0.0
    gen = torch.Generator(device="cpu").manual_seed(0)
    cases = [(kind, beta, "torch") for kind, beta in KINDS]
    if device.type == "cuda":  # on CPU tests/unit/test_loss_compiled.py checks them (and saves
        # the seconds of C++ each inductor build costs here); the timed loss below runs it anyway
        cases += [(kind, beta, "compiled") for kind, beta in KINDS]
    for dtype in (torch.float32, torch.bfloat16):
        for kind, beta, implementation in cases:
            s = (3 * torch.randn(257, 1000, generator=gen)).to(device, dtype).requires_grad_(True)
            t = (3 * torch.randn(257, 1000, generator=gen)).to(device, dtype)
            ids = torch.randint(0, 1000, (257,), generator=gen).to(device)
            loss, _ = vocab_parallel_divergence(
                s,
                t,
                torch.ones(257, device=device),
                kind=kind,
                beta=beta,
                vocab_size=1000,
                top_k=8 if kind.startswith("topk") else None,
                sampled_ids_T=ids if kind == "pg" else None,
                implementation=implementation,
            )
            loss.backward()
            ref_loss, ref_grad = reference_grad(kind, beta, s.float(), t.float(), ids)
            err = max(
                abs(float(loss) - float(ref_loss)) / abs(float(ref_loss)),
                float((s.grad.double() - ref_grad).norm() / ref_grad.norm()),
            )
            worst = max(worst, err) if dtype == torch.float32 else worst
            print(f"  {kind:<11} {implementation:<9} {dtype!s:<15} rel err vs float64 {err:.2e}")
    return worst


def naive_jsd(s: torch.Tensor, t: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """The official OPSD-style loss on full-vocab logits with plain autograd."""
    ls, lt = torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1)
    lm = torch.logsumexp(torch.stack([ls + torch.tensor(1 - beta).log(), lt + torch.tensor(beta).log()]), 0)
    kl_t = torch.nn.functional.kl_div(lm, lt, reduction="none", log_target=True).sum(-1)
    kl_s = torch.nn.functional.kl_div(lm, ls, reduction="none", log_target=True).sum(-1)
    return (beta * kl_t + (1 - beta) * kl_s).sum()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_mib(device: torch.device, base: int) -> float:
    """CUDA's peak allocated memory above ``base``; 0 on CPU (no allocator statistics there)."""
    return (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else 0.0


def bench_divergence(device: torch.device, tokens: int = 4096, vocab: int = 151936, repeats: int = 5):
    from megaopsd.loss import vocab_parallel_divergence

    s0 = torch.randn(tokens, vocab, device=device, dtype=torch.bfloat16)
    t0 = torch.randn(tokens, vocab, device=device, dtype=torch.bfloat16)
    mask = torch.ones(tokens, device=device)

    def ours(implementation: str):
        return lambda s: vocab_parallel_divergence(
            s,
            t0,
            mask,
            kind="jsd",
            beta=0.5,
            vocab_size=vocab,
            chunk_tokens=1024,
            implementation=implementation,
        )[0]

    variants = {"torch": ours("torch"), "compiled": ours("compiled"), "naive": lambda s: naive_jsd(s, t0)}
    out = {}
    for name, fn in variants.items():
        times = []
        for _ in range(repeats + 1):
            s = s0.clone().requires_grad_(True)
            _sync(device)
            base = 0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            loss = fn(s)
            loss.backward()
            _sync(device)
            times.append((time.perf_counter() - start) * 1e3)
            peak = _peak_mib(device, base)
            value = float(loss)
            del s, loss
        out[name] = (statistics.median(times[1:]), peak, value)
        print(f"  {name:<6} {out[name][0]:8.1f} ms  peak +{peak:8.0f} MiB  loss {value:.6f}")
    return out


def megatron_on_device(device: str, preset: str = "small", steps: int = 10) -> dict[str, float]:
    """megatron-core through megaopsd's runtime on ``device``: logits vs transformers, bf16 steps."""
    from transformers import AutoModelForCausalLM

    from megaopsd.algorithm.batch import build_microbatches
    from megaopsd.algorithm.step import train_step
    from megaopsd.components import build_components
    from megaopsd.config import (
        Config,
        LossConfig,
        ModelConfig,
        ParallelConfig,
        RuntimeConfig,
        TeacherConfig,
        TrainerConfig,
    )
    from megaopsd.models import forward_logits
    from megaopsd.runtime import Runtime
    from tools.make_tiny_model import make_tiny_model

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from paired_step import make_samples

    rt_cfg = RuntimeConfig(device=device)
    runtime = Runtime.start(ParallelConfig(), rt_cfg)
    assert runtime.device.type == device and runtime.cpu_emulation == (device == "cpu")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_tiny_model("qwen3", Path(tmp) / preset, preset=preset)

        def components(dtype: str, lr: float):
            cfg = Config(
                model=ModelConfig(hf_path=str(hf_dir), dtype=dtype),
                runtime=rt_cfg,
                teacher=TeacherConfig(mode="fixed"),
                trainer=TrainerConfig(lr=lr, max_steps=100),
                loss=LossConfig(kind="jsd", beta=0.5),
            )
            return build_components(cfg, runtime)

        parts = components("float32", 1e-4)
        spec = parts.spec
        ids = torch.randint(0, spec.vocab_size, (2, 64))
        with torch.no_grad():
            ours = forward_logits(parts.chunks, ids, runtime.parallel)[..., : spec.vocab_size].float()
            hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(runtime.device).eval()
            ref = hf(ids.to(runtime.device)).logits.float()
        results["logits_max_abs_diff_fp32"] = float((ours - ref).abs().max())
        del hf, parts
        parts = components("bfloat16", 1e-4)
        student, teacher, loss_fn = parts.student, parts.teacher, parts.loss_fn
        # 16 rollouts: student prompt 9, teacher prompt 15, response 6 tokens; several microbatches
        mbs = build_microbatches(make_samples(spec.vocab_size, 16, 9, 15, 6, 6), max_tokens=400, pad_id=0)
        losses, times = [], []
        for _ in range(steps):
            _sync(runtime.device)
            start = time.perf_counter()
            result = train_step(
                student=student, teacher=teacher, microbatches=mbs, loss_fn=loss_fn, parallel=runtime.parallel
            )
            _sync(runtime.device)
            times.append(time.perf_counter() - start)
            losses.append(result.loss)
        print("  bf16 paired losses:", " ".join(f"{x:.5f}" for x in losses))
        results.update(
            bf16_first_loss=losses[0],
            bf16_last_loss=losses[-1],
            bf16_step_ms=statistics.median(times[2:] or times) * 1e3,
        )
    runtime.shutdown()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--smoke", action="store_true", help="toy sizes: checks the code, not the figures")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    tokens, vocab, repeats = (64, 1024, 1) if args.smoke else (4096, 151936, 5)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    from megaopsd.runtime.kernels import compiles_kernels_for

    print(f"device: {name}  torch {torch.__version__}")
    print(f"compiled kernels (Triton) for the loss and the fused SwiGLU: {compiles_kernels_for(device)}")
    print(f"divergences vs float64 reference ({device.type}):")
    worst = check_divergences(device)
    print(f"JSD(0.5), {tokens} tokens x vocab {vocab}, bf16 logits, forward + backward:")
    figures = bench_divergence(device, tokens, vocab, repeats)
    (compiled_ms, compiled_mb, compiled_loss), (naive_ms, naive_mb, naive_loss) = (
        figures["compiled"],
        figures["naive"],
    )
    print(f"megatron-core on {device.type} through megaopsd's runtime:")
    mc = megatron_on_device(
        args.device, preset="tiny" if args.smoke else "small", steps=3 if args.smoke else 10
    )
    for key, value in mc.items():
        print(f"  {key:<28} {value:.6g}")
    mem_ratio = compiled_mb / naive_mb if naive_mb else float("nan")
    print(
        f"RESULT gpu_divergence device={device.type} fp32_worst_rel_err={worst:.2e} mem_ratio={mem_ratio:.3f} "
        f"time_ratio={compiled_ms / naive_ms:.3f} compiled_ms={compiled_ms:.1f} torch_ms={figures['torch'][0]:.1f} "
        f"naive_ms={naive_ms:.1f} "
        f"compiled_peak_mib={compiled_mb:.0f} torch_peak_mib={figures['torch'][1]:.0f} naive_peak_mib={naive_mb:.0f} loss_rel_diff="
        f"{abs(compiled_loss - naive_loss) / abs(naive_loss):.2e}"
    )
    print(
        f"RESULT gpu_megatron device={device.type} logits_max_abs_diff_fp32={mc['logits_max_abs_diff_fp32']:.2e} "
        f"bf16_first_loss={mc['bf16_first_loss']:.5f} bf16_last_loss={mc['bf16_last_loss']:.5f} "
        f"bf16_step_ms={mc['bf16_step_ms']:.1f}"
    )


if __name__ == "__main__":
    main()
