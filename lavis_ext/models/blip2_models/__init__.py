"""BLIP-2 models registered by lavis-ext."""
from lavis_ext.models.blip2_models.blip2_internlm import Blip2InternLM, Blip2InternLMConfig

__all__ = ["Blip2InternLM", "Blip2InternLMConfig"]
