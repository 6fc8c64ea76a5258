"""torchvision 0.28.0 (a CUDA wheel) fails to import on the CPU build of torch 2.13.0.

Upstream: ``torchvision/_meta_registrations.py:163`` (``torchvision::nms``) and ``:177``
(``torchvision::qnms``) register fake kernels without the ``_has_ops()`` guard the other
registrations have. The wheel's ``_C.so`` cannot load on CPU torch, so the schemas do not
exist and ``import torchvision`` raises ``RuntimeError: operator torchvision::nms does
not exist``. transformers' ``image_utils`` imports torchvision, so ``import lavis``
(``lavis/common/utils.py:28``) fails the same way.

Fix: define the two schemas ourselves before torchvision is imported. Only the schemas
are defined: ``ops.nms`` stays unavailable (BLIP-2 needs neither it nor ``decode_jpeg``).
On a machine where torchvision's own ops load, the schemas exist and nothing is done.
"""
from __future__ import annotations

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
# Kept in a module global: if the Library object is collected, its schemas vanish.
_library: torch.library.Library | None = None


def _has_schema(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


def apply() -> None:
    global _library
    missing = [name for name in _SCHEMAS if not _has_schema(name)]
    if not missing:
        return
    if _library is None:
        _library = torch.library.Library("torchvision", "DEF")
    for name in missing:
        _library.define(_SCHEMAS[name])
