"""Make small, deterministic, randomly initialised Hugging Face models for tests and the demo.

Each model directory holds ``config.json``, ``model.safetensors``, ``generation_config.json``
and a byte-level BPE tokenizer trained here with ``tokenizers`` on a built-in corpus (math word
problems, LaTeX, chat markup), with ChatML special tokens and a chat template that supports
``<think>`` blocks and the ``enable_thinking`` switch. Nothing is downloaded.

Families: ``qwen3`` (q/k RMSNorm, GQA, tied embeddings), ``qwen2`` (qkv bias, untied),
``llama`` (Llama 3.1 rope scaling, untied), ``qwen3_moe`` (Qwen3's attention, every MLP 8 experts
of width 64 with top-2 routing renormalised as Qwen3-30B-A3B does, untied). The tiny vocabulary (544 + special tokens) is not a
multiple of 128, so Megatron pads it at every TP size.

    python tools/make_tiny_model.py --family qwen3 --out /tmp/tiny-qwen3
    python tools/make_tiny_model.py --family qwen3 --layers 3 --out /tmp/tiny-qwen3-3l   # uneven PP2
    python tools/make_tiny_model.py --family qwen3 --preset small --out /tmp/small-qwen3   # ~100M params
    python tools/make_tiny_model.py --family qwen3 --tokenizer char --out /tmp/char-qwen3   # one id per character
    python tools/make_tiny_model.py --family qwen3_moe --out /tmp/tiny-qwen3-moe

``--tokenizer char`` gives every printable ASCII character (and newline, tab, the em dash of the
official OPSD prompt) its own id: arithmetic is then spelled digit by digit, which a 0.6M-parameter
model learns in minutes on a CPU (the learning experiment, tools/learning_experiment.py).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

FAMILIES = ("qwen3", "qwen2", "llama", "qwen3_moe")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
BPE_VOCAB_SIZE = 544  # + 5 special tokens = 549 ids, padded by Megatron to 640 (TP1) / 768 (TP2)

# ChatML with Qwen3-style thinking: with enable_thinking=false the assistant turn starts with
# an empty think block, so the model answers directly.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

PRESETS = {
    # hidden 128, 4 heads x head_dim 32 (vLLM's CPU attention rejects head_dim 16), 2 KV groups
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    ),
    # ~100M parameters (a few hundred MB in float32) for weight-sync and conversion benchmarks
    "small": dict(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
        vocab_override=32000,
    ),
}


# The public config.json sizes of real Qwen3 models (no weights): the dry-run tests, the recipe
# tests and bench/mfu.py plan with them.
QWEN3_SHAPES = {
    "qwen3_1p7b": dict(
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    ),
    "qwen3_4b": dict(
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    ),
    "qwen3_8b": dict(
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
}


# The public config.json of Qwen3-30B-A3B (no weights): 128 experts of width 768, 8 per token.
QWEN3_MOE_SHAPES = {
    "qwen3_30b_a3b": dict(
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        router_aux_loss_coef=0.001,
        tie_word_embeddings=False,
    ),
}


def qwen3_config(name: str) -> dict:
    """The whole config.json of the Qwen3 model ``name`` (a key of ``QWEN3_SHAPES`` or
    ``QWEN3_MOE_SHAPES``)."""
    moe = name in QWEN3_MOE_SHAPES
    return dict(
        architectures=["Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM"],
        model_type="qwen3_moe" if moe else "qwen3",
        vocab_size=151936,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        attention_dropout=0.0,
        **(QWEN3_MOE_SHAPES if moe else QWEN3_SHAPES)[name],
    )


def write_qwen3_config(name: str, out: Path) -> Path:
    """``out/config.json`` of the Qwen3 model ``name``, no weights: enough for a dry run."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(qwen3_config(name)))
    return out


def _corpus(seed: int = 0, lines: int = 3000) -> list[str]:
    """Deterministic training text for the tokenizer: arithmetic problems with worked answers."""
    rng = random.Random(seed)
    names = ["Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gia", "Hal"]
    things = ["apples", "books", "coins", "marbles", "pencils", "stamps", "cards", "shells"]
    out = [
        "Problem: Please reason step by step, and put your final answer within \\boxed{}.",
        "Here is a reference solution to this problem:",
        "After understanding the reference solution, please try to solve this problem using your own approach.",
        "\\frac{1}{2} \\sqrt{x} x^2 + y^2 = z^2 \\cdot \\times \\div \\le \\ge \\pi \\infty",
    ]
    for _ in range(lines):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        name, thing = rng.choice(names), rng.choice(things)
        out.append(
            f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now? "
            f"We add {a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."
        )
        out.append(f"What is {a} times {b}? {a} \\times {b} = {a * b}, so the answer is \\boxed{{{a * b}}}.")
    return out


