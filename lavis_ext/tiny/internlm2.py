"""Tiny InternLM2 checkpoints, made on the fly for tests (nothing binary is committed).

:func:`make_tiny_internlm2` writes a directory in the hub's InternLM2 layout (remote-code
``config.json``, packed ``attention.wqkv``, ``tokenizer.model``), with random weights and a
SentencePiece model trained in milliseconds by :func:`train_tiny_sentencepiece`.
"""
from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import sentencepiece as spm
import torch
from safetensors.torch import save_file

from lavis_ext.models.internlm2.tokenizer import (
    CHAT_TEMPLATE,
    IM_END,
    SPECIAL_TOKENS,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
)

# English and Chinese, so both scripts get real pieces (anything else uses byte fallback).
DEFAULT_TEXTS = [
    "Hello world, a red circle on a blue square.",
    "The quick brown fox jumps over the lazy dog.",
    "Describe the image in detail. A photo of a cat sitting on a sofa.",
    "Question: what color is the car? Answer: the car is red.",
    "Two people are walking along the beach at sunset.",
    "你好，世界！这是一张图片。",
    "一只红色的圆形在蓝色的方块上。",
    "图片里有一只猫和一只狗在草地上玩耍。",
    "请详细描述这张图片。问题：汽车是什么颜色？答案：红色。",
    "两个人在日落时沿着海滩散步。",
]
DYNAMIC_NTK = MappingProxyType({"type": "dynamic", "factor": 2.0})
# InternLM2 configs come with remote code; the converter must ignore these entries.
MODEL_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}
TOKENIZER_AUTO_MAP = {
    "AutoTokenizer": [
        "tokenization_internlm2.InternLM2Tokenizer",
        "tokenization_internlm2_fast.InternLM2TokenizerFast",
    ]
}


def train_tiny_sentencepiece(
    dst_dir: str | Path, texts: Iterable[str] = DEFAULT_TEXTS, vocab_size: int = 384
) -> Path:
    """Train a small SentencePiece BPE model like InternLM2's and write ``dst_dir/tokenizer.model``.

    ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, then :data:`SPECIAL_TOKENS` as user-defined
    pieces. Byte fallback covers any text; identity normalization and kept whitespace make
    SentencePiece round-trip it exactly (NFKC would turn ``！`` into ``!``). ``vocab_size`` is
    an upper bound: a short text list yields fewer pieces.
    """
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=list(SPECIAL_TOKENS),
        hard_vocab_limit=False,  # a short text list may not support vocab_size pieces
        num_threads=1,
        minloglevel=2,
    )
    path = dst / TOKENIZER_FILE
    path.write_bytes(model.getvalue())
    return path


def random_internlm2_weights(config: Mapping[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """InternLM2-named weights: matrices ~ N(0, 0.02²), norm weights ~ 1 + N(0, 0.1²).

    Non-unit norm weights make a swapped or dropped norm visible in the logits.
    """
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads
    generator = torch.Generator().manual_seed(seed)

    def matrix(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * config["initializer_range"]

    def norm() -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(hidden, generator=generator)

    weights = {"model.tok_embeddings.weight": matrix(vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        weights |= {
            prefix + "attention.wqkv.weight": matrix((heads + 2 * kv_heads) * head_dim, hidden),
            prefix + "attention.wo.weight": matrix(hidden, heads * head_dim),
            prefix + "feed_forward.w1.weight": matrix(inter, hidden),
            prefix + "feed_forward.w3.weight": matrix(inter, hidden),
            prefix + "feed_forward.w2.weight": matrix(hidden, inter),
            prefix + "attention_norm.weight": norm(),
            prefix + "ffn_norm.weight": norm(),
        }
    weights |= {"model.norm.weight": norm(), "output.weight": matrix(vocab, hidden)}
    return weights


def write_internlm2_safetensors(dst: Path, weights: dict[str, torch.Tensor], sharded: bool) -> None:
    """``model.safetensors``, or two shards plus ``model.safetensors.index.json``."""
    if not sharded:
        save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
        return
    names = list(weights)
    halves = (names[: len(names) // 2], names[len(names) // 2 :])
    weight_map: dict[str, str] = {}
    for number, shard_names in enumerate(halves, start=1):
        shard = f"model-{number:05d}-of-{len(halves):05d}.safetensors"
        save_file({name: weights[name] for name in shard_names}, dst / shard, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard_names, shard)
    total_size = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    _write_json(dst / "model.safetensors.index.json", index)


def _write_json(file: Path, content: Mapping[str, Any]) -> None:
    file.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_tiny_internlm2(
    dst_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 64,
    rope_theta: float = 1e6,
    rope_scaling: Mapping[str, Any] | None = DYNAMIC_NTK,
    rms_norm_eps: float = 1e-5,
    texts: Iterable[str] | None = None,
    seed: int = 0,
    sharded: bool = False,
    chat: bool = False,
) -> Path:
    """Write a random InternLM2 checkpoint in hub layout to ``dst_dir`` and return its path.

    Files: ``config.json`` (every field InternLM2 reads, plus the remote-code ``auto_map``),
    ``model.safetensors`` (or two shards and an index when ``sharded``), ``tokenizer.model``
    (trained on ``texts``, default :data:`DEFAULT_TEXTS`), ``tokenizer_config.json`` and
    ``generation_config.json`` (eos ``[2, <|im_end|>]`` when ``chat``, else 2). The vocab
    size is the SentencePiece model's piece count. Weights are deterministic in ``seed``.
    """
    dst = Path(dst_dir)
    tokenizer_file = train_tiny_sentencepiece(dst, DEFAULT_TEXTS if texts is None else texts)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_file))

    config = {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": MODEL_AUTO_MAP,
        "model_type": "internlm2",
        "attn_implementation": "eager",
        "bias": False,
        "vocab_size": sp.get_piece_size(),
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": rms_norm_eps,
        "use_cache": True,
        "pad_token_id": 2,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "rope_theta": rope_theta,
        "rope_scaling": None if rope_scaling is None else dict(rope_scaling),
        "torch_dtype": "float32",
        "transformers_version": "4.41.0",
    }
    _write_json(dst / "config.json", config)
    write_internlm2_safetensors(dst, random_internlm2_weights(config, seed), sharded)

    _write_json(
        dst / TOKENIZER_CONFIG_FILE,
        {
            "tokenizer_class": "InternLM2Tokenizer",
            "auto_map": TOKENIZER_AUTO_MAP,
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "pad_token": "</s>",
            "unk_token": "<unk>",
            "additional_special_tokens": list(SPECIAL_TOKENS),
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    eos_token_id: int | list[int] = [2, sp.piece_to_id(IM_END)] if chat else 2
    generation = {"bos_token_id": 1, "eos_token_id": eos_token_id, "pad_token_id": 2}
    _write_json(dst / "generation_config.json", generation)
    return dst
