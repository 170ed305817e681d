"""Conversion layouts, family tables and safetensors I/O, checked without processes or models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megaopsd.convert import FAMILIES, HFCheckpointReader, StreamingSafetensorsWriter, hf_tensor_names
from megaopsd.convert.layouts import GATE_UP, QKV, REPLICATED, ROW, VOCAB, Geometry
from megaopsd.convert.safetensors_io import side_files
from megaopsd.models import load_hf_config


class TensorSlice:
    """A torch tensor dressed as a safetensors slice (``get_shape`` + indexing)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def get_shape(self) -> list[int]:
        return list(self.tensor.shape)

    def __getitem__(self, index):
        return self.tensor[index].clone()


def _geo(tp: int, heads: int = 8, groups: int = 4, head_dim: int = 3, vocab: int = 11) -> Geometry:
    return Geometry(num_heads=heads, num_groups=groups, head_dim=head_dim, vocab_size=vocab, tp_size=tp)


def _shards(layout, hf_tensors, geo, shard_shape):
    slices = [TensorSlice(t) for t in hf_tensors]
    return [layout.read_shard(slices, geo, rank, shard_shape) for rank in range(geo.tp_size)]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_qkv_layout_interleaves_query_groups(tp):
    geo = _geo(tp)
    hidden = 5
    q = torch.randn(geo.num_heads * geo.head_dim, hidden)
    k = torch.randn(geo.num_groups * geo.head_dim, hidden)
    v = torch.randn(geo.num_groups * geo.head_dim, hidden)
    rows_per_group = (geo.heads_per_group + 2) * geo.head_dim
    shards = _shards(QKV, [q, k, v], geo, (geo.num_groups // tp * rows_per_group, hidden))
    full = torch.cat(shards, dim=0)
    # megatron's linear_qkv: for each group g, its query heads, then k_g, then v_g
    hd, hpg = geo.head_dim, geo.heads_per_group
    expected = torch.cat(
        [
            torch.cat(
                [q[g * hpg * hd : (g + 1) * hpg * hd], k[g * hd : (g + 1) * hd], v[g * hd : (g + 1) * hd]]
            )
            for g in range(geo.num_groups)
        ]
    )
    assert torch.equal(full, expected)
    assert all(torch.equal(a, b) for a, b in zip(QKV.to_hf(full, geo), [q, k, v]))
    assert QKV.hf_shapes(list(full.shape), geo) == [tuple(q.shape), tuple(k.shape), tuple(v.shape)]


def test_qkv_layout_handles_biases():
    geo = _geo(2)
    q, k, v = torch.randn(24), torch.randn(12), torch.randn(12)
    full = torch.cat(_shards(QKV, [q, k, v], geo, (24,)), dim=0)
    assert all(torch.equal(a, b) for a, b in zip(QKV.to_hf(full, geo), [q, k, v]))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_gate_up_layout_stacks_per_rank(tp):
    geo = _geo(tp)
    gate, up = torch.randn(8, 5), torch.randn(8, 5)
    shards = _shards(GATE_UP, [gate, up], geo, (16 // tp, 5))
    rows = 8 // tp
    for rank, shard in enumerate(shards):
        assert torch.equal(
            shard, torch.cat([gate[rank * rows : (rank + 1) * rows], up[rank * rows : (rank + 1) * rows]])
        )
    back = GATE_UP.to_hf(torch.cat(shards, dim=0), geo)
    assert torch.equal(back[0], gate) and torch.equal(back[1], up)


def test_row_and_replicated_layouts():
    geo = _geo(2)
    weight, norm = torch.randn(4, 6), torch.randn(6)
    shards = _shards(ROW, [weight], geo, (4, 3))
    assert torch.equal(shards[1], weight[:, 3:])
    assert torch.equal(ROW.to_hf(torch.cat(shards, dim=1), geo)[0], weight)
    assert all(torch.equal(s, norm) for s in _shards(REPLICATED, [norm], geo, (6,)))


@pytest.mark.parametrize("tp", [1, 2])
def test_vocab_layout_pads_with_zeros_and_unpads(tp):
    geo = _geo(tp, vocab=11)
    embedding = torch.randn(11, 4)
    padded = 16  # a multiple of TP that exceeds the vocabulary
    shards = _shards(VOCAB, [embedding], geo, (padded // tp, 4))
    full = torch.cat(shards, dim=0)
    assert torch.equal(full[:11], embedding) and not full[11:].any()
    assert torch.equal(VOCAB.to_hf(full, geo)[0], embedding)
    assert VOCAB.hf_shapes([padded, 4], geo) == [(11, 4)]


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize(
    ("layout", "full_shape"),
    [
        (QKV, (32, 5)),  # 4 groups x (2 q heads + k + v) x head_dim 2
        (QKV, (48,)),  # a bias, head_dim 3
        (GATE_UP, (16, 5)),
        (ROW, (4, 8)),
        (VOCAB, (16, 4)),  # 11 real rows: at TP4 the last shard is padding only
        (REPLICATED, (6,)),
    ],
)
def test_placing_every_shard_equals_to_hf_of_their_concatenation(layout, full_shape, tp):
    """The export path that never concatenates shards gives the same bytes as the one that does."""
    geo = _geo(tp, head_dim=2 if full_shape[0] == 32 else 3)
    full = torch.randn(full_shape, dtype=torch.float64)
    outputs = [
        torch.full(shape, float("nan"), dtype=torch.float64) for shape in layout.hf_shapes(full_shape, geo)
    ]
    shards = [full] if layout.tp_dim is None else full.chunk(tp, dim=layout.tp_dim)
    for tp_rank, shard in enumerate(shards):
        layout.shard_to_hf(shard, geo, tp_rank, outputs)
    expected = layout.to_hf(full, geo)
    assert len(outputs) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected))  # NaN anywhere fails too


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_family_table_covers_the_checkpoint_exactly(tiny_models, family):
    spec = load_hf_config(tiny_models[family])
    names = hf_tensor_names(spec)
    with safe_open(str(tiny_models[family] / "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    assert len(names) == len(set(names)) and set(names) == stored
    assert FAMILIES[family].family == family
    if spec.tie_word_embeddings:
        assert hf_tensor_names(spec, include_tied_lm_head=True)[-1] == "lm_head.weight"


def _entries(tensors: dict[str, torch.Tensor]):
    return [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]


def test_streaming_writer_single_file(tmp_path):
    tensors = {"b": torch.randn(3, 5), "a": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4)}
    writer = StreamingSafetensorsWriter(tmp_path, _entries(tensors))
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items()) and loaded.keys() == tensors.keys()
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_streaming_writer_shards_with_index(tmp_path):
    tensors = {f"t{i}": torch.randn(10, 10) for i in range(5)}  # 400 bytes each
    writer = StreamingSafetensorsWriter(tmp_path, _entries(tensors), max_shard_bytes=900)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2000
    assert sorted(set(index["weight_map"].values())) == [
        f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)
    ]
    with HFCheckpointReader(tmp_path) as reader:
        assert reader.names() == sorted(tensors)
        assert torch.equal(reader.get_slice("t3")[2:4], tensors["t3"][2:4])


def test_streaming_writer_checks_order_and_completeness(tmp_path):
    tensors = {"x": torch.randn(2), "y": torch.randn(3)}
    writer = StreamingSafetensorsWriter(tmp_path, _entries(tensors))
    with pytest.raises(ValueError, match="expected x"):
        writer.write("y", tensors["y"])
    writer.write("x", tensors["x"])
    with pytest.raises(ValueError, match="1 tensors missing"):
        writer.close()


def test_reader_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        HFCheckpointReader(tmp_path)
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with HFCheckpointReader(tmp_path) as reader, pytest.raises(KeyError, match="'missing'"):
        reader.get_slice("missing")


def test_side_files_skip_weights_and_checkpoint_metadata(tmp_path):
    for name in (
        "config.json",
        "tokenizer.json",
        "merges.txt",
        "chat_template.jinja",
        "metadata.json",
        "megaopsd.json",
        "manifest.json",
        "trainer_state.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "common.pt",
    ):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in side_files(tmp_path)] == [
        "chat_template.jinja",
        "config.json",
        "merges.txt",
        "tokenizer.json",
    ]