def build_tokenizer(out_dir: Path, vocab_size: int = BPE_VOCAB_SIZE) -> dict[str, int]:
    """Train a byte-level BPE tokenizer and write it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    ids = {tok: tokenizer.token_to_id(tok) for tok in SPECIAL_TOKENS}
    _write_tokenizer_config(out_dir, ids)
    return ids


# Characters the char tokenizer knows: printable ASCII, newline, tab, the official prompt's em dash.
CHAR_ALPHABET = "".join(chr(c) for c in range(32, 127)) + "\n\t\u2014"
CHAR_UNK = "<|unk|>"


def build_char_tokenizer(out_dir: Path) -> tuple[dict[str, int], int]:
    """One id per character (``CHAR_ALPHABET``), the ChatML specials after them; (ids, vocab size)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: i for i, char in enumerate(CHAR_ALPHABET)}
    vocab[CHAR_UNK] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=CHAR_UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    ids = {tok: tokenizer.token_to_id(tok) for tok in SPECIAL_TOKENS}
    _write_tokenizer_config(out_dir, ids)
    return ids, tokenizer.get_vocab_size()


def _write_tokenizer_config(out_dir: Path, ids: dict[str, int]) -> None:
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
            for t, i in ids.items()
        },
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, indent=2)
    )


def model_config(
    family: str, preset: str, vocab_size: int, special: dict[str, int], *, num_layers: int | None = None
) -> dict:
    """The ``config.json`` content for a family and size preset (``num_layers`` overrides the preset's)."""
    shape = dict(PRESETS[preset])
    shape.pop("vocab_override", None)
    if num_layers is not None:
        shape["num_hidden_layers"] = num_layers
    common = dict(
        vocab_size=vocab_size,
        max_position_embeddings=16384,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        initializer_range=0.05,
        attention_dropout=0.0,
        use_cache=True,
        bos_token_id=special["<|endoftext|>"],
        eos_token_id=special["<|im_end|>"],
        pad_token_id=special["<|endoftext|>"],
        torch_dtype="float32",
        **shape,
    )
    if family == "qwen3":
        return dict(
            architectures=["Qwen3ForCausalLM"],
            model_type="qwen3",
            tie_word_embeddings=True,
            attention_bias=False,
            rope_theta=1000000.0,
            **common,
        )
    if family == "qwen3_moe":
        return dict(
            architectures=["Qwen3MoeForCausalLM"],
            model_type="qwen3_moe",
            tie_word_embeddings=False,
            attention_bias=False,
            rope_theta=1000000.0,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            router_aux_loss_coef=0.001,
            **common,
        )
    if family == "qwen2":
        common.pop("head_dim")  # Qwen2 derives head_dim = hidden / heads
        return dict(
            architectures=["Qwen2ForCausalLM"],
            model_type="qwen2",
            tie_word_embeddings=False,
            rope_theta=1000000.0,
            use_sliding_window=False,
            **common,
        )
    if family == "llama":
        rope_scaling = dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        )
        return dict(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            rope_theta=500000.0,
            rope_scaling=rope_scaling,
            **common,
        )
    raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")


def make_tiny_model(
    family: str,
    out: str | Path,
    *,
    preset: str = "tiny",
    seed: int = 0,
    tokenizer: str = "bpe",
    num_layers: int | None = None,
) -> Path:
    """Write a deterministic random model directory and return its path.

    ``tokenizer``: ``bpe`` (byte-level BPE, 549 ids) or ``char`` (one id per character).
    ``num_layers`` replaces the preset's layer count (e.g. 3 for uneven pipeline stages at PP2).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer == "char":
        special, vocab_size = build_char_tokenizer(out_dir)
    else:
        special = build_tokenizer(out_dir)
        vocab_size = PRESETS[preset].get("vocab_override") or (BPE_VOCAB_SIZE + len(SPECIAL_TOKENS))
    config_dict = model_config(family, preset, vocab_size, special, num_layers=num_layers)
    (out_dir / "config.json").write_text(json.dumps(config_dict, indent=2))
    config = AutoConfig.from_pretrained(out_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Random RMSNorm gains (and biases): an all-ones norm would hide layout bugs in conversion.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith("mlp.gate.weight"):  # the MoE router (zeros in transformers: all ties)
                param.copy_(0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.05 * torch.randn_like(param))
    model.save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(
        bos_token_id=special["<|endoftext|>"],
        eos_token_id=special["<|im_end|>"],
        pad_token_id=special["<|endoftext|>"],
    ).save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", choices=("bpe", "char"), default="bpe")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the preset's)")
    args = parser.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers {args.layers} must be >= 1")
    path = make_tiny_model(
        args.family,
        args.out,
        preset=args.preset,
        seed=args.seed,
        tokenizer=args.tokenizer,
        num_layers=args.layers,
    )
    print(f"wrote {args.family} ({args.preset}) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
