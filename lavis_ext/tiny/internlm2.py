"""Tiny InternLM2 checkpoints in the hub's layout, made on the fly (nothing binary is committed).

:func:`make_tiny_internlm2` writes a directory laid out like the released
``internlm/internlm2-1_8b`` and ``internlm/internlm2-chat-1_8b`` repositories, file for file:

- ``config.json``: the remote-code config (``architectures: ["InternLM2ForCausalLM"]``,
  ``auto_map``, ``model_type: internlm2``, ``bias``, ``rope_scaling {"type": "dynamic",
  "factor": 2.0}``, ``torch_dtype: bfloat16``), with small sizes;
- ``model-0000N-of-00002.safetensors`` + ``model.safetensors.index.json``: packed
  ``attention.wqkv``, ``tok_embeddings``, ``output`` (bf16 like the release);
- ``tokenizer.model``: SentencePiece BPE with byte fallback, ``<unk>``/``<s>``/``</s>`` at 0/1/2,
  whose **last six pieces are ``[UNUSED_TOKEN_141]`` ... ``[UNUSED_TOKEN_146]``**;
- ``tokenizer_config.json``: ``auto_map``, ``tokenizer_class: InternLM2Tokenizer``, the named
  special tokens, ``added_tokens_decoder`` (0-2 and the six chat/tool tokens on the last six ids,
  each ``special: true``), ``additional_special_tokens`` and, for chat models, ``chat_template``;
- ``special_tokens_map.json``; ``generation_config.json`` (eos ``[2, <|im_end|> id]`` for chat).

Sources: ``../shared/notes/internlm2-facts.md`` (tokenizer section; InternLM/InternLM #662 for
the ``[UNUSED_TOKEN_145]`` symptom), InternLM/InternLM ``chat/chat_format.md`` (ids 92538-92543),
and public copies of the hub's ``tokenizer_config.json`` and ``tokenization_internlm2.py``. Not
known from public sources and chosen here: the SentencePiece type of the ``[UNUSED_TOKEN_*]``
pieces (written as user-defined pieces) and the hub's earlier ``[UNUSED_TOKEN_0..140]`` pieces
(left out: nothing reads them).
"""
from __future__ import annotations

import io
import json
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import sentencepiece as spm
import torch
from safetensors.torch import save_file

from lavis_ext.models.internlm2.tokenizer import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS_MAP_FILE,
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
# The chat and tool tokens on the last six ids (92538..92543 in the released 92544-piece model),
# in id order; the SentencePiece pieces on those ids are the placeholders beside them.
HUB_ADDED_TOKENS = (
    ("<|plugin|>", "[UNUSED_TOKEN_141]"),
    ("<|interpreter|>", "[UNUSED_TOKEN_142]"),
    ("<|action_end|>", "[UNUSED_TOKEN_143]"),
    ("<|action_start|>", "[UNUSED_TOKEN_144]"),
    ("<|im_end|>", "[UNUSED_TOKEN_145]"),
    ("<|im_start|>", "[UNUSED_TOKEN_146]"),
)
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
USER_DEFINED_PIECE = 4  # sentencepiece_model.proto: SentencePiece.Type.USER_DEFINED


def _serialized_piece(piece: str, score: float, piece_type: int) -> bytes:
    """One ``ModelProto.pieces`` entry in protobuf's wire format (field 1, length-delimited):
    ``SentencePiece {piece = 1 (string), score = 2 (float), type = 3 (enum)}``. Lengths are
    written as one varint byte, so the piece must be shorter than 100 bytes."""
    if len(piece.encode("utf-8")) >= 100:
        raise ValueError(f"piece {piece!r} is too long for a one-byte length")
    text = piece.encode("utf-8")
    body = b"\x0a" + bytes([len(text)]) + text + b"\x15" + struct.pack("<f", score) + b"\x18" + bytes([piece_type])
    return b"\x0a" + bytes([len(body)]) + body


