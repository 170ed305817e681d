"""Evaluate a model on math benchmarks with vLLM: k samples per problem, math-verify grading.

The default is the OPSD paper's protocol: temperature 1.0, top-p 1.0, no top-k, thinking on,
the student prompt, k samples per problem, avg@k as the headline number (with pass@k and
majority@k). ``--model`` is a Hugging Face directory or a megaopsd checkpoint (a directory
with ``metadata.json``, or a checkpoint root with a ``latest`` marker), which is exported to a
temporary HF directory with ``tools/convert_checkpoint.py export-hf`` first.

    python tools/eval_math.py --model /models/Qwen3-1.7B --benchmark aime24 --benchmark aime25 \\
        --benchmark hmmt25 --k 16 --max-new-tokens 38912 --out outputs/eval/base
    python tools/eval_math.py --model outputs/checkpoints/iter_0000100 --benchmark aime24=data/aime24.jsonl

Every GPU: ``--engines E --engine-tp T`` runs E vLLM engines of tensor-parallel size T in
E x T processes (``torchrun --nproc-per-node E*T tools/eval_math.py ...`` or ``srun --ntasks
E*T``); ranks ``e*T .. e*T+T-1`` form engine ``e`` (the colocated engines of training, vLLM's
``external_launcher``). The problems are split into contiguous blocks, one per engine; each
problem's k samples stay on one engine and its request seed comes from (seed, problem index),
so the records are the same whatever the number of engines. Rank 0 grades and writes.

Writes ``<out>/samples_<benchmark>.jsonl`` (one line per response: problem id, sample index,
response text, extracted answer, correct, ...) and ``<out>/summary.json``, and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # run as a script from a checkout without installing megaopsd
    sys.path.insert(0, str(_REPO))

from megaopsd.data.dataset import DataError  # noqa: E402
from megaopsd.data.prompts import STUDENT_TEMPLATE  # noqa: E402
from megaopsd.eval.benchmarks import Benchmark, load_benchmark, parse_benchmark_arg  # noqa: E402
from megaopsd.eval.grading import Grader, GradingSettings  # noqa: E402
from megaopsd.eval.runner import BenchmarkResult, build_prompt_ids, run_benchmark  # noqa: E402
from megaopsd.runtime.distributed import (  # noqa: E402
    LaunchEnv,
    init_process_group,
    read_launch_env,
    select_device,
)

if TYPE_CHECKING:
    from megaopsd.rollout import EngineSettings, SamplingSettings
    from megaopsd.rollout.fleet import EngineFleet

CONVERT_SCRIPT = _REPO / "tools" / "convert_checkpoint.py"
GIB = 1 << 30


class EvalError(Exception):
    """A user-facing problem with the arguments or inputs; printed as one line."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="HF model directory or megaopsd checkpoint")
    p.add_argument(
        "--benchmark",
        action="append",
        required=True,
        metavar="NAME[=PATH]",
        help="aime24 | aime25 | hmmt25 | math500 (from the hub), or NAME=file.jsonl|.parquet; repeatable",
    )
    p.add_argument("--out", required=True, type=Path, help="directory for samples_*.jsonl and summary.json")
    p.add_argument("--k", type=int, default=16, help="samples per problem (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=38912, help="response length limit (default 38912)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1, help="-1 disables top-k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-thinking", action="store_true", help="chat template with enable_thinking=False")
    p.add_argument("--template", default=STUDENT_TEMPLATE, help="user message template with {problem}")
    p.add_argument("--problem-column", help="override the benchmarks' problem column")
    p.add_argument("--answer-column", help="override the benchmarks' answer column")
    p.add_argument("--id-column", help="override the benchmarks' id column ('' = row positions)")
    p.add_argument("--limit", type=int, help="only the first N problems of each benchmark")
    p.add_argument("--dtype", default="auto", help="engine dtype: auto (the model's), float32, bfloat16")
    p.add_argument("--max-model-len", type=int, help="default: longest prompt + --max-new-tokens")
    p.add_argument(
        "--kv-cache-gib", type=float, default=4.0, help="vLLM KV cache size (default 4; raise it on GPUs)"
    )
    p.add_argument("--engines", type=int, default=1, help="vLLM engines (processes = engines x engine-tp)")
    p.add_argument("--engine-tp", type=int, default=1, help="tensor-parallel size of each engine")
    p.add_argument(
        "--cpu-threads", type=int, default=0, help="torch threads per process on CPU (0 keeps vLLM's choice)"
    )
    p.add_argument("--grading-timeout", type=float, default=10.0, help="hard limit per graded answer (s)")
    p.add_argument("--grading-workers", type=int, default=2, help="grading processes (default 2)")
    p.add_argument("--export-dir", type=Path, help="keep a checkpoint's HF export here (default: temp)")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress on stderr (default: a bar on a terminal, a line every "
        "$MEGAOPSD_PROGRESS_INTERVAL seconds, 30 by default, in logs)",
    )
    return p


# ----------------------------------------------------------------------------- model


def checkpoint_dir(model: Path) -> Path | None:
    """The megaopsd checkpoint ``model`` names (itself, or what its ``latest`` marker names), if any."""
    marker = model / "latest"
    if marker.is_file():
        model = model / marker.read_text().strip()
    return model if (model / "metadata.json").is_file() else None


def export_checkpoint(ckpt: Path, out: Path) -> None:
    """Export a checkpoint to an HF directory with the conversion CLI (one process)."""
    command = [sys.executable, str(CONVERT_SCRIPT), "export-hf", "--ckpt", str(ckpt), "--out", str(out)]
    command += ["--no-progress"]  # no --force: a non-empty --export-dir is refused, not overwritten
    print(f"eval_math: exporting {ckpt} -> {out}", flush=True)
    proc = subprocess.run(command, cwd=_REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EvalError(f"export of {ckpt} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


@contextlib.contextmanager
def hf_model_dir(model: Path, export_dir: Path | None) -> Iterator[Path]:
    """``model`` itself if it is an HF directory, else a (temporary) export of the checkpoint."""
    if not model.is_dir():
        raise EvalError(f"--model {model}: no such directory")
    ckpt = checkpoint_dir(model)
    if ckpt is None:
        if not (model / "config.json").is_file():
            raise EvalError(
                f"--model {model}: neither an HF model (config.json) nor a checkpoint (metadata.json)"
            )
        yield model
    elif export_dir is not None:
        export_checkpoint(ckpt, export_dir)
        yield export_dir
    else:
        with tempfile.TemporaryDirectory(prefix="megaopsd-eval-") as tmp:
            export_checkpoint(ckpt, Path(tmp))
            yield Path(tmp)


# ----------------------------------------------------------------------------- output


def write_samples(result: BenchmarkResult, out: Path) -> Path:
    """``<out>/samples_<name>.jsonl``: one JSON object per response."""
    path = out / f"samples_{result.name}.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for record in result.records:
            handle.write(json.dumps(dataclasses.asdict(record), ensure_ascii=False) + "\n")
    return path


def format_table(results: list[BenchmarkResult]) -> str:
    """A plain-text table: one row per benchmark, rates in percent."""
    head = f"{'benchmark':<12} {'problems':>8} {'k':>3} {'avg@k':>7} {'pass@k':>7} {'maj@k':>7}"
    head += f" {'len':>8} {'no-box':>7} {'trunc':>7}"
    lines = [head, "-" * len(head)]
    for r in results:
        s, k = r.summary, r.k
        lines.append(
            f"{r.name:<12} {int(s['num_problems']):>8} {k:>3} {100 * s[f'avg@{k}']:>6.2f}%"
            f" {100 * s[f'pass@{k}']:>6.2f}% {100 * s[f'majority@{k}']:>6.2f}%"
            f" {s['response_length_mean']:>8.1f} {100 * s['no_answer_frac']:>6.1f}%"
            f" {100 * s['truncated_frac']:>6.1f}%"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def _load_benchmarks(args: argparse.Namespace) -> list[Benchmark]:
    benchmarks = []
    for text in args.benchmark:
        name, path = parse_benchmark_arg(text)
        benchmarks.append(
            load_benchmark(
                name,
                path,
                problem_column=args.problem_column,
                answer_column=args.answer_column,
                id_column=args.id_column,
                limit=args.limit,
            )
        )
    if len({b.name for b in benchmarks}) != len(benchmarks):
        raise EvalError("each --benchmark name may appear once")
    return benchmarks


def launch_processes(args: argparse.Namespace) -> LaunchEnv:
    """This process's place in the launch; its size must be ``--engines x --engine-tp``."""
    if args.engines < 1 or args.engine_tp < 1:
        raise EvalError("--engines and --engine-tp must be >= 1")
    launch = read_launch_env()
    needed = args.engines * args.engine_tp
    if launch.world_size != needed:
        raise EvalError(
            f"--engines {args.engines} x --engine-tp {args.engine_tp} needs {needed} processes but "
            f"the launch has {launch.world_size}; use torchrun --nproc-per-node {needed} (or srun --ntasks {needed})"
        )
    return launch


@contextlib.contextmanager
def start_engines(
    args: argparse.Namespace, settings: EngineSettings, launch: LaunchEnv
) -> Iterator[EngineFleet]:
    """This process's part of the engines: one in-process engine, or a colocated worker."""
    import torch

    from megaopsd.rollout import VllmEngine
    from megaopsd.rollout.fleet import EngineFleet, EngineLayout

    if launch.world_size == 1:
        layout = EngineLayout(placement="single", world_size=1)
    else:
        device = select_device("auto", launch)
        init_process_group(launch, device)
        # vLLM's external_launcher reads the torchrun variables; srun does not set them
        os.environ.update(
            RANK=str(launch.rank), LOCAL_RANK=str(launch.local_rank), WORLD_SIZE=str(launch.world_size)
        )
        layout = EngineLayout(placement="colocated", world_size=launch.world_size, engine_tp=args.engine_tp)
        settings = dataclasses.replace(settings, external_launcher=True, tensor_parallel_size=args.engine_tp)
    engine = VllmEngine(settings)
    if args.cpu_threads > 0 and not torch.cuda.is_available():
        torch._C.set_num_threads(args.cpu_threads)  # vLLM's CPU worker sets its own count
    fleet = EngineFleet(
        engine,
        layout,
        rank=launch.rank,
        replica_of_rank=[0] * launch.world_size,
        dp_rank=0,
        dp_size=1,
        sleep_level=0,
    )
    try:
        yield fleet
    finally:
        fleet.close()


def _run_benchmarks(
    args: argparse.Namespace,
    engines: EngineFleet,
    tokenizer: Any,
    benchmarks: list[Benchmark],
    sampling: SamplingSettings,
    grader: Grader,
) -> list[BenchmarkResult]:
    """Rank 0: every benchmark through all engines, graded, its samples file written."""
    results = []
    for benchmark in benchmarks:
        start = time.perf_counter()
        result = run_benchmark(
            engines,
            tokenizer,
            benchmark,
            k=args.k,
            sampling=sampling,
            grader=grader,
            template=args.template,
            enable_thinking=not args.no_thinking,
            show_progress=not args.no_progress,
        )
        path = write_samples(result, args.out)
        print(f"eval_math: {benchmark.name}: {time.perf_counter() - start:.1f} s, wrote {path}", flush=True)
        results.append(result)
    return results


def evaluate_model(
    args: argparse.Namespace, model_dir: Path, benchmarks: list[Benchmark], launch: LaunchEnv
) -> dict | None:
    """Start the engines on ``model_dir``, run every benchmark, write the files; the summary
    (rank 0; the other ranks generate their blocks and return None)."""
    from transformers import AutoTokenizer

    from megaopsd.rollout import EngineSettings, SamplingSettings

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    thinking = not args.no_thinking
    longest = max(
        len(ids)
        for b in benchmarks
        for ids in build_prompt_ids(tokenizer, b, template=args.template, enable_thinking=thinking)
    )
    engine_settings = EngineSettings(
        model_path=str(model_dir),
        dtype=args.dtype,
        max_model_len=args.max_model_len or longest + args.max_new_tokens,
        kv_cache_bytes=int(args.kv_cache_gib * GIB),
        in_process=True,
        seed=args.seed,
    )
    sampling = SamplingSettings(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    grading = GradingSettings(timeout_s=args.grading_timeout, num_workers=args.grading_workers)
    results = []
    with start_engines(args, engine_settings, launch) as engines:
        if launch.rank != 0:  # generate this rank's blocks, in the same order as rank 0
            for benchmark in benchmarks:
                prompts = build_prompt_ids(
                    tokenizer, benchmark, template=args.template, enable_thinking=thinking
                )
                engines.generate(prompts, dataclasses.replace(sampling, n=args.k))
            return None
        with Grader(grading) as grader:
            results = _run_benchmarks(args, engines, tokenizer, benchmarks, sampling, grader)
    print(format_table(results))
    return {
        "model": str(args.model),
        "settings": {
            "k": args.k,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "top_k": args.top_k,
            "max_new_tokens": args.max_new_tokens,
            "seed": args.seed,
            "enable_thinking": thinking,
            "template": args.template,
            "max_model_len": engine_settings.max_model_len,
            "dtype": args.dtype,
            "engines": args.engines,
            "engine_tp": args.engine_tp,
        },
        "benchmarks": {
            r.name: {"source": b.source, "k": r.k, **r.summary, "num_problems": len(b)}
            for r, b in zip(results, benchmarks)
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.k < 1 or args.max_new_tokens < 1:
            raise EvalError("--k and --max-new-tokens must be >= 1")
        launch = launch_processes(args)
        benchmarks = _load_benchmarks(args)  # fail on data problems before starting an engine
        args.out.mkdir(parents=True, exist_ok=True)
        with hf_model_dir(args.model, args.export_dir if launch.rank == 0 else None) as model_dir:
            summary = evaluate_model(args, model_dir, benchmarks, launch)
    except (EvalError, DataError) as exc:
        print(f"eval_math.py: error: {exc}", file=sys.stderr)
        return 2
    if summary is None:  # not rank 0: its blocks went to rank 0
        return 0
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"eval_math: wrote {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    from megaopsd.runtime.distributed import exit_without_teardown

    exit_without_teardown(main())
