"""Megatron logits == Hugging Face transformers logits (float32, CPU) at TP1, TP2, PP2, TP2xPP2.

One spawn per layout checks all three families (a spawn costs 5-10 s), plus a Llama variant
whose llama3 rope numbers differ from the ones megatron-core hardcodes (so megaopsd computes
the frequencies itself). The references (logits, rope inverse frequencies) are computed once
in the test process; workers return max abs differences, logits compared on the true
vocabulary after gathering the vocab-parallel shards (the gather happens only here, in tests).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.dist_harness import run_ranks

TOLERANCE = 1e-4
BATCH, SEQ = 2, 24


def make_batch(vocab_size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (BATCH, SEQ), generator=generator)


def hf_logits(model_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    return hf_reference(model_dir, input_ids)[0]


def hf_reference(model_dir: Path, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' logits for ``input_ids`` and its rope inverse frequencies."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids).logits, model.model.rotary_emb.inv_freq.clone()


def gather_vocab(logits_BSV: torch.Tensor, tp_group) -> torch.Tensor:
    """Test-only: concatenate the TP shards of vocab-parallel logits."""
    import torch.distributed as dist

    parts = [torch.empty_like(logits_BSV) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(parts, logits_BSV.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)


def megatron_logits(runtime, model_dir: Path, input_ids: torch.Tensor, load=None, inv_freq_out=None):
    """Build the model from ``model_dir``, fill it (HF weights unless ``load`` is given), run forward.

    Returns the gathered, unpadded logits on the last stage's TP rank 0, else None. The rope
    inverse frequencies of the first chunk are appended to ``inv_freq_out`` when given.
    """
    from megaopsd.config import ModelConfig
    from megaopsd.convert import load_hf_weights
    from megaopsd.models import build_model_chunks, forward_logits, load_hf_config

    spec = load_hf_config(model_dir)
    chunks = build_model_chunks(spec, ModelConfig(hf_path=str(model_dir)), runtime.parallel)
    if inv_freq_out is not None:
        inv_freq_out.append(chunks[0].rotary_pos_emb.inv_freq.cpu())
    if load is None:
        load_hf_weights(chunks, spec, model_dir, runtime.parallel)
    else:
        load(chunks)
    logits = forward_logits(chunks, input_ids, runtime.parallel)
    if logits is None:
        return None
    full = gather_vocab(logits, runtime.parallel.tp_group)
    return full[..., : spec.vocab_size] if runtime.parallel.tp_rank == 0 else None


def parity_worker(tp: int, pp: int, vpp: int | None, cases: dict) -> dict[str, tuple[float, float]]:
    """All cases at one layout: {case: (logit diff, inv_freq diff)} (max abs) on the reporting rank."""
    from megaopsd.config import ParallelConfig, RuntimeConfig
    from megaopsd.runtime import Runtime

    runtime = Runtime.start(
        ParallelConfig(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp,
        ),
        RuntimeConfig(),
    )
    try:
        diffs = {}
        for name, (model_dir, input_ids, ref_logits, ref_inv_freq) in cases.items():
            inv_freq: list[torch.Tensor] = []
            logits = megatron_logits(runtime, model_dir, input_ids, inv_freq_out=inv_freq)
            if logits is not None:
                freq_diff = (inv_freq[0] - ref_inv_freq).abs().max().item()
                diffs[name] = ((logits - ref_logits).abs().max().item(), freq_diff)
        return diffs
    finally:
        runtime.shutdown()


def llama_with_custom_rope(llama_dir: Path, out_dir: Path) -> Path:
    """The tiny Llama with llama3 rope numbers megatron-core cannot express (its are 1 / 4 / 8192)."""
    shutil.copytree(llama_dir, out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    rope = config.get("rope_parameters") or config["rope_scaling"]
    rope.update(factor=16.0, low_freq_factor=2.0, high_freq_factor=8.0, original_max_position_embeddings=64)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


@pytest.fixture(scope="module")
def parity_cases(tiny_models, tmp_path_factory) -> dict:
    models = dict(tiny_models)
    models["llama-custom-rope"] = llama_with_custom_rope(
        tiny_models["llama"], tmp_path_factory.mktemp("rope") / "m"
    )
    cases = {}
    for name, model_dir in models.items():
        input_ids = make_batch(549, seed=len(cases))
        cases[name] = (model_dir, input_ids, *hf_reference(model_dir, input_ids))
    return cases


def _check(results: list[dict[str, tuple[float, float]]], cases) -> None:
    merged = {k: v for result in results for k, v in result.items()}
    assert sorted(merged) == sorted(cases), merged
    for name, (logit_diff, freq_diff) in merged.items():
        assert logit_diff <= TOLERANCE, f"{name}: max abs logit diff {logit_diff:.3g} > {TOLERANCE}"
        assert freq_diff <= 1e-7, (
            f"{name}: rope inverse frequencies differ from transformers by {freq_diff:.3g}"
        )


@pytest.mark.parametrize(
    ("tp", "pp", "vpp"),
    [
        pytest.param(1, 1, None, id="tp1"),
        pytest.param(2, 1, None, id="tp2"),
        pytest.param(1, 2, None, id="pp2"),
        pytest.param(1, 2, 2, id="pp2-vpp2"),
        pytest.param(2, 2, None, id="tp2xpp2"),
    ],
)
def test_logits_match_transformers(parity_cases, tp, pp, vpp):
    # The custom-rope variant checks frequencies, which do not depend on the layout: TP1 only.
    cases = {k: v for k, v in parity_cases.items() if tp * pp == 1 or k != "llama-custom-rope"}
    results = run_ranks(parity_worker, world_size=tp * pp, args=(tp, pp, vpp, cases))
    _check(results, cases)


class _NormCalls(torch.overrides.TorchFunctionMode):
    """(input dtype, weight dtype) of every RMSNorm torch is asked for."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[torch.dtype, torch.dtype]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.rms_norm, torch.nn.functional.rms_norm):
            weight = args[2] if len(args) > 2 else kwargs.get("weight")
            self.calls.append((args[0].dtype, weight.dtype))
        return func(*args, **kwargs)


