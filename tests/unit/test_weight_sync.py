"""Weight-sync bucketing and transports, without an engine (a recording stand-in for vllm.LLM)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megaopsd.rollout.weight_sync import (
    DirectoryTransport,
    InMemoryTransport,
    engine_module,
    iter_buckets,
    order_by_module,
    sync_weights,
)


def _layer(i: int, *, bias: bool) -> list[tuple[str, torch.Tensor]]:
    """One decoder layer in HF names, fused members adjacent (as the exporter yields them)."""
    p = f"model.layers.{i}"
    names = [f"{p}.input_layernorm.weight"]
    for proj in ("q_proj", "k_proj", "v_proj"):
        names.append(f"{p}.self_attn.{proj}.weight")
        if bias:
            names.append(f"{p}.self_attn.{proj}.bias")
    names += [
        f"{p}.self_attn.o_proj.weight",
        f"{p}.post_attention_layernorm.weight",
        f"{p}.mlp.gate_proj.weight",
        f"{p}.mlp.up_proj.weight",
        f"{p}.mlp.down_proj.weight",
    ]
    return [(n, torch.full((4, 8), float(k))) for k, n in enumerate(names)]  # 128 bytes each


def _model(*, layers: int = 3, bias: bool = False, lm_head: bool = False) -> list[tuple[str, torch.Tensor]]:
    weights = [("model.embed_tokens.weight", torch.randn(16, 8))]
    for i in range(layers):
        weights += _layer(i, bias=bias)
    weights.append(("model.norm.weight", torch.ones(8)))
    if lm_head:
        weights.append(("lm_head.weight", torch.randn(16, 8)))
    return weights


def test_engine_module_names():
    assert engine_module("model.layers.3.self_attn.k_proj.bias") == "model.layers.3.self_attn.qkv_proj"
    assert engine_module("model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.gate_up_proj"
    assert engine_module("model.layers.3.mlp.down_proj.weight") == "model.layers.3.mlp.down_proj"
    assert engine_module("model.layers.1.mlp.experts.7.gate_proj.weight") == "model.layers.1.mlp.experts"
    assert engine_module("model.norm.weight") == "model.norm"
    assert engine_module("lm_head.weight") == "lm_head"


@pytest.mark.parametrize("bucket_bytes", [1, 300, 700, 1 << 30])
def test_buckets_never_split_a_module_and_respect_the_size(bucket_bytes):
    weights = _model(layers=3, bias=True, lm_head=True)
    buckets = list(iter_buckets(weights, bucket_bytes=bucket_bytes, tie_word_embeddings=False))
    assert [pair for bucket in buckets for pair in bucket] == weights  # all of it, in order
    where = {}
    for index, bucket in enumerate(buckets):
        for name, _ in bucket:
            where.setdefault(engine_module(name), set()).add(index)
        size = sum(t.numel() * t.element_size() for _, t in bucket)
        assert size <= bucket_bytes or len({engine_module(n) for n, _ in bucket}) == 1
    assert all(len(indices) == 1 for indices in where.values())
    qkv = [
        n for n, _ in buckets[where["model.layers.1.self_attn.qkv_proj"].pop()] if "qkv" in engine_module(n)
    ]
    assert len(qkv) >= 6  # q, k, v weights and biases of layer 1 in one bucket
    if bucket_bytes == 1:
        assert len(buckets) == len(where) == 1 + 3 * 6 + 2  # one module per bucket
    if bucket_bytes == 1 << 30:
        assert len(buckets) == 1


def test_tied_models_send_lm_head_once_right_after_the_embedding():
    weights = _model(layers=1, lm_head=True)  # a source that also yields lm_head.weight
    sent = [
        pair for bucket in iter_buckets(weights, bucket_bytes=1, tie_word_embeddings=True) for pair in bucket
    ]
    names = [n for n, _ in sent]
    assert names[:2] == ["model.embed_tokens.weight", "lm_head.weight"]
    assert names.count("lm_head.weight") == 1
    assert sent[1][1] is sent[0][1]  # the embedding itself, no copy
    untied = [n for b in iter_buckets(weights, bucket_bytes=1, tie_word_embeddings=False) for n, _ in b]
    assert untied == [n for n, _ in weights]


def test_contract_violations_raise():
    weights = _model(layers=1)
    reordered = [*weights[:5], weights[6], weights[5], *weights[7:]]  # any module order is fine
    assert len(list(iter_buckets(reordered, bucket_bytes=1, tie_word_embeddings=False))) == 8
    split = [w for w in weights if "k_proj" not in w[0]] + [w for w in weights if "k_proj" in w[0]]
    with pytest.raises(ValueError, match=r"k_proj\.weight arrived after other modules"):
        list(iter_buckets(split, bucket_bytes=1, tie_word_embeddings=False))
    with pytest.raises(ValueError, match="never arrived"):
        list(iter_buckets(weights[1:], bucket_bytes=1, tie_word_embeddings=True))


def test_order_by_module_makes_a_sorted_state_dict_adjacent():
    weights = _model(layers=2, bias=True)
    by_name = sorted(weights, key=lambda pair: pair[0])  # how a safetensors file lists them
    with pytest.raises(ValueError):
        list(iter_buckets(by_name, bucket_bytes=1, tie_word_embeddings=False))
    ordered = order_by_module(by_name)
    assert sorted(n for n, _ in ordered) == sorted(n for n, _ in weights)
    buckets = list(iter_buckets(ordered, bucket_bytes=1, tie_word_embeddings=False))
    assert len(buckets) == 1 + 2 * 6 + 1  # embedding, 6 engine modules per layer, norm


class RecordingLLM:
    """Stands in for vllm.LLM: records what reload_weights received."""

    def __init__(self):
        self.loaded: list[list[tuple[str, torch.Tensor]]] = []
        self.resets = 0
        self.calls: list[str] = []

    def collective_rpc(self, method, kwargs=None):
        self.calls.append(method)
        if method == "refresh_cpu_moe_experts":  # after every reload: the CPU MoE kernels' prepack
            return [0]
        assert method == "reload_weights"
        if "weights_iterator" in kwargs:
            assert kwargs["is_checkpoint_format"] is True
            self.loaded.append(list(kwargs["weights_iterator"]))
        else:
            path = kwargs["weights_path"]
            files = sorted(Path(path).iterdir())
            self.loaded.append([(n, t) for f in files for n, t in load_file(f).items()])
            self.files = [f.name for f in files]
        return [None]

    def reset_prefix_cache(self):
        self.resets += 1
        return True


def test_in_memory_transport_streams_everything_in_one_call():
    llm = RecordingLLM()
    weights = _model(layers=2)
    stats = sync_weights(weights, InMemoryTransport(llm), bucket_bytes=600, tie_word_embeddings=True)
    assert len(llm.loaded) == 1 and llm.resets == 1
    assert llm.calls == ["reload_weights", "refresh_cpu_moe_experts"]  # the prepack after the load
    names = [n for n, _ in llm.loaded[0]]
    assert names == [weights[0][0], "lm_head.weight"] + [n for n, _ in weights[1:]]
    expected_bytes = sum(t.numel() * t.element_size() for _, t in weights) + weights[0][1].nbytes
    assert (stats.transport, stats.bytes, stats.tensors) == ("memory", expected_bytes, len(weights) + 1)
    assert stats.buckets > 3 and stats.seconds > 0 and stats.gbps > 0


@pytest.mark.parametrize("bucket_bytes", [600, 1 << 30])
def test_directory_transport_writes_shards_loads_once_and_cleans_up(tmp_path, bucket_bytes):
    llm = RecordingLLM()
    transport = DirectoryTransport(llm, root=tmp_path)
    weights = _model(layers=2, bias=True)
    stats = sync_weights(weights, transport, bucket_bytes=bucket_bytes, tie_word_embeddings=True)
    assert len(llm.loaded) == 1 and llm.resets == 1
    assert llm.calls == ["reload_weights", "refresh_cpu_moe_experts"]
    # one shard per bucket; with one big bucket the tied lm_head shares the embedding's file
    assert len(llm.files) == stats.buckets == (1 if bucket_bytes > 1 << 20 else 9)
    received = dict(llm.loaded[0])
    assert set(received) == {n for n, _ in weights} | {"lm_head.weight"}
    for name, tensor in weights:
        assert torch.equal(received[name], tensor)
    assert torch.equal(received["lm_head.weight"], weights[0][1])
    assert list(transport.directory.iterdir()) == []  # shards removed after the load
    transport.close()
    assert not transport.directory.exists()


def test_complete_modules_hands_every_engine_module_over_whole():
    """Experts of one layer arriving from two EP ranks in different rounds, interleaved with
    another module, leave together; a stream in module order passes through unchanged."""
    from megaopsd.rollout.weight_sync import complete_modules

    t = torch.zeros(1)
    names = [f"model.layers.0.mlp.experts.{e}.down_proj.weight" for e in range(4)] + ["model.norm.weight"]
    interleaved = [names[0], names[1], names[4], names[2], names[3]]
    out = [n for n, _ in complete_modules(((n, t) for n in interleaved), names)]
    assert out == ["model.norm.weight", *names[:4]]
    assert [n for n, _ in complete_modules(((n, t) for n in names), names)] == names
    with pytest.raises(ValueError, match=r"modules incomplete \(model.layers.0.mlp.experts\)"):
        list(complete_modules(((n, t) for n in names[:2]), names))
