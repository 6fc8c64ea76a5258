"""torchvision 0.28.0 (a CUDA wheel) fails to import on the CPU build of torch 2.13.0.

Upstream: ``torchvision/_meta_registrations.py:163`` (``torchvision::nms``) and ``:177``
(``torchvision::qnms``) register fake kernels without the ``_has_ops()`` guard the other
registrations have. The wheel's ``_C.so`` cannot load on CPU torch, so the schemas do not
exist and ``import torchvision`` raises ``RuntimeError: operator torchvision::nms does
not exist``. transformers' ``image_utils`` imports torchvision, so ``import lavis``
(``lavis/common/utils.py:28``) fails the same way.

Fix: before torchvision is imported, load its own ops library (``torchvision/_C.so``), as
torchvision itself would; where that loads (a CUDA machine, or a wheel built for this torch)
the schemas exist and nothing else is done. Where it cannot load, define the two schemas
ourselves. Defining them while the library could load would break torchvision's own
registration of the ``torchvision`` namespace. Only the schemas are defined: ``ops.nms``
stays unavailable (BLIP-2 needs neither it nor ``decode_jpeg``).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

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


def _load_torchvision_ops() -> bool:
    """Load torchvision's ``_C`` ops library; False where it cannot load with this torch."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for library in Path(spec.submodule_search_locations[0]).glob("_C*.so"):
        try:
            torch.ops.load_library(str(library))
        except (OSError, RuntimeError):
            return False
        return True
    return False


def apply() -> None:
    global _library
    if _library is None and all(_has_schema(name) for name in _SCHEMAS):
        return
    if _library is None and _load_torchvision_ops() and all(_has_schema(name) for name in _SCHEMAS):
        return
    missing = [name for name in _SCHEMAS if not _has_schema(name)]
    if not missing:
        return
    if _library is None:
        _library = torch.library.Library("torchvision", "DEF")
    for name in missing:
        _library.define(_SCHEMAS[name])
