"""BLIP-2's fp16 ViT cannot run on CPU.

Upstream: ``lavis/models/eva_vit.py:439`` and ``lavis/models/clip_vit.py:252`` convert the
ViT weights to fp16 when ``vit_precision: fp16`` (the default of every BLIP-2 model yaml),
but ``Blip2Base.maybe_autocast`` (``lavis/models/blip2_models/blip2.py:36-44``) is off on
CPU, so the first conv fails with ``RuntimeError: Input type (float) and bias type
(c10::Half) should be the same`` (``eva_vit.py:203``).

Fix: ``convert_weights_to_fp16`` keeps fp32 weights (and says so) when CUDA is not
available, so the same yaml runs on CPU and GPU.
"""
from __future__ import annotations

import logging

import torch


def apply() -> None:
    from lavis.models import clip_vit, eva_vit

    original = eva_vit.convert_weights_to_fp16
    if getattr(original, "_lavis_ext", False):
        return

    def convert_weights_to_fp16(model):
        if not torch.cuda.is_available():
            logging.getLogger(__name__).info("vit_precision fp16 requested without CUDA: ViT kept in fp32")
            return
        original(model)

    convert_weights_to_fp16._lavis_ext = True
    eva_vit.convert_weights_to_fp16 = convert_weights_to_fp16
    clip_vit.convert_weights_to_fp16 = convert_weights_to_fp16
