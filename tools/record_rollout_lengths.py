"""Record the (student prompt, teacher prompt, response) lengths of real rollouts.

Runs the recipe's prompt stream and vLLM engine (no training: the weights stay at
``model.hf_path``) for a few steps and writes one JSON object per step with the lengths of
every rollout. The microbatching test replays the demo's recording
(``tests/fixtures/demo_rollout_lengths.json``) to measure padding.

    python tools/record_rollout_lengths.py --steps 8 --out tests/fixtures/demo_rollout_lengths.json \
        recipe=tiny_cpu model.hf_path=outputs/models/tiny-qwen3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for megaopsd.train")
    args = parser.parse_args(argv)

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from megaopsd.config import load_config
    from megaopsd.data.prompts import PromptTemplates
    from megaopsd.data.stream import build_prompt_stream
    from megaopsd.rollout.engine import generate_rollouts
    from megaopsd.rollout.types import EngineSettings, SamplingSettings
    from megaopsd.rollout.vllm_engine import VllmEngine
    from megaopsd.train import register_defaults

    register_defaults()  # conf/ builds on the dataclass defaults

    conf_dir = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf_dir, version_base=None):
        raw = compose(config_name="config", overrides=args.overrides)
    cfg = load_config(OmegaConf.to_container(raw, resolve=True))
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_path)
    templates = PromptTemplates(
        student_enable_thinking=cfg.data.student_enable_thinking,
        teacher_enable_thinking=cfg.data.teacher_enable_thinking,
    )
    prompts = build_prompt_stream(
        cfg.data, tokenizer, templates=templates, max_teacher_prompt_tokens=cfg.data.max_teacher_prompt_tokens
    )
    settings = EngineSettings.from_config(
        cfg.model.hf_path, cfg.rollout, dtype=cfg.rollout.dtype or cfg.model.dtype, in_process=True
    )
    engine = VllmEngine(settings)
    steps = []
    try:
        for step in range(1, args.steps + 1):
            batch = prompts.next_prompts(cfg.trainer.prompts_per_step)
            rollouts = generate_rollouts(engine, batch, SamplingSettings.from_config(cfg.rollout), step=step)
            steps.append(
                [
                    [len(r.student_prompt_ids), len(r.teacher_prompt_ids), len(r.response_ids)]
                    for r in rollouts
                ]
            )
    finally:
        engine.close()
    Path(args.out).write_text(
        json.dumps({"recipe_overrides": args.overrides, "steps": steps}, indent=None) + "\n"
    )
    print(f"wrote {len(steps)} steps of rollout lengths to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
