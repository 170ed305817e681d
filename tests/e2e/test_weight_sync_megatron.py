"""Weight sync from Megatron into a running vLLM engine, proven against a fresh engine.

After one optimizer step on the Megatron student, the weights go through the streaming HF
export into the engine that was started on the ORIGINAL model; its greedy tokens and logprobs
for fixed prompts must equal those of a fresh engine built from `export-hf` of the same
weights (the offline CLI path). The trainer's colocated TP2 / DP2 / PP2 syncs are checked in
tests/e2e/test_colocated.py and tests/e2e/test_trainer.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.dist_harness import run_ranks

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [[1, 2, 3, 4, 5], [60, 61, 62], [7, 300, 42, 11, 9, 8]]


def greedy(engine) -> list[tuple[list[int], list[float]]]:
    from megaopsd.rollout.types import SamplingSettings

    out = engine.generate(PROMPTS, SamplingSettings(temperature=0.0, max_new_tokens=16, seed=None))
    return [(c[0].response_ids, c[0].engine_logprobs) for c in out]


def sync_worker(hf_dir: str, work: str) -> dict:

    from megaopsd.algorithm.step import train_step
    from megaopsd.convert import export_hf_weights, save_model_checkpoint
    from megaopsd.models import unwrap_chunk
    from megaopsd.rollout.types import EngineSettings
    from megaopsd.rollout.vllm_engine import VllmEngine
    from tests.helpers import BUDGET_ONE, my_microbatches, paired_setup

    runtime, parts = paired_setup(hf_dir, 1, 1, lr=5e-2)
    spec, student, teacher, loss_fn = parts.spec, parts.student, parts.teacher, parts.loss_fn
    settings = EngineSettings(model_path=hf_dir, max_model_len=512, kv_cache_bytes=64 << 20, in_process=True)
    engine = VllmEngine(settings)
    before = greedy(engine)
    result = train_step(
        student=student,
        teacher=teacher,
        microbatches=my_microbatches(runtime, BUDGET_ONE),
        loss_fn=loss_fn,
        parallel=runtime.parallel,
    )
    modules = [unwrap_chunk(c) for c in student.chunks]
    stats = engine.update_weights(export_hf_weights(modules, spec, runtime.parallel))
    synced = greedy(engine)
    save_model_checkpoint(modules, Path(work) / "ckpt")
    (Path(work) / "ckpt" / "config.json").write_text((Path(hf_dir) / "config.json").read_text())
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
    ):
        (Path(work) / "ckpt" / name).write_bytes((Path(hf_dir) / name).read_bytes())
    # A clean environment: this worker's RANK/WORLD_SIZE/MASTER_PORT would make the CLI try to
    # join (and re-bind) this process's own rendezvous.
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    export = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools/convert_checkpoint.py"),
            "export-hf",
            "--ckpt",
            f"{work}/ckpt",
            "--out",
            f"{work}/hf",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert export.returncode == 0, export.stderr[-3000:]
    fresh_engine = VllmEngine(
        EngineSettings(model_path=f"{work}/hf", max_model_len=512, kv_cache_bytes=64 << 20, in_process=True)
    )
    fresh = greedy(fresh_engine)
    fresh_engine.close()
    engine.close()
    runtime.shutdown()
    return {
        "before": before,
        "synced": synced,
        "fresh": fresh,
        "loss": result.loss,
        "skipped": result.skipped,
        "bytes": stats.bytes,
    }


def test_synced_engine_equals_fresh_engine_from_export(tiny_qwen3, tmp_path):
    out = run_ranks(sync_worker, world_size=1, args=(str(tiny_qwen3), str(tmp_path)))[0]
    assert not out["skipped"] and out["bytes"] > 0
    assert [t for t, _ in out["synced"]] != [t for t, _ in out["before"]]  # the step changed the model
    for (tokens, logprobs), (fresh_tokens, fresh_logprobs) in zip(out["synced"], out["fresh"], strict=True):
        assert tokens == fresh_tokens
        assert max(abs(a - b) for a, b in zip(logprobs, fresh_logprobs, strict=True)) <= 1e-5
