"""BLIP-2's shared parts from local files: the BERT Q-Former, its tokenizer and the ViT.

Stock LAVIS downloads ``bert-base-uncased`` and the EVA/CLIP ViT weights from hard-coded
hub names and URLs. lavis-ext builds the same modules from local paths, or from tiny
configs, and never touches the network.

The one place these paths are set:

=================  ==========================  =========================================
model config key   environment variable        what it points at
=================  ==========================  =========================================
``bert_path``      ``LAVIS_EXT_BERT``          a directory with ``vocab.txt`` and
                                               ``config.json`` (BERT's), and optionally
                                               ``model.safetensors``/``pytorch_model.bin``:
                                               a local copy of ``bert-base-uncased``, or a
                                               tiny one (no weights: random init)
``vit_path``       ``LAVIS_EXT_VIT``           ``eva_vit_g.pth``/``clip_vit_L.pth`` (stock
                                               architecture), or a directory holding
                                               ``config.json`` (architecture overrides) and
                                               optionally ``model.pth``; empty: random init
=================  ==========================  =========================================

The model config key wins (``--options model.bert_path=DIR``); the environment variable is
the default. Every model takes them from its own config: lavis-ext's models read the keys
directly; stock LAVIS models (``blip2``, ``blip2_opt`` ...) build their parts in methods that
take no config, so ``patches/offline_blip2.py`` runs their ``from_config`` inside
:func:`building_from`, which holds the config's paths for that one build.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from lavis_ext.errors import CheckpointError, ConfigError
from lavis_ext.local_paths import ENV_VARS, describe_key, require_dir, require_file

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _from_env(key: str) -> str:
    return field(default_factory=lambda: os.environ.get(ENV_VARS[key], ""))


@dataclass(frozen=True)
class LocalWeights:
    """Where BLIP-2's shared parts come from. Empty ``vit_path`` means random init."""

    bert_path: str = _from_env("model.bert_path")
    vit_path: str = _from_env("model.vit_path")

    @classmethod
    def from_config(cls, model_cfg) -> LocalWeights:
        """``bert_path``/``vit_path`` of ``model_cfg`` where set, else their environment variables."""
        values = {f.name: str(model_cfg.get(f.name)) for f in fields(cls) if model_cfg.get(f.name) is not None}
        return cls(**values)

    def describe(self, key: str) -> str:
        return describe_key(f"model.{key}")


_building: ContextVar[LocalWeights | None] = ContextVar("lavis_ext_building", default=None)


@contextmanager
def building_from(model_cfg) -> Iterator[LocalWeights]:
    """The paths of ``model_cfg`` for the stock BLIP-2 model that builds from it inside this block."""
    token = _building.set(LocalWeights.from_config(model_cfg))
    try:
        yield _building.get()
    finally:
        _building.reset(token)


def weights_in_build() -> LocalWeights:
    """The paths of the model being built; a stock model constructed without ``from_config``
    (``Blip2Qformer(...)``) has no config, and gets the environment variables'."""
    return _building.get() or LocalWeights()


# --------------------------------------------------------------------------- BERT / Q-Former


