"""LAVIS's BERT copies import helpers that transformers moved to ``pytorch_utils``.

Upstream: ``lavis/models/blip2_models/Qformer.py:39``, ``lavis/models/med.py:40`` and
``lavis/models/blip_models/nlvr_encoder.py:19`` do
``from transformers.modeling_utils import apply_chunking_to_forward,
find_pruneable_heads_and_indices, prune_linear_layer``. On transformers 4.57 that raises
``ImportError: cannot import name 'apply_chunking_to_forward'``, so ``import lavis`` fails.

Fix: re-export the three helpers from ``transformers.pytorch_utils`` under their old home.
"""
from __future__ import annotations

_NAMES = ("apply_chunking_to_forward", "find_pruneable_heads_and_indices", "prune_linear_layer")


def apply() -> None:
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    for name in _NAMES:
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))
