"""The learning experiment: does OPSD make a model better, against GRPO and SFT, on a 2-core CPU?

    make experiment                      # or: python tools/learning_experiment.py --out outputs/experiment

1. a char-level tiny Qwen3 (tools/make_tiny_model.py --tokenizer char, 0.6M parameters) and the
   synthetic multi-step sums of tools/make_arith_data.py (the first 200 held-out problems);
2. warm start with megaopsd's own SFT mode on the reference solutions, after the student prompt
   AND after the teacher prompt (``algorithm.sft_prompts=both``: the self-teacher must be able to
   read its privileged context), 900 steps (measured once: accuracy stays near 5 % for 600
   steps, then jumps to ~57 % by step 900); exported to Hugging Face;
3. from that checkpoint, OPSD (the released loss: forward KL with the per-entry clip), OPSD with
   JSD(0.5), GRPO (n=8), SFT, RLSD (n=8), position-weighted OPSD and the successful-rollout
   self-teacher (n=8; the variants: docs/variants.md), each for the same number of steps of the
   same number of prompts, per seed;
4. a second condition (``--conditions forward,reversed``): the same problems with references in
   a style the warm-started student does not write (the partial sums taken from the right, or a
   terse sketch), as the references of real math datasets are; the methods that read references
   (``--other-methods``) run again on them, GRPO's runs are shared (it reads none);
5. held-out avg@4 (sampled at T=1 through the live engine, the in-training evaluator) every few
   steps, against generated tokens and wall time; per condition a row of the PNG plot, a
   markdown table of final accuracies and of the tokens each method needed to reach a set of
   accuracies (the ratio to GRPO at matched accuracy), and every curve in ``summary.json``.

Every run is ``python -m megaopsd.train recipe=arith_cpu ...``; the numbers are read back from
the TensorBoard event files. ``--smoke`` runs the whole pipeline at toy size (a test uses it).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the sibling tools are imported as tools.*
    sys.path.insert(0, str(REPO))

from tools.make_arith_data import STYLES  # noqa: E402

BENCH = "arith"
# The warm start imitates the forward references, so they are the style the student writes
# itself; the other styles (tools/make_arith_data.py) are references it does not write.
OWN_STYLE = "forward"

# The released OPSD loss (the official runs' settings, as the recipes opsd_qwen3_* carry them):
# forward KL, per-entry clip 0.05, fixed teacher; the official loss temperature is the sampling
# temperature, here 1.0.
OPSD_RELEASED = [
    "algorithm.name=opsd",
    "loss.kind=forward_kl",
    "loss.beta=0.0",
    "loss.clip=0.05",
    "loss.clip_mode=entry",
    "loss.temperature=1.0",
    "teacher.mode=fixed",
]
METHODS: dict[str, list[str]] = {
    "opsd": OPSD_RELEASED,
    "opsd_jsd": ["algorithm.name=opsd", "loss.kind=jsd", "loss.beta=0.5", "teacher.mode=fixed"],
    "grpo": ["algorithm.name=grpo", "rollout.n=8"],
    "sft": ["algorithm.name=sft"],
    # the variants (docs/variants.md): RLSD as upstream runs it (the current model as its
    # teacher), position-weighted OPSD on the released loss (as its official launcher) and the
    # successful-rollout self-teacher with JSD(0.5)
    "rlsd": ["algorithm.name=rlsd", "rollout.n=8", "teacher.mode=current"],
    "pw_opsd": [*OPSD_RELEASED[1:], "algorithm.name=pw_opsd"],
    "sdpo": [
        "algorithm.name=opsd",
        "teacher.context=successful_rollout",
        "rollout.n=8",
        "loss.kind=jsd",
        "loss.beta=0.5",
        "teacher.mode=fixed",
    ],
}
# Under the other reference styles: the methods that read the references, and GRPO beside them
# (the same runs as under the own style: it reads no reference).
OTHER_METHODS = "opsd,opsd_jsd,pw_opsd,grpo,sft"


def train(out: Path, overrides: list[str], log: Path) -> None:
    """One ``megaopsd.train`` run in its own process; its output goes to ``log``."""
    cmd = [sys.executable, "-m", "megaopsd.train", "recipe=arith_cpu", f"output_dir={out}", *overrides]
    with log.open("w") as handle:
        done = subprocess.run(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"run failed ({done.returncode}); see {log}")


def scalars(tb_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, dict[int, float]] = {}
    for events in sorted(tb_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            values.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def curve(tb_dir: Path, k: int) -> list[dict[str, float]]:
    """(step, generated tokens, wall seconds, held-out avg@k) at every evaluation."""
    v = scalars(tb_dir)
    acc = v[f"eval/{BENCH}/avg@{k}"]
    tokens = v.get("rollout/generated_tokens_total", {})
    step_time = v.get("perf/step_time_s", {})
    eval_time = v.get("perf/eval_time_s", {})
    points = []
    for step in sorted(acc):
        # wall time of training so far, evaluations excluded (they are the measurement)
        wall = sum(t - eval_time.get(s, 0.0) for s, t in step_time.items() if 1 <= s <= step)
        points.append(
            {
                "step": step,
                "tokens": tokens.get(step, 0.0) if step else 0.0,
                "wall_s": wall,
                "accuracy": acc[step],
            }
        )
    return points


def train_file(out: Path, style: str) -> Path:
    """The training problems with their references in ``style`` (tools/make_arith_data.py)."""
    return out / "data" / ("train.jsonl" if style == OWN_STYLE else f"train_{style}.jsonl")


def paths(args: argparse.Namespace, style: str = "forward") -> dict[str, str]:
    out = Path(args.out)
    return {
        "model.hf_path": str(out / "model"),
        "data.train_files": f"[{train_file(out, style)}]",
        "eval.benchmarks": f"['{BENCH}={out / 'data' / 'heldout.jsonl'}']",
        "eval.k": str(args.k),
        "eval.limit": str(args.heldout),
    }


def make_data(out: Path, heldout: int, style: str) -> None:
    if train_file(out, style).is_file():
        return
    subprocess.run(
        [
            sys.executable,
            "tools/make_arith_data.py",
            "--out",
            str(out / "data"),
            "--heldout",
            str(heldout),
            "--style",
            style,
        ],
        cwd=REPO,
        check=True,
    )


def warm_overrides(args: argparse.Namespace) -> list[str]:
    """The warm start's run: SFT after both prompts (the teacher learns to read its context)."""
    return [f"{k}={v}" for k, v in paths(args).items()] + [
        "algorithm.name=sft",
        "algorithm.sft_prompts=both",
        f"trainer.max_steps={args.warm_steps}",
        f"trainer.lr={args.warm_lr}",
        f"checkpoint.save_interval={args.warm_steps}",
        f"eval.interval={max(args.warm_steps // 5, 1)}",
        "eval.at_start=false",
    ]