def bf16_norm_worker(model_dir: Path) -> dict:
    """A bf16 qwen3 at TP2: its norms, the dtypes each RMSNorm call sees, the norms' gradients."""
    from megaopsd.config import ModelConfig, ParallelConfig, RuntimeConfig
    from megaopsd.convert import load_hf_weights
    from megaopsd.models import build_model_chunks, load_hf_config
    from megaopsd.models.norm import ActivationDtypeRMSNorm
    from megaopsd.runtime import Runtime

    runtime = Runtime.start(ParallelConfig(tensor_model_parallel_size=2), RuntimeConfig())
    try:
        spec = load_hf_config(model_dir)
        chunks = build_model_chunks(
            spec, ModelConfig(hf_path=str(model_dir), dtype="bfloat16"), runtime.parallel
        )
        load_hf_weights(chunks, spec, model_dir, runtime.parallel)
        norms = {name: m for name, m in chunks[0].named_modules() if isinstance(m, torch.nn.RMSNorm)}
        with _NormCalls() as recorder:
            ids_BS = make_batch(spec.vocab_size)
            logits = chunks[0](ids_BS, torch.arange(SEQ)[None], None)
            logits.float().square().mean().backward()
        return {
            "layers": spec.num_layers,
            "classes": {type(m).__name__ for m in norms.values()},
            "norms": sorted(norms),
            "weight_dtypes": {str(m.weight.dtype) for m in norms.values()},
            "logits_dtype": str(logits.dtype),
            "calls": [(str(i), str(w)) for i, w in recorder.calls],
            "grad_dtypes": {str(m.weight.grad.dtype) for m in norms.values() if m.weight.grad is not None},
            "grads_nonzero": sum(bool(m.weight.grad.abs().max() > 0) for m in norms.values()),
            "fused_class": ActivationDtypeRMSNorm.__name__,
        }
    finally:
        runtime.shutdown()


def test_bf16_norms_meet_their_input_in_bf16_and_keep_float32_weights(tiny_qwen3):
    """torch's fused RMSNorm (CUDA) needs input and weight in one dtype; megatron's local spec
    keeps norm weights in float32 under bf16 activations, which sends every norm to the composite
    path. Every call must see bf16 / bf16 while the parameters (what checkpoints, EMA shadows and
    the optimizer hold) stay float32 and receive their gradients."""
    results = run_ranks(bf16_norm_worker, world_size=2, args=(tiny_qwen3,))
    for rank, r in enumerate(results):
        # input and pre-MLP norms, query and key norms per layer, the final norm
        assert len(r["norms"]) == 4 * r["layers"] + 1, (rank, r["norms"])
        assert r["classes"] == {r["fused_class"]}, rank
        assert r["weight_dtypes"] == {"torch.float32"} and r["logits_dtype"] == "torch.bfloat16", rank
        assert len(r["calls"]) == len(r["norms"]), rank  # one call per norm (backward makes none)
        assert set(r["calls"]) == {("torch.bfloat16", "torch.bfloat16")}, (rank, set(r["calls"]))
        assert r["grad_dtypes"] == {"torch.float32"} and r["grads_nonzero"] == len(r["norms"]), (rank, r)


def swiglu_fusion_worker(model_dir: Path) -> dict:
    """Logits and every weight gradient of one forward + backward, megatron's fused SwiGLU
    (what GPUs run by default) against the unfused one, float32 at TP2."""
    from megaopsd.config import ModelConfig, ParallelConfig, RuntimeConfig
    from megaopsd.convert import load_hf_weights
    from megaopsd.models import build_model_chunks, load_hf_config
    from megaopsd.runtime import Runtime

    runtime = Runtime.start(ParallelConfig(tensor_model_parallel_size=2), RuntimeConfig())
    try:
        spec = load_hf_config(model_dir)
        out = {}
        for fused in (False, True):
            model_cfg = ModelConfig(
                hf_path=str(model_dir), transformer_overrides={"bias_activation_fusion": fused}
            )
            chunk = build_model_chunks(spec, model_cfg, runtime.parallel)[0]
            assert chunk.config.bias_activation_fusion == fused
            load_hf_weights([chunk], spec, model_dir, runtime.parallel)
            logits = chunk(make_batch(spec.vocab_size), torch.arange(SEQ)[None], None)
            logits.square().mean().backward()
            out[fused] = [logits.detach()] + [p.grad for _, p in sorted(chunk.named_parameters())]
        return {
            "tensors": len(out[True]),
            "rel_errors": [
                ((a - b).abs().max() / b.abs().max()).item()
                for a, b in zip(out[True], out[False], strict=True)
            ],
        }
    finally:
        runtime.shutdown()


def test_fused_swiglu_equals_the_unfused_one(tiny_qwen3):
    """GPUs run megatron's fused SwiGLU (``ModelConfig.swiglu_fusion``); its torch.compile'd
    kernels are built here as C++ and must give the unfused layer's logits and gradients."""
    for rank, r in enumerate(run_ranks(swiglu_fusion_worker, world_size=2, args=(tiny_qwen3,))):
        assert r["tensors"] > 10, rank
        assert max(r["rel_errors"]) <= 1e-5, (rank, r["rel_errors"])
