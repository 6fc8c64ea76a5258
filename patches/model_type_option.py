"""``--options model.model_type=...`` is ignored: the project yaml's model type always wins.

Upstream: ``lavis/common/config.py:60`` (``Config.build_model_config``) reads
``kwargs.get("model.model_type")``, but ``Config.__init__`` (``:27``) passes the options as
a nested ``{"model": {"model_type": ...}}``, so the dotted key is never there and the
default model yaml of the project's own ``model_type`` is loaded. Switching e.g. to
``pretrain_internlm2_chat_1_8b`` then silently keeps the base model's defaults.

Fix: look the option up in the nested form too, and hand it on in the dotted form.
"""
from __future__ import annotations

from omegaconf import OmegaConf


def apply() -> None:
    from lavis.common.config import Config

    original = Config.build_model_config
    if getattr(original, "_lavis_ext", False):
        return

    def build_model_config(config, **kwargs):
        model_type = OmegaConf.select(OmegaConf.create(kwargs), "model.model_type", default=None) if kwargs else None
        if model_type:
            kwargs["model.model_type"] = model_type
        return original(config, **kwargs)

    build_model_config._lavis_ext = True
    Config.build_model_config = staticmethod(build_model_config)