def cached(directory: Path, key: list[str], done: Path) -> bool:
    """Whether ``done`` exists and was made by a run of these settings (``key``); a finished run
    of other settings (steps, learning rate, an earlier warm start) is not reused."""
    record = directory / "settings.json"
    return done.is_file() and record.is_file() and json.loads(record.read_text()) == key


def prepare(args: argparse.Namespace) -> Path:
    """Model, data, SFT warm start, export; returns the warm-started Hugging Face directory."""
    out = Path(args.out)
    hf = out / "warm" / "hf"
    for style in args.conditions:
        make_data(out, args.heldout, style)
    if cached(out / "warm", warm_overrides(args), hf / "config.json"):
        return hf
    if (out / "warm").exists():
        shutil.rmtree(out / "warm")
    subprocess.run(
        [
            sys.executable,
            "tools/make_tiny_model.py",
            "--family",
            "qwen3",
            "--tokenizer",
            "char",
            "--out",
            str(out / "model"),
        ],
        cwd=REPO,
        check=True,
    )
    print(f"warm start: {args.warm_steps} SFT steps", flush=True)
    (out / "warm").mkdir(parents=True)
    train(out / "warm", warm_overrides(args), out / "warm.log")
    ckpt = out / "warm" / "checkpoints" / f"iter_{args.warm_steps:07d}"
    subprocess.run(
        [sys.executable, "tools/convert_checkpoint.py", "export-hf", "--ckpt", str(ckpt), "--out", str(hf)],
        cwd=REPO,
        check=True,
    )
    (out / "warm" / "settings.json").write_text(json.dumps(warm_overrides(args)))
    return hf


def run_dir(args: argparse.Namespace, method: str, seed: int, style: str) -> Path:
    """Where one run lives. A method that reads no reference (GRPO, the successful-rollout
    teacher) is the same run under every condition: the problems, their order and their
    answers do not depend on the references' style, so it runs once, under the own style."""
    if style == OWN_STYLE or not reads_references(method):
        return Path(args.out) / "runs" / f"{method}_seed{seed}"
    return Path(args.out) / "runs" / style / f"{method}_seed{seed}"


