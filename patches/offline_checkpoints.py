"""``from_config`` always tries to load a checkpoint, and downloads URLs.

Upstream: ``lavis/models/base_model.py:89-100`` (``load_checkpoint_from_config``) loads
``finetuned`` when ``load_finetuned`` is set (the default) and ``pretrained`` otherwise,
whatever their value: an empty ``pretrained:`` ends in ``RuntimeError: checkpoint url or
path is invalid``, a URL is downloaded, and the assert at ``:99`` is a no-op.

Fix: an empty path loads nothing (and logs it); a URL or a missing file is one clear
error naming the config key and the path. Local files load as before.
"""
from __future__ import annotations

import logging


def apply() -> None:
    from lavis.common.utils import is_url
    from lavis.models.base_model import BaseModel

    from lavis_ext.local_paths import LocalPathError, require_file

    original = BaseModel.load_checkpoint_from_config
    if getattr(original, "_lavis_ext", False):
        return

    def load_checkpoint_from_config(self, cfg, **kwargs):
        key = "finetuned" if cfg.get("load_finetuned", True) else "pretrained"
        path = cfg.get(key) or ""
        if not path:
            logging.getLogger(__name__).info("model.%s is empty: no checkpoint loaded", key)
            return None
        if is_url(path):
            raise LocalPathError(
                f"model.{key} = {path!r} is a URL; lavis-ext never downloads: fetch the file and "
                f"set model.{key} to its local path (or to '' to load nothing)"
            )
        require_file(path, f"model.{key}")
        return original(self, cfg, **kwargs)

    load_checkpoint_from_config._lavis_ext = True
    BaseModel.load_checkpoint_from_config = load_checkpoint_from_config
