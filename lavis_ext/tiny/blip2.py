"""Tiny, randomly initialised BLIP-2 parts built on the fly: a BERT Q-Former directory
(WordPiece vocab trained on the given texts) and an EVA-ViT config directory.

They feed :mod:`lavis_ext.offline` through ``bert_path``/``vit_path`` exactly like real
local copies of ``bert-base-uncased`` and ``eva_vit_g.pth`` do. Nothing binary is committed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

DEFAULT_TEXTS = (
    "a red circle and two blue squares on a white background",
    "a green triangle above a yellow cross",
    "three purple circles in the top left corner",
    "question: what colour is the square? short answer: blue",
    "how many triangles are there? one two three four",
    "a photo of a cat sitting on a wooden table next to a cup of coffee",
    "a man riding a bicycle down a city street",
)


def make_tiny_bert(dst: str | Path, texts: Iterable[str] = DEFAULT_TEXTS, vocab_size: int = 300,
                   hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
                   intermediate_size: int = 64) -> Path:
    """Write ``vocab.txt`` (WordPiece, trained on ``texts``) and a tiny BERT ``config.json``."""
    from tokenizers import BertWordPieceTokenizer

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=1,
                                  special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    wordpiece.save_model(str(dst))
    vocab = (dst / "vocab.txt").read_text().splitlines()
    config = {
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": len(vocab),
        "hidden_size": hidden_size, "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
        "intermediate_size": intermediate_size, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "max_position_embeddings": 64, "type_vocab_size": 2,
        "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    (dst / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 64}))
    return dst


def make_tiny_vit(dst: str | Path, patch_size: int = 8, embed_dim: int = 32, depth: int = 2,
                  num_heads: int = 2, mlp_ratio: float = 2.0) -> Path:
    """Write an EVA-ViT architecture ``config.json`` (random init: no ``model.pth``)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    config = {"patch_size": patch_size, "embed_dim": embed_dim, "depth": depth,
              "num_heads": num_heads, "mlp_ratio": mlp_ratio}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst
