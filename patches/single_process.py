"""Stage-1 BLIP-2 needs a process group even when there is one process.

Upstream: ``lavis/models/blip2_models/blip2_qformer.py:153`` calls ``dist.get_rank()`` and
``lavis/models/base_model.py:209`` (``all_gather_with_grad``) calls
``torch.distributed.get_world_size()`` unguarded, so ``Blip2Qformer.forward`` outside
torchrun fails with ``ValueError: Default process group has not been initialized``.
(``concat_all_gather`` at ``base_model.py:223`` already has the guard.)

Fix: without a process group, rank is 0 and the gather is the identity, in the module
namespaces that imported them (``blip2_qformer``, ``blip_retrieval``, ``alpro_retrieval``).
"""
from __future__ import annotations

import types


def apply() -> None:
    from lavis.common import dist_utils
    from lavis.models import base_model
    from lavis.models.alpro_models import alpro_retrieval
    from lavis.models.blip2_models import blip2_qformer
    from lavis.models.blip_models import blip_retrieval

    original = base_model.all_gather_with_grad
    if getattr(original, "_lavis_ext", False):
        return

    def all_gather_with_grad(tensors):
        if not dist_utils.is_dist_avail_and_initialized():
            return tensors
        return original(tensors)

    all_gather_with_grad._lavis_ext = True
    for module in (base_model, blip2_qformer, blip_retrieval, alpro_retrieval):
        module.all_gather_with_grad = all_gather_with_grad
    blip2_qformer.dist = types.SimpleNamespace(get_rank=dist_utils.get_rank)
