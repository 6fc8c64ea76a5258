"""LAVIS's cache root is an absolute path on Salesforce's machines.

Upstream: ``lavis/configs/default.yaml:10`` sets ``cache_root: "/export/home/.cache/lavis"``;
being absolute, it wins the join at ``lavis/__init__.py:27``, so every relative dataset
``storage:`` path resolves under ``/export/...`` (and annotation downloads try to write there).

Fix: the cache root is ``$LAVIS_CACHE_ROOT``, default ``~/.cache/lavis``. ``register_path``
refuses to re-register, so the registry entry is set directly.
"""
from __future__ import annotations

import os

ENV = "LAVIS_CACHE_ROOT"


def cache_root() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get(ENV, "~/.cache/lavis")))


def apply() -> None:
    from lavis.common.registry import registry

    registry.mapping["paths"]["cache_root"] = cache_root()