def build_bert_tokenizer(bert_path: str, key: str = "model.bert_path"):
    """BERT tokenizer from a local directory, with BLIP-2's ``[DEC]`` bos token added."""
    from transformers import BertTokenizer

    path = require_dir(bert_path, key, must_contain=("vocab.txt",))
    tokenizer = BertTokenizer.from_pretrained(str(path), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def build_qformer(bert_path: str, num_query_token: int, vision_width: int, cross_attention_freq: int = 2,
                  key: str = "model.bert_path"):
    """LAVIS's Q-Former (``BertLMHeadModel``) and query tokens from a local BERT directory.

    Weights are loaded when the directory holds them; otherwise the Q-Former is randomly
    initialised (tiny configs, or training from scratch).
    """
    from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel

    path = require_dir(bert_path, key, must_contain=("config.json",))
    config = BertConfig.from_pretrained(str(path), local_files_only=True)
    config.encoder_width = vision_width
    config.add_cross_attention = True
    config.cross_attention_freq = cross_attention_freq  # a cross-attention layer every N blocks
    config.query_length = num_query_token
    if any((path / name).is_file() for name in WEIGHT_FILES):
        qformer = BertLMHeadModel.from_pretrained(str(path), config=config, local_files_only=True)
    else:
        logger.info("%s = %s holds no weights: Q-Former randomly initialised", key, path)
        qformer = BertLMHeadModel(config)
    query_tokens = nn.Parameter(torch.zeros(1, num_query_token, config.hidden_size))
    query_tokens.data.normal_(mean=0.0, std=config.initializer_range)
    return qformer, query_tokens


def query_pass(bert: nn.Module, query_tokens: torch.Tensor, image_embeds: torch.Tensor, use_cache: bool = False):
    """The learned queries cross-attending to image features ``[B, N, D]``, no text (BLIP-2's
    query pass, stage 1 and stage 2 alike); ``last_hidden_state`` is ``[B, num_query_token, hidden]``."""
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    return bert(query_embeds=query_tokens.expand(image_embeds.shape[0], -1, -1), encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_atts, use_cache=use_cache, return_dict=True)


# --------------------------------------------------------------------------- vision encoders


def _eva_vit_g(img_size: int, drop_path_rate: float, use_checkpoint: bool, **overrides) -> nn.Module:
    from lavis.models.eva_vit import VisionTransformer

    arch = dict(patch_size=14, embed_dim=1408, depth=39, num_heads=1408 // 88, mlp_ratio=4.3637)
    arch.update(overrides)
    return VisionTransformer(
        img_size=img_size, use_mean_pooling=False, qkv_bias=True, drop_path_rate=drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), use_checkpoint=use_checkpoint, **arch,
    )


def _clip_vit_l(img_size: int, drop_path_rate: float, use_checkpoint: bool, **overrides) -> nn.Module:
    from lavis.models.clip_vit import VisionTransformer

    arch = dict(patch_size=14, width=1024, layers=22, heads=16)
    arch.update(overrides)
    return VisionTransformer(input_resolution=img_size, use_grad_checkpointing=use_checkpoint, **arch)


VISION_ARCHS = {"eva_clip_g": _eva_vit_g, "clip_L": _clip_vit_l}


def _interpolate_pos_embed(vit_model: str, model: nn.Module, state_dict: dict) -> None:
    from lavis.models import clip_vit, eva_vit

    module = eva_vit if vit_model == "eva_clip_g" else clip_vit
    module.interpolate_pos_embed(model, state_dict)


def build_vision_encoder(vit_model: str, vit_path: str, img_size: int, drop_path_rate: float = 0.0,
                         use_checkpoint: bool = False, key: str = "model.vit_path",
                         precision: str = "fp32") -> nn.Module:
    """EVA-ViT-g or CLIP-L, from a local weight file, a config directory, or random init.

    ``precision="fp16"`` converts the linear/conv weights as LAVIS does (``eva_vit.py:439``);
    ``patches/cpu_fp16.py`` keeps them fp32 where there is no CUDA.
    """
    from lavis.models import eva_vit

    if vit_model not in VISION_ARCHS:
        raise ConfigError(f"model.vit_model = {vit_model!r}: expected one of {sorted(VISION_ARCHS)}")
    overrides, weights = {}, None
    if vit_path:
        p = Path(vit_path).expanduser()
        if p.is_dir():
            overrides = json.loads(require_file(str(p / "config.json"), key).read_text())
            weights = p / "model.pth" if (p / "model.pth").is_file() else None
        else:
            weights = require_file(vit_path, key)
    model = VISION_ARCHS[vit_model](img_size, drop_path_rate, use_checkpoint, **overrides)
    if weights is None:
        logger.info("%s: no weights given, %s randomly initialised", key, vit_model)
    else:
        _load_vision_weights(vit_model, model, weights, key)
    if precision == "fp16":
        eva_vit.convert_weights_to_fp16(model)
    return model


def _load_vision_weights(vit_model: str, model: nn.Module, weights: Path, key: str) -> None:
    from lavis_ext.checkpoint import load_checkpoint_file, load_state_dict_named  # it imports this module

    state_dict = load_checkpoint_file(weights, key)
    _interpolate_pos_embed(vit_model, model, state_dict)
    missing, unexpected = load_state_dict_named(model, state_dict, f"{key} = {weights}")
    if missing:
        raise CheckpointError(f"{key} = {weights}: not a {vit_model} checkpoint; missing keys {missing[:5]} ...")
    if unexpected:
        logger.warning("%s = %s: ignored keys %s", key, weights, unexpected)
