"""One paired OPSD step as users run it: megaopsd's old path and each of issue 27's changes
added in turn up to the default, beside the plain-transformers step a user would otherwise run;
model FLOP utilisation on GPUs.

Each path takes the same rollouts (fixed shuffled lengths) and does one optimizer step:
- megaopsd: ``build_components`` + ``train_step`` (fixed teacher, JSD(0.5), response-only
  logits, length-aware microbatches of ``--microbatch-tokens`` student + teacher tokens, the
  vocab-parallel loss, megatron's Adam with fp32 master weights), as a ladder:
  1. the old path: megatron's unfused attention, its torch RMSNorms with float32 weights against
     the activations (in bf16, torch's composite norm), megatron's unfused SwiGLU;
  2. + SDPA attention (``model.attention_backend=sdpa``);
  3. + norms in the activations' dtype (``megaopsd/models/norm.py``; the fused norm);
  4. + megatron's fused SwiGLU (``bias_activation_fusion``, on by default on GPUs): the default.
  A rung that changes nothing on this run (3 in float32: nothing to cast; 4 on CPU, or without
  Triton: the fusion is off there) is not run again and has no figure of its own (nan);
- plain transformers (the official OPSD stack's way): ``Qwen3ForCausalLM`` with SDPA attention,
  a frozen deep copy as teacher, full-vocab logits, the naive full-vocab JSD(0.5) in float32 on
  the response positions, torch's AdamW (fused on CUDA) on the model's own weights;
  length-sorted microbatches of at most ``--microbatch-tokens`` tokens.
MFU counts ``megaopsd.flops.paired_step_flops`` (unpadded work of both streams) against the
device's dense peak (known for H100/H200, or ``--peak-tflops``); on CPU there is no peak and
the bench prints the achieved GFLOP/s. Beside the steps: the loss alone (forward + backward at
``--loss-tokens`` rows of the model's vocabulary), megaopsd's compiled and torch paths against
the naive one.

    python bench/mfu.py --shape qwen3_1p7b                      # on a GPU: the issue's shape, bf16
    python bench/mfu.py --preset small --rollouts 4 --response-max 2048    # CPU, float32
    python bench/mfu.py --preset tiny --rollouts 4 --prompt 8 --teacher-prompt 16 \
        --response-min 4 --response-max 12 --microbatch-tokens 64 --repeats 1   # the suite's toy run

Ends with ``RESULT gpu_mfu mfu=... step_s=... unfused_step_s=... sdpa_step_s=... norms_step_s=...
hf_step_s=... sdpa_over_unfused=... over_hf=... loss_ms=... torch_loss_ms=... naive_loss_ms=...``:
``step_s`` is the default (the last rung), ``unfused_step_s`` the old path, ``sdpa_step_s``
and ``norms_step_s`` rungs 2 and 3 (``norms_step_s`` nan when the norm cast changes nothing),
``sdpa_over_unfused`` default / old path; ``mfu`` (of the default) is nan without a peak;
``loss_ms`` is the compiled loss, what ``loss.implementation=auto`` runs on CUDA.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_check import _sync, bench_divergence, naive_jsd  # noqa: E402
from bench.paired_step import make_samples  # noqa: E402


def make_model_dir(args: argparse.Namespace, out: Path) -> Path:
    """A Hugging Face directory with random weights: a tiny preset, or the named shape."""
    if args.shape is None:
        from tools.make_tiny_model import make_tiny_model

        return make_tiny_model("qwen3", out / args.preset, preset=args.preset)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tools.make_tiny_model import qwen3_config

    path = out / args.shape
    shape = qwen3_config(args.shape)
    config = Qwen3Config(**{k: v for k, v in shape.items() if k != "architectures"})
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    # megaopsd reads the shape from config.json: keep the public values exactly
    (path / "config.json").write_text(json.dumps({**json.loads((path / "config.json").read_text()), **shape}))
    return path


def _cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _median_step(step, device: torch.device, repeats: int) -> float:
    """Seconds per call, the median after one warm-up call."""
    step()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _float32_weight_norms(chunks) -> None:
    """Put back megatron's plain torch RMSNorm (the old path): float32 weight, bf16 input."""
    from megaopsd.models.norm import ActivationDtypeRMSNorm

    for chunk in chunks:
        for module in chunk.modules():
            if type(module) is ActivationDtypeRMSNorm:
                module.__class__ = torch.nn.RMSNorm


# The ladder: (row, attention backend, old norms, fused SwiGLU; None: the default for the device)
RUNGS = [
    ("old path: unfused attention, fp32-weight norms, unfused SwiGLU", "unfused", True, False),
    ("+ SDPA attention", "sdpa", True, False),
    ("+ norms in the activation dtype", "sdpa", False, False),
    ("the default (+ fused SwiGLU on GPUs)", "sdpa", False, None),
]


