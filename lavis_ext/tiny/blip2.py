"""Tiny, randomly initialised BLIP-2 parts built on the fly: a BERT Q-Former directory
(WordPiece vocab trained on the given texts) and an EVA-ViT config directory.

They feed :mod:`lavis_ext.blip2_parts` through ``bert_path``/``vit_path`` exactly like real
local copies of ``bert-base-uncased`` and ``eva_vit_g.pth`` do. Nothing binary is committed.
The weight files in the real layouts (a ``bert-base-uncased`` directory with weights, a
single-file EVA state dict, a LAVIS checkpoint with its buffers) are written by the
``write_*`` functions at the end.
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


# The head of bert-base-uncased's vocab.txt: [PAD] 0, [unused0..98] 1-99, [UNK] 100, [CLS] 101,
# [SEP] 102, [MASK] 103 (its [unused99..993] that follow are left out).
BERT_BASE_UNCASED_SPECIALS = ("[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# The shortcut the tests' and the demo's tiny BERT use: the five special tokens first.
TINY_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def make_tiny_bert(dst: str | Path, texts: Iterable[str] = DEFAULT_TEXTS,
                   hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2,
                   intermediate_size: int = 64, specials: Iterable[str] = TINY_SPECIALS) -> Path:
    """Write ``vocab.txt`` (a WordPiece vocabulary of ``texts``) and a tiny BERT ``config.json``:
    a shortcut, with no weights; :func:`write_bert_base_uncased_layout` is the real layout.

    The vocabulary is built, not trained, so it is the same in every run (the ``tokenizers``
    WordPiece trainer is not deterministic: 196 or 197 entries from the same texts): ``specials``,
    every character of the texts alone and as a ``##`` continuation, then every word.
    """
    from transformers.models.bert.tokenization_bert import BasicTokenizer

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    words = sorted({word for text in texts for word in BasicTokenizer(do_lower_case=True).tokenize(text)})
    characters = sorted({character for word in words for character in word})
    vocab = [*specials, *characters, *(f"##{c}" for c in characters),
             *(word for word in words if len(word) > 1)]
    (dst / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
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
    """Write an EVA-ViT architecture ``config.json`` (random init: no ``model.pth``): a shortcut that
    :mod:`lavis_ext.blip2_parts` reads; the real weights layout is :func:`write_eva_vit_state_dict`."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    config = {"patch_size": patch_size, "embed_dim": embed_dim, "depth": depth,
              "num_heads": num_heads, "mlp_ratio": mlp_ratio}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


# --------------------------------------------------------------------------- real weight-file layouts


def write_bert_base_uncased_layout(dst: str | Path, seed: int = 0, **sizes) -> Path:
    """A ``bert-base-uncased``-layout directory with weights, of a tiny size: ``vocab.txt``,
    ``config.json`` with ``architectures: ["BertForMaskedLM"]``, ``tokenizer_config.json`` and
    ``model.safetensors`` holding ``BertForMaskedLM``'s keys (``bert.*``, ``cls.predictions.*``).

    Layout of the hub repository ``google-bert/bert-base-uncased`` (what ``blip2.py:32,48,54``
    download), written by transformers' own ``BertForMaskedLM.save_pretrained``; its vocabulary
    starts as the real one does (:data:`BERT_BASE_UNCASED_SPECIALS`). ``sizes`` go to
    :func:`make_tiny_bert`.
    """
    import torch
    from transformers import BertConfig, BertForMaskedLM

    dst = make_tiny_bert(dst, specials=BERT_BASE_UNCASED_SPECIALS, **sizes)
    config = json.loads((dst / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    BertForMaskedLM(BertConfig(**config)).save_pretrained(str(dst))
    return dst


def write_eva_vit_state_dict(dst: str | Path, vit_dir: str | Path, pretrain_size: int, seed: int = 0) -> Path:
    """An ``eva_vit_g.pth``-style single file: the ViT's bare state dict (no ``{"model": ...}``
    wrapper), at a pretraining resolution ``pretrain_size`` whose position-embedding grid differs
    from the one the model is built at (so loading interpolates it), and with one block more than
    the architecture in ``<vit_dir>/config.json`` (EVA-CLIP-g has 40 blocks; LAVIS builds 39 and
    ignores the last, ``eva_vit.py:415-436``).

    Layout from ``lavis/models/eva_vit.py`` ``create_eva_vit_g``, which ``torch.load``s the file and
    passes it to ``interpolate_pos_embed`` and ``load_state_dict(strict=False)``. Returns ``dst``.
    """
    import torch

    from lavis_ext import blip2_parts

    arch = json.loads((Path(vit_dir) / "config.json").read_text())
    arch["depth"] += 1
    torch.manual_seed(seed)
    vit = blip2_parts.VISION_ARCHS["eva_clip_g"](pretrain_size, 0.0, False, **arch)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(vit.state_dict(), dst)
    return dst


def write_lavis_checkpoint(model, dst: str | Path, epoch: int = 0) -> Path:
    """A checkpoint as LAVIS's ``RunnerBase._save_checkpoint`` (``runner_base.py:565-590``) writes it:
    ``{"model", "optimizer", "config", "scaler", "epoch"}``, where ``model`` is the full state dict
    minus the parameters that do not require grad, so buffers (``Qformer.bert.embeddings.position_ids``)
    stay in. The optimizer is a fresh AdamW over the trainable parameters. Returns ``dst``."""
    import torch

    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    dst = Path(dst)
    torch.save({"model": {k: v for k, v in model.state_dict().items() if k not in frozen},
                "optimizer": optimizer.state_dict(), "config": {"model": {"arch": "blip2"}}, "scaler": None,
                "epoch": epoch}, dst)
    return dst