def reads_references(method: str) -> bool:
    """Whether ``method`` reads the dataset's reference solutions (as SFT targets or as the
    teacher's context)."""
    settings = METHODS[method]
    return "algorithm.name=grpo" not in settings and "teacher.context=successful_rollout" not in settings


def run_settings(
    args: argparse.Namespace, hf: Path, method: str, seed: int, style: str = "forward"
) -> tuple[Path, list[str], list[str]]:
    """Where one post-training run lives, its trainer overrides, and the key its finished run
    is reused under (the overrides, k and the warm start it starts from)."""
    out = run_dir(args, method, seed, style)
    if not reads_references(method):
        style = OWN_STYLE  # the same run under every condition (``run_dir``): the same settings
    settings = {**paths(args, style), "model.hf_path": str(hf)}
    overrides = [f"{k}={v}" for k, v in settings.items()] + [
        f"trainer.max_steps={args.steps}",
        f"trainer.prompts_per_step={args.prompts}",
        f"trainer.lr={args.lr}",
        f"eval.interval={args.eval_interval}",
        f"runtime.seed={seed}",
        f"rollout.seed={seed}",
        f"data.shuffle_seed={seed}",
        *METHODS[method],
    ]
    return out, overrides, [*overrides, f"k={args.k}", *warm_overrides(args)]


def post_train(
    args: argparse.Namespace, hf: Path, method: str, seed: int, style: str = "forward"
) -> list[dict[str, float]]:
    out, overrides, key = run_settings(args, hf, method, seed, style)
    done = out / "curve.json"
    if cached(out, key, done):
        return json.loads(done.read_text())
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    start = time.perf_counter()
    train(out, overrides, out / "train.log")
    points = curve(out / "tensorboard", args.k)
    (out / "settings.json").write_text(json.dumps(key))
    done.write_text(json.dumps(points))
    print(
        f"{method} seed {seed} ({style} references): {points[0]['accuracy']:.3f} -> "
        f"{points[-1]['accuracy']:.3f} ({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    return points


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def tokens_to_reach(tokens: list[float], accuracy: list[float], level: float) -> float | None:
    """Generated tokens at which a curve first reaches ``level``, linear between evaluations.

    None when it never does. A curve that starts at or above the level needs no tokens.
    """
    if accuracy[0] >= level:
        return tokens[0]
    for i in range(1, len(accuracy)):
        if accuracy[i] >= level:
            a0, a1 = accuracy[i - 1], accuracy[i]
            return tokens[i - 1] + (tokens[i] - tokens[i - 1]) * (level - a0) / (a1 - a0)
    return None


def matched_levels(start: float, finals: list[float], count: int = 4) -> list[float]:
    """``count`` accuracy levels evenly between the start and the best method's final mean."""
    top = max(finals)
    return [start + (top - start) * (i + 1) / count for i in range(count)] if top > start else []


def matched_accuracy(summary: dict) -> dict:
    """Tokens each method needed to reach each level (interpolated on its mean curve), and the
    ratio to GRPO's tokens at the same level: accuracy per generated token at matched accuracy."""
    methods = summary["methods"]
    levels = matched_levels(summary["start"], [m["final_mean"] for m in methods.values()])
    out: dict = {"levels": levels, "methods": {}}
    for name, m in methods.items():
        reached = [tokens_to_reach(m["mean_tokens"], m["mean_curve"], level) for level in levels]
        out["methods"][name] = {"tokens": reached}
    grpo = out["methods"].get("grpo")
    for entry in out["methods"].values():
        entry["ratio_to_grpo"] = [
            None if grpo is None or mine is None or not theirs else mine / theirs
            for mine, theirs in zip(
                entry["tokens"], grpo["tokens"] if grpo else [None] * len(levels), strict=True
            )
        ]
    return out


def summarize(results: dict[str, list[list[dict[str, float]]]], args: argparse.Namespace) -> dict:
    """Start accuracy, each method's final accuracy (mean, std over seeds), tokens to reach GRPO."""
    starts = [run[0]["accuracy"] for runs in results.values() for run in runs]
    start, start_std = _mean_std(starts)
    n_eval = args.heldout * args.k
    summary = {"start": start, "start_std_over_runs": start_std, "methods": {}}
    grpo_final = None
    if "grpo" in results:
        grpo_final = _mean_std([run[-1]["accuracy"] for run in results["grpo"]])[0]
    for method, runs in results.items():
        finals = [run[-1]["accuracy"] for run in runs]
        mean, std = _mean_std(finals)
        # standard error of the gain: seed spread of the final and sampling of the start
        se = math.sqrt(std**2 / len(runs) + start * (1 - start) / (n_eval * len(starts)))
        steps = [p["step"] for p in runs[0]]
        mean_curve = [sum(run[i]["accuracy"] for run in runs) / len(runs) for i in range(len(steps))]
        tokens = [sum(run[i]["tokens"] for run in runs) / len(runs) for i in range(len(steps))]
        walls = [sum(run[i]["wall_s"] for run in runs) / len(runs) for i in range(len(steps))]
        reach = None
        if grpo_final is not None:
            hit = [i for i, a in enumerate(mean_curve) if a >= grpo_final]
            reach = (
                {"step": steps[hit[0]], "tokens": tokens[hit[0]], "wall_s": walls[hit[0]]} if hit else None
            )
        summary["methods"][method] = {
            "final_mean": mean,
            "final_std": std,
            "gain": mean - start,
            "gain_se": se,
            "gain_in_se": (mean - start) / se if se > 0 else float("inf"),
            "tokens_total": tokens[-1],
            "wall_s_total": walls[-1],
            "reach_grpo_final": reach,
            "steps": steps,
            "mean_curve": mean_curve,
            "mean_tokens": tokens,
            "curves": runs,  # per seed: step, generated tokens, wall s, accuracy at every evaluation
        }
    summary["matched"] = matched_accuracy(summary)
    return summary


def table(summary: dict, args: argparse.Namespace) -> str:
    rows = [
        f"Start (SFT warm start): avg@{args.k} = {100 * summary['start']:.1f} %  "
        f"({args.heldout} held-out problems x {args.k} samples at T=1)",
        "",
        f"| method | final avg@{args.k} (mean +- std, {args.seeds} seeds) | gain (in std. errors) "
        "| generated tokens | train wall s | to reach GRPO's final |",
        "|---|---|---|---|---|---|",
    ]
    for method, m in summary["methods"].items():
        reach = m["reach_grpo_final"]
        reach_text = "never" if reach is None else f"step {reach['step']}, {reach['tokens']:.0f} tokens"
        rows.append(
            f"| {method} | {100 * m['final_mean']:.1f} +- {100 * m['final_std']:.1f} | "
            f"{100 * m['gain']:+.1f} ({m['gain_in_se']:.1f}) | {m['tokens_total']:.0f} | {m['wall_s_total']:.0f} | "
            f"{reach_text} |"
        )
    matched = summary.get("matched", {})
    if matched.get("levels"):
        rows += [
            "",
            "Generated tokens to reach each accuracy (mean curve over seeds, linear between "
            "evaluations; in brackets: the ratio to GRPO's tokens at the same accuracy)",
            "",
            "| method | " + " | ".join(f"{100 * level:.1f} %" for level in matched["levels"]) + " |",
            "|---|" + "---|" * len(matched["levels"]),
        ]
        for method, m in matched["methods"].items():
            cells = [
                "never" if tokens is None else f"{tokens:.0f}" + ("" if ratio is None else f" ({ratio:.2f}x)")
                for tokens, ratio in zip(m["tokens"], m["ratio_to_grpo"], strict=True)
            ]
            rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def plot(conditions: dict[str, dict], path: Path, k: int) -> None:
    """One row per reference condition: accuracy against generated tokens (log axis) and against
    training wall time; the line is the mean over seeds, the band their min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(conditions), 2, figsize=(11, 4 * len(conditions)), squeeze=False)
    colors = {method: f"C{i}" for i, method in enumerate(METHODS)}  # a method's colour in every row
    for row, (style, results) in zip(axes, conditions.items(), strict=True):
        for method, runs in results.items():
            for ax, key in zip(row, ("tokens", "wall_s"), strict=True):
                xs = [sum(run[i][key] for run in runs) / len(runs) for i in range(len(runs[0]))]
                accs = [[100 * run[i]["accuracy"] for run in runs] for i in range(len(runs[0]))]
                mean = [sum(a) / len(a) for a in accs]
                lo, hi = [min(a) for a in accs], [max(a) for a in accs]
                ax.plot(xs, mean, marker="o", label=method, color=colors.get(method))
                ax.fill_between(xs, lo, hi, alpha=0.2, color=colors.get(method))
        row[0].set_xlabel("generated tokens (training rollouts)")
        row[0].set_xscale("symlog", linthresh=1000)
        row[1].set_xlabel("training wall time, s (evaluation excluded)")
        for ax in row:
            ax.set_ylabel(f"held-out avg@{k}, %")
            ax.set_title(f"{style} references" + (" (the student's own style)" if style == OWN_STYLE else ""))
            ax.grid(alpha=0.3)
        row[1].legend(title="band: min..max over seeds", fontsize="small", loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/experiment")
    parser.add_argument(
        "--methods",
        help="comma list of " + ",".join(METHODS) + " (default: all of them; with --smoke opsd,grpo,sft)",
    )
    parser.add_argument(
        "--conditions",
        default=f"{OWN_STYLE},reversed",
        help=f"comma list of reference styles, {OWN_STYLE} first (the warm start's own style; others: "
        + ", ".join(s for s in STYLES if s != OWN_STYLE)
        + "); default %(default)s",
    )
    parser.add_argument(
        "--other-methods",
        default=OTHER_METHODS,
        help="the methods run under the other conditions (default %(default)s; methods that read no "
        "reference are shared with the own style's runs)",
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--seed-base", type=int, default=0, help="the first seed: runs seeds N .. N + seeds - 1 (default 0)"
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--eval-interval", type=int, default=10)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--heldout", type=int, default=200)
    parser.add_argument("--warm-steps", type=int, default=900)
    parser.add_argument("--warm-lr", type=float, default=1e-3)
    parser.add_argument(
        "--smoke", action="store_true", help="toy sizes: checks the pipeline, not the science"
    )
    parser.add_argument(
        "--plot-only",
        action="store_true",
        help="redraw <out>/accuracy.png from <out>/summary.json; run nothing",
    )
    args = parser.parse_args(argv)
    if args.plot_only:
        summary = json.loads((Path(args.out) / "summary.json").read_text())
        curves = {
            style: {m: v["curves"] for m, v in condition["methods"].items()}
            for style, condition in summary["conditions"].items()
        }
        plot(curves, Path(args.out) / "accuracy.png", args.k)
        return 0
    if args.smoke:
        args.seeds, args.steps, args.prompts, args.eval_interval = 1, 1, 4, 1
        args.heldout, args.k, args.warm_steps = 8, 2, 2
    if args.methods is None:
        args.methods = "opsd,grpo,sft" if args.smoke else ",".join(METHODS)
    args.conditions = args.conditions.split(",")
    methods = {OWN_STYLE: args.methods.split(",")}
    for style in args.conditions[1:]:
        methods[style] = args.other_methods.split(",")
    problems = [f"unknown method {m!r}" for ms in methods.values() for m in ms if m not in METHODS]
    problems += [f"unknown reference style {s!r}" for s in args.conditions if s not in STYLES]
    if args.conditions[0] != OWN_STYLE:
        problems.append(f"--conditions must start with {OWN_STYLE} (the warm start's style)")
    if problems:
        parser.error("; ".join(problems) + f"; methods: {', '.join(METHODS)}; styles: {', '.join(STYLES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    reused = cached(out / "warm", warm_overrides(args), out / "warm" / "hf" / "config.json")
    hf = prepare(args)
    warm_s = None if reused else time.perf_counter() - start
    # seed-major: an interrupted experiment still has whole seeds (finished runs are cached)
    results: dict[str, dict[str, list]] = {style: {m: [] for m in ms} for style, ms in methods.items()}
    for seed in range(args.seed_base, args.seed_base + args.seeds):
        for style, ms in methods.items():
            for m in ms:
                results[style][m].append(post_train(args, hf, m, seed, style))
    summary: dict = {
        "seeds": list(range(args.seed_base, args.seed_base + args.seeds)),
        "steps": args.steps,
        "conditions": {style: summarize(runs, args) for style, runs in results.items()},
    }
    for style, condition in summary["conditions"].items():
        condition["shared_with_own_style"] = [
            m for m in methods[style] if style != OWN_STYLE and not reads_references(m)
        ]
    summary["total_wall_s"] = time.perf_counter() - start
    summary["warm_start_wall_s"] = warm_s  # None: an earlier invocation made the warm start
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    text = "\n".join(
        f"### {style} references"
        + (" (the student's own style)" if style == OWN_STYLE else "")
        + "\n\n"
        + table(condition, args)
        for style, condition in summary["conditions"].items()
    )
    (out / "table.md").write_text(text)
    plot(results, out / "accuracy.png", args.k)
    print(text)
    print(
        f"plot: {out / 'accuracy.png'}; summary: {out / 'summary.json'}; total {summary['total_wall_s']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
