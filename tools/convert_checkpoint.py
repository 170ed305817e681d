"""Convert between Hugging Face model directories and megatron distributed checkpoints.

    # HF -> megatron dist checkpoint, saved at TP2 x PP1 (2 processes)
    torchrun --nproc-per-node 2 tools/convert_checkpoint.py import-hf --hf-dir H --out C --tp 2 --pp 1
    # uneven pipeline stages (36 layers on 8 stages: 1 + 7 x 5)
    torchrun --nproc-per-node 8 tools/convert_checkpoint.py import-hf --hf-dir H --out C --pp 8 --first-stage-layers 1
    # a mixture-of-experts model with its experts dealt over 2 ranks (each reads only its own)
    torchrun --nproc-per-node 2 tools/convert_checkpoint.py import-hf --hf-dir H --out C --ep 2
    # megatron dist checkpoint (any saved layout) -> HF safetensors + config + tokenizer
    python tools/convert_checkpoint.py export-hf --ckpt C --out H2
    # a LoRA run's checkpoint (adapters only): merged HF model + a PEFT adapter
    python tools/convert_checkpoint.py export-hf --ckpt C --out H2 --peft-out A

import-hf runs at the layout it saves (world size = TP x PP x DP; DP replicas only idle).
export-hf loads the checkpoint at the running layout (``--tp``/``--pp``/``--ep``, default one process),
whatever layout it was saved at. Both refuse a non-empty ``--out`` unless ``--force``.
Runs under torchrun or srun, or as a single process; CPU machines use gloo.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # run as a script from a checkout without installing megaopsd
    sys.path.insert(0, str(_REPO))


class ConvertError(Exception):
    """A user-facing problem with the arguments or input files; printed as one line."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import-hf", help="HF model directory -> megatron distributed checkpoint")
    imp.add_argument(
        "--hf-dir", required=True, type=Path, help="HF model directory (config, safetensors, tokenizer)"
    )
    imp.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel size to save at (default 1)")
    imp.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to save at (default 1)")
    imp.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="parameter dtype; auto = the model's stored dtype (float16 -> float32)",
    )
    exp = sub.add_parser("export-hf", help="megatron distributed checkpoint -> HF model directory")
    exp.add_argument("--ckpt", required=True, type=Path, help="checkpoint directory written by import-hf")
    exp.add_argument("--out", required=True, type=Path, help="HF model directory to write")
    exp.add_argument("--tp", type=int, default=1, help="tensor-parallel size of this run (default 1)")
    exp.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of this run (default 1)")
    exp.add_argument("--max-shard-size-mb", type=int, default=2048, help="safetensors shard size limit")
    exp.add_argument(
        "--peft-out", type=Path, help="(LoRA checkpoints) also write the adapters as a PEFT adapter here"
    )
    exp.add_argument(
        "--base", type=Path, help="(LoRA checkpoints) base model directory; default the one the run used"
    )
    for p in (imp, exp):
        p.add_argument(
            "--first-stage-layers", type=int, help="uneven pipeline: decoder layers on the first stage"
        )
        p.add_argument(
            "--last-stage-layers", type=int, help="uneven pipeline: decoder layers on the last stage"
        )
        p.add_argument(
            "--ep", type=int, default=1, help="mixture-of-experts models: expert-parallel size (default 1)"
        )
        p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _check_source(path: Path, flag: str, *, needs: tuple[str, ...]) -> None:
    if not path.is_dir():
        raise ConvertError(f"{flag} {path}: no such directory")
    missing = [name for name in needs if not (path / name).is_file()]
    if missing:
        raise ConvertError(f"{flag} {path}: missing {', '.join(missing)}")


def _check_out(out: Path, source: Path, force: bool) -> None:
    if out.resolve() == source.resolve() or source.resolve().is_relative_to(out.resolve()):
        raise ConvertError(f"--out {out} would overwrite the input {source}; pick another directory")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConvertError(f"--out {out} is not empty; pass --force to overwrite it")


def check_arguments(args: argparse.Namespace) -> None:
    """Every check that needs no process group: files, architecture, layout, output directory.

    Runs on every rank before anything is written, so ranks agree on refusing.
    """
    from megaopsd.config.hf_spec import UnsupportedModelError, check_tensor_parallel, load_hf_config
    from megaopsd.runtime.distributed import read_launch_env
    from megaopsd.stages import FIRST, LAST, check_stages

    if args.command == "import-hf":
        source, flag = args.hf_dir, "--hf-dir"
        _check_source(source, flag, needs=("config.json",))
        if not any((source / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
            raise ConvertError(f"--hf-dir {source}: no model.safetensors or model.safetensors.index.json")
    else:
        source, flag = args.ckpt, "--ckpt"
        _check_source(source, flag, needs=("config.json", "metadata.json"))
        from megaopsd.convert.safe_load import UnsafeCheckpointError, check_metadata

        try:
            check_metadata(source)  # nothing in a checkpoint from elsewhere may run code
        except UnsafeCheckpointError as exc:
            raise ConvertError(f"{flag} {source}: {exc}") from exc
    try:
        spec = load_hf_config(source)
        check_tensor_parallel(spec, args.tp)
    except (UnsupportedModelError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{flag} {source}: {exc}") from exc
    if args.pp < 1:
        raise ConvertError(f"--pp {args.pp} must be >= 1")
    problem = check_stages(spec.num_layers, args.pp, None, args.first_stage_layers, args.last_stage_layers)
    if problem is not None:
        flags = {FIRST: "--first-stage-layers", LAST: "--last-stage-layers"}
        for name, flag in flags.items():
            problem = problem.replace(name, flag)
        raise ConvertError(f"--pp {args.pp}: {problem.replace('PP (and VPP)', '--pp')}")
    world = read_launch_env().world_size
    if args.ep != 1 and (spec.moe is None or spec.moe.num_experts % args.ep or args.ep < 1):
        why = f"{spec.architecture} is dense" if spec.moe is None else f"num_experts={spec.moe.num_experts}"
        raise ConvertError(
            f"--ep {args.ep} does not fit the model ({why}); use 1 or a divisor of the expert count"
        )
    if world % (args.ep * args.pp) != 0:
        raise ConvertError(
            f"--ep {args.ep} x --pp {args.pp} does not divide the {world} launched processes; "
            f"launch a multiple of {args.ep * args.pp}"
        )
    if world % (args.tp * args.pp) != 0:
        raise ConvertError(
            f"--tp {args.tp} x --pp {args.pp} does not divide the {world} launched processes; "
            f"launch a multiple of {args.tp * args.pp} (torchrun --nproc-per-node ...)"
        )
    _check_out(args.out, source, args.force)


def run(args: argparse.Namespace) -> None:
    """Start the runtime at the requested layout and run the conversion."""
    # megatron-core warns about every missing GPU library on import; none of them matter here.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from megaopsd.config import ParallelConfig, RuntimeConfig
    from megaopsd.convert.offline import export_hf_checkpoint, import_hf_checkpoint
    from megaopsd.runtime import Runtime

    runtime = Runtime.start(
        ParallelConfig(
            tensor_model_parallel_size=args.tp,
            pipeline_model_parallel_size=args.pp,
            num_layers_in_first_pipeline_stage=args.first_stage_layers,
            num_layers_in_last_pipeline_stage=args.last_stage_layers,
            expert_model_parallel_size=args.ep,
            sequence_parallel=args.tp > 1 and args.ep > 1,  # megatron's rule for TP x EP
        ),
        RuntimeConfig(),
    )
    progress = not args.no_progress and runtime.is_main
    try:
        if args.command == "import-hf":
            dtype = None if args.dtype == "auto" else args.dtype
            import_hf_checkpoint(
                args.hf_dir, args.out, runtime, dtype=dtype, force=args.force, progress=progress
            )
        else:
            export_hf_checkpoint(
                args.ckpt,
                args.out,
                runtime,
                force=args.force,
                max_shard_bytes=args.max_shard_size_mb * 2**20,
                progress=progress,
                base_dir=args.base,
                peft_out=args.peft_out,
            )
        if runtime.is_main:
            print(f"{args.command}: wrote {args.out}")
    finally:
        runtime.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        check_arguments(args)
    except ConvertError as exc:
        print(f"convert_checkpoint.py: error: {exc}", file=sys.stderr)
        return 2
    run(args)
    return 0


if __name__ == "__main__":
    from megaopsd.runtime.distributed import exit_without_teardown

    exit_without_teardown(main())
