"""LAVIS's BERT LM heads lost ``generate`` on transformers >= 4.50.

Upstream: ``lavis/models/blip2_models/Qformer.py:968`` (``BertLMHeadModel``),
``lavis/models/med.py:1131`` and ``lavis/models/blip2_models/modeling_opt.py:897`` subclass
``PreTrainedModel``, which no longer inherits ``GenerationMixin``. ``Blip2Qformer.generate``
(``blip2_qformer.py:312``) then fails with ``AttributeError: 'BertLMHeadModel' object has
no attribute 'generate'``.

Fix: add ``GenerationMixin`` to the bases of those classes.
"""
from __future__ import annotations

from transformers import GenerationMixin


def _lm_heads():
    from lavis.models.blip2_models import Qformer, modeling_opt
    from lavis.models import med

    return (Qformer.BertLMHeadModel, med.BertLMHeadModel, modeling_opt.OPTForCausalLM)


def apply() -> None:
    for cls in _lm_heads():
        if not issubclass(cls, GenerationMixin):
            cls.__bases__ = cls.__bases__ + (GenerationMixin,)
