"""BLIP-2 models registered by lavis-ext."""
from lavis_ext.models.blip2_models.blip2_internlm import Blip2InternLM, Blip2InternLMConfig
from lavis_ext.models.blip2_models.blip2_qformer_ids import Blip2QformerIds

__all__ = ["Blip2InternLM", "Blip2InternLMConfig", "Blip2QformerIds"]