def effective(rung: tuple, args, device: torch.device) -> tuple:
    """What a rung runs on this device and dtype (rungs with equal values are one path)."""
    from megaopsd.runtime.kernels import compiles_kernels_for

    _, attention, old_norms, swiglu = rung
    return (
        attention,
        old_norms and args.dtype != "float32",
        compiles_kernels_for(device) if swiglu is None else swiglu,  # what ModelConfig.swiglu_fusion picks
    )


def changes(keys: list[tuple]) -> list[bool]:
    """Whether each rung runs another path than the rung before it (the first always does)."""
    return [i == 0 or key != keys[i - 1] for i, key in enumerate(keys)]


def megaopsd_step_s(
    hf_dir: Path, samples, args, runtime, attention: str, old_norms: bool, swiglu: bool | None
) -> tuple[float, list[float]]:
    """Seconds per ``train_step`` with ``model.attention_backend=attention``, the old norms when
    ``old_norms``, megatron's fused SwiGLU per ``swiglu`` (None: the device's default), and the
    losses."""
    from megaopsd.algorithm.batch import build_microbatches
    from megaopsd.algorithm.step import train_step
    from megaopsd.components import build_components
    from megaopsd.config import load_config

    cfg = load_config(
        dict(
            model=dict(
                hf_path=str(hf_dir),
                dtype=args.dtype,
                attention_backend=attention,
                transformer_overrides={} if swiglu is None else {"bias_activation_fusion": swiglu},
            ),
            parallel=dict(use_distributed_optimizer=True),
            teacher=dict(mode="fixed"),
            loss=dict(kind="jsd", beta=0.5, chunk_tokens=1024),
            trainer=dict(lr=1e-6, microbatch_tokens=args.microbatch_tokens),
            runtime=dict(device=runtime.device.type, cpu_threads=0),
        )
    )
    torch.manual_seed(0)
    parts = build_components(cfg, runtime)
    if old_norms:
        teacher_chunks = [parts.teacher.chunk(i) for i in range(len(parts.student.chunks))]
        _float32_weight_norms([*parts.student.chunks, *teacher_chunks])
    mbs = build_microbatches(samples, max_tokens=args.microbatch_tokens, pad_id=0)
    losses = []

    def step():
        result = train_step(
            student=parts.student,
            teacher=parts.teacher,
            microbatches=mbs,
            loss_fn=parts.loss_fn,
            parallel=runtime.parallel,
        )
        losses.append(result.loss)

    return _median_step(step, runtime.device, args.repeats), losses


def hf_microbatches(samples, max_tokens: int) -> list[list]:
    """Length-sorted groups of at most ``max_tokens`` padded student + teacher tokens."""
    ordered = sorted(samples, key=lambda s: len(s.teacher_prompt_ids) + len(s.response_ids))
    groups, group = [], []
    for sample in ordered:
        trial = [*group, sample]
        longest_s = max(len(s.student_prompt_ids) + len(s.response_ids) for s in trial)
        longest_t = max(len(s.teacher_prompt_ids) + len(s.response_ids) for s in trial)
        if group and len(trial) * (longest_s + longest_t) > max_tokens:
            groups.append(group)
            trial = [sample]
        group = trial
    return [*groups, group]