def train_tiny_sentencepiece(
    dst_dir: str | Path, texts: Iterable[str] = DEFAULT_TEXTS, vocab_size: int = 384
) -> Path:
    """Train a small SentencePiece BPE model like InternLM2's and write ``dst_dir/tokenizer.model``.

    ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, the byte pieces, the learned pieces, then the six
    ``[UNUSED_TOKEN_*]`` placeholders of :data:`HUB_ADDED_TOKENS` as the last six ids (appended
    to the trained model: protobuf appends a repeated field's entries in the order they come).
    Byte fallback covers any text; identity normalization and kept whitespace make SentencePiece
    round-trip it exactly (NFKC would turn ``！`` into ``!``). ``vocab_size`` is an upper bound:
    a short text list yields fewer pieces.
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
        hard_vocab_limit=False,  # a short text list may not support vocab_size pieces
        num_threads=1,
        minloglevel=2,
    )
    placeholders = b"".join(_serialized_piece(piece, 0.0, USER_DEFINED_PIECE) for _, piece in HUB_ADDED_TOKENS)
    path = dst / TOKENIZER_FILE
    path.write_bytes(model.getvalue() + placeholders)
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
    """``model.safetensors``, or two shards plus ``model.safetensors.index.json`` (the hub's
    layout). Weight files of an earlier write are removed first, so one layout is left."""
    for stale in [*dst.glob("model*.safetensors"), dst / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
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


def _added_token(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def write_hub_tokenizer_files(dst: Path, vocab_size: int, chat: bool) -> None:
    """``tokenizer_config.json`` and ``special_tokens_map.json`` as the hub writes them, for a
    ``tokenizer.model`` of ``vocab_size`` pieces whose last six are the placeholders."""
    first_added = vocab_size - len(HUB_ADDED_TOKENS)
    decoder = {str(i): _added_token(text) for i, text in enumerate(("<unk>", "<s>", "</s>"))}
    # The hub file lists the chat tokens from the last id down.
    for offset, (text, _) in reversed(list(enumerate(HUB_ADDED_TOKENS))):
        decoder[str(first_added + offset)] = _added_token(text)
    additional = [text for text, _ in reversed(HUB_ADDED_TOKENS)]
    config = {
        "auto_map": TOKENIZER_AUTO_MAP,
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "</s>",
        "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>",
        "added_tokens_decoder": decoder,
        "additional_special_tokens": additional,
    }
    if chat:
        config["chat_template"] = CHAT_TEMPLATE
    _write_json(dst / TOKENIZER_CONFIG_FILE, config)
    named = {key: {k: v for k, v in _added_token(text).items() if k != "special"}
             for key, text in (("bos_token", "<s>"), ("eos_token", "</s>"), ("pad_token", "</s>"),
                               ("unk_token", "<unk>"))}
    _write_json(dst / SPECIAL_TOKENS_MAP_FILE, {"additional_special_tokens": additional, **named})


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
    vocab_size: int = 384,
    seed: int = 0,
    sharded: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    chat: bool = False,
) -> Path:
    """Write a random InternLM2 checkpoint in the hub's layout (see the module docstring) to
    ``dst_dir`` and return its path.

    ``chat`` writes the chat model's files (``chat_template``, generation eos ``[2, <|im_end|>]``),
    otherwise the base model's (eos 2). ``sharded=False`` writes one ``model.safetensors``
    instead of the release's two shards, for tests that edit the weights file; ``dtype`` is the
    stored weight dtype (``config.json``'s ``torch_dtype`` follows it). The tokenizer is trained
    on ``texts`` (default :data:`DEFAULT_TEXTS`) with at most ``vocab_size`` pieces before the six
    placeholders, and the config's vocab size is the model's piece count. Weights
    are deterministic in ``seed``.
    """
    dst = Path(dst_dir)
    tokenizer_file = train_tiny_sentencepiece(dst, DEFAULT_TEXTS if texts is None else texts, vocab_size)
    vocab_size = spm.SentencePieceProcessor(model_file=str(tokenizer_file)).get_piece_size()

    config = {
        "architectures": ["InternLM2ForCausalLM"],
        "attn_implementation": "eager",
        "auto_map": MODEL_AUTO_MAP,
        "bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "model_type": "internlm2",
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads,
        "pad_token_id": 2,
        "pretraining_tp": 1,
        "rms_norm_eps": rms_norm_eps,
        "rope_scaling": None if rope_scaling is None else dict(rope_scaling),
        "rope_theta": rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": "4.41.0",
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    _write_json(dst / "config.json", config)
    weights = {name: w.to(dtype) for name, w in random_internlm2_weights(config, seed).items()}
    write_internlm2_safetensors(dst, weights, sharded)
    write_hub_tokenizer_files(dst, vocab_size, chat)
    im_end = vocab_size - len(HUB_ADDED_TOKENS) + [text for text, _ in HUB_ADDED_TOKENS].index("<|im_end|>")
    generation = {"bos_token_id": 1, "eos_token_id": [2, im_end] if chat else 2, "pad_token_id": 2,
                  "transformers_version": "4.41.0"}
    _write_json(dst / "generation_config.json", generation)
    return dst
