"""Small, documented fixes to salesforce-lavis 1.0.2 on a modern, offline, CPU-capable stack.

One module per upstream problem. Each module's docstring names the upstream
``file:line`` and the symptom, and exposes an idempotent ``apply()``.
``import lavis_ext`` calls :func:`apply_all` before anything imports LAVIS.

Set ``LAVIS_EXT_SKIP_PATCHES=name1,name2`` to leave named patches out; the test
suite uses it to show that each patch is needed.
"""
from __future__ import annotations

import importlib
import logging
import os

# Order matters: the first three must run before LAVIS (or transformers) is imported.
PATCHES = (
    "torchvision_cpu",
    "transformers_qformer_imports",
    "spacy_stub",
    "qformer_generation_mixin",
    "offline_blip2",
    "offline_checkpoints",
    "cache_root",
    "cpu_fp16",
    "qformer_beam_search",
    "single_process",
    "dist_init_gloo",
    "prefetch_loader_cpu",
    "logger_cpu_sync",
    "model_type_option",
)

SKIP_ENV = "LAVIS_EXT_SKIP_PATCHES"
applied: list[str] = []


def skipped() -> set[str]:
    """Names listed in ``$LAVIS_EXT_SKIP_PATCHES``; unknown names are an error."""
    names = {n.strip() for n in os.environ.get(SKIP_ENV, "").split(",") if n.strip()}
    unknown = names - set(PATCHES)
    if unknown:
        raise ValueError(f"{SKIP_ENV} names unknown patches {sorted(unknown)}; known: {list(PATCHES)}")
    return names


def apply_all() -> None:
    """Apply every patch not skipped, in order. Safe to call more than once."""
    skip = skipped()
    for name in PATCHES:
        if name in skip:
            logging.getLogger(__name__).warning("lavis_ext: patch %r skipped by %s", name, SKIP_ENV)
            continue
        importlib.import_module(f"{__name__}.{name}").apply()
        if name not in applied:
            applied.append(name)