def _padded(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def _response_rows(logits: torch.Tensor, prompts: list[int], responses: list[int]) -> torch.Tensor:
    """The logits that predict each response token (position prompt - 1 + j)."""
    return torch.cat([logits[i, p - 1 : p - 1 + r] for i, (p, r) in enumerate(zip(prompts, responses))])


def hf_step_s(hf_dir: Path, samples, args, device: torch.device) -> float:
    """Seconds per plain-transformers paired step (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="sdpa").to(device)
    model.train()
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")
    groups = hf_microbatches(samples, args.microbatch_tokens)
    total = sum(len(s.response_ids) for s in samples)

    def step():
        for group in groups:
            responses = [len(s.response_ids) for s in group]
            s_ids, s_mask = _padded([s.student_prompt_ids + s.response_ids for s in group], device)
            t_ids, t_mask = _padded([s.teacher_prompt_ids + s.response_ids for s in group], device)
            with torch.no_grad():
                t_logits = teacher(input_ids=t_ids, attention_mask=t_mask).logits
            s_logits = model(input_ids=s_ids, attention_mask=s_mask).logits
            t_rows = _response_rows(t_logits, [len(s.teacher_prompt_ids) for s in group], responses)
            s_rows = _response_rows(s_logits, [len(s.student_prompt_ids) for s in group], responses)
            (naive_jsd(s_rows, t_rows) / total).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return _median_step(step, device, args.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shape",
        choices=["qwen3_1p7b", "qwen3_4b", "qwen3_8b"],
        help="a real model's shape, random weights (GPU)",
    )
    parser.add_argument("--preset", default="small", choices=["tiny", "small"], help="without --shape")
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--dtype", choices=["bfloat16", "float32"])
    parser.add_argument("--rollouts", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--teacher-prompt", type=int, default=512)
    parser.add_argument("--response-min", type=int, default=128)
    parser.add_argument("--response-max", type=int, default=1024)
    parser.add_argument("--microbatch-tokens", type=int, default=8192)
    parser.add_argument(
        "--loss-tokens", type=int, help="rows of the loss-alone figure (default 4096 on CUDA, 256 on CPU)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--peak-tflops", type=float, help="the device's dense peak (default: known H100/H200 figures)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")

    from megaopsd.config import ParallelConfig, RuntimeConfig
    from megaopsd.flops import ModelShape, paired_step_flops, peak_tflops
    from megaopsd.models import load_hf_config
    from megaopsd.runtime import Runtime

    machine = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{_cpu_name()}, {torch.get_num_threads()} threads"
    )
    runtime = Runtime.start(ParallelConfig(), RuntimeConfig(device=device.type, cpu_threads=0))
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = make_model_dir(args, Path(tmp))
        spec = load_hf_config(hf_dir)
        samples = make_samples(
            spec.vocab_size,
            args.rollouts,
            args.prompt,
            args.teacher_prompt,
            args.response_min,
            args.response_max,
        )
        flops = paired_step_flops(
            ModelShape.of(spec),
            [(len(s.student_prompt_ids), len(s.teacher_prompt_ids), len(s.response_ids)) for s in samples],
        )
        print(
            f"machine: {machine}; torch {torch.__version__}; {args.shape or args.preset} ({spec.num_layers} layers, "
            f"hidden {spec.hidden_size}, vocab {spec.vocab_size}), {args.dtype}; {args.rollouts} rollouts: student "
            f"prompt {args.prompt}, teacher prompt {args.teacher_prompt}, responses {args.response_min}-"
            f"{args.response_max}; {args.microbatch_tokens} tokens per microbatch; {flops / 1e12:.2f} TFLOP per step"
        )
        # each distinct path once, printed as it finishes (a run cut short keeps what it measured)
        keys = [effective(rung, args, device) for rung in RUNGS]
        runs = {}
        for rung, key in zip(RUNGS, keys):
            if key not in runs:
                runs[key] = megaopsd_step_s(hf_dir, samples, args, runtime, *rung[1:])
                print(f"  measured: {rung[0]}: {runs[key][0]:.3f} s/step", flush=True)
        hf_s = hf_step_s(hf_dir, samples, args, device)
    peak = peak_tflops(machine, args.dtype, args.peak_tflops) if device.type == "cuda" else args.peak_tflops
    # a rung that changes nothing on this run has no figure of its own (the default always has one)
    last = len(RUNGS) - 1
    changed = changes(keys)
    seconds = [runs[key][0] if changed[i] or i == last else float("nan") for i, key in enumerate(keys)]
    unfused_s, default_s = runs[keys[0]][0], runs[keys[-1]][0]
    print(f"{'path':<74}{'s/step':>10}{'GFLOP/s':>12}{'MFU':>8}")
    for (name, *_), s in [*zip(RUNGS, seconds), (("plain transformers",), hf_s)]:
        if s != s:  # nan: this rung changes nothing here
            print(f"{'megaopsd, ' + name:<74}  (changes nothing here: the rung above)")
            continue
        mfu = flops / s / (peak * 1e12) if peak else float("nan")
        label = name if name == "plain transformers" else f"megaopsd, {name}"
        print(f"{label:<74}{s:>10.3f}{flops / s / 1e9:>12.1f}{mfu:>8.1%}")
    print(f"first step loss: old path {runs[keys[0]][1][0]:.6f}, default {runs[keys[-1]][1][0]:.6f}")
    print(
        f"default / old path step time {default_s / unfused_s:.3f}; megaopsd (default) / plain transformers "
        f"{default_s / hf_s:.3f}"
    )
    loss_tokens = args.loss_tokens or (4096 if device.type == "cuda" else 256)
    print(f"the loss alone, JSD(0.5) at {loss_tokens} x {spec.vocab_size}, bf16 logits, forward + backward:")
    loss = bench_divergence(device, loss_tokens, spec.vocab_size, repeats=max(args.repeats, 1))
    mfu = flops / default_s / (peak * 1e12) if peak else float("nan")
    print(
        f"RESULT gpu_mfu mfu={mfu:.3f} step_s={default_s:.3f} unfused_step_s={unfused_s:.3f} "
        f"sdpa_step_s={seconds[1]:.3f} norms_step_s={seconds[2]:.3f} hf_step_s={hf_s:.3f} "
        f"sdpa_over_unfused={default_s / unfused_s:.3f} over_hf={default_s / hf_s:.3f} attention=sdpa "
        f"loss_ms={loss['compiled'][0]:.1f} torch_loss_ms={loss['torch'][0]:.1f} "
        f"naive_loss_ms={loss['naive'][0]:.1f} device={device.type}"
    )
    runtime.shutdown()


if __name__ == "__main__":
    main()
