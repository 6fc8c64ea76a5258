"""BLIP-2's shared parts are hard-wired to hub names and URLs.

Upstream:
- ``lavis/models/blip2_models/blip2.py:32`` ``BertTokenizer.from_pretrained("bert-base-uncased")``
  (offline on transformers 4.57 this fails with a misleading "requires the protobuf
  library" error);
- ``blip2.py:48`` and ``:54`` ``BertConfig``/``BertLMHeadModel.from_pretrained("bert-base-uncased")``;
- ``lavis/models/eva_vit.py:429`` and ``lavis/models/clip_vit.py:242`` download the ViT
  weights from a GCS URL, after building the full model, with no way to skip it.

Fix: route ``Blip2Base.init_tokenizer``/``init_Qformer`` and the two ViT factories (looked up
by name at ``blip2.py:72-76``) through :mod:`lavis_ext.blip2_parts`, which builds them from local
paths. These methods take no config, so each registered BLIP-2 model's ``from_config`` runs
inside :func:`lavis_ext.blip2_parts.building_from`: the parts come from that config's
``model.bert_path``/``model.vit_path`` (default: env ``LAVIS_EXT_BERT``/``LAVIS_EXT_VIT``).
"""
from __future__ import annotations

import functools


def _from_config_with_paths(from_config):
    from lavis_ext import blip2_parts

    @functools.wraps(from_config)
    def wrapped(cls, cfg):
        with blip2_parts.building_from(cfg):
            return from_config(cls, cfg)
    return wrapped


def apply() -> None:
    from lavis.common.registry import registry
    from lavis.models.blip2_models import blip2

    from lavis_ext import blip2_parts

    if getattr(blip2.Blip2Base, "_lavis_ext_offline", False):
        return

    def init_tokenizer(cls):
        weights = blip2_parts.weights_in_build()
        return blip2_parts.build_bert_tokenizer(weights.bert_path, key=weights.describe("bert_path"))

    def init_Qformer(cls, num_query_token, vision_width, cross_attention_freq=2):
        weights = blip2_parts.weights_in_build()
        return blip2_parts.build_qformer(weights.bert_path, num_query_token, vision_width, cross_attention_freq,
                                     key=weights.describe("bert_path"))

    def vision_factory(vit_model):
        def create(img_size=224, drop_path_rate=0.0, use_checkpoint=False, precision="fp16"):
            weights = blip2_parts.weights_in_build()
            return blip2_parts.build_vision_encoder(vit_model, weights.vit_path, img_size, drop_path_rate,
                                                use_checkpoint, key=weights.describe("vit_path"), precision=precision)
        return create

    blip2.Blip2Base.init_tokenizer = classmethod(init_tokenizer)
    blip2.Blip2Base.init_Qformer = classmethod(init_Qformer)
    blip2.create_eva_vit_g = vision_factory("eva_clip_g")
    blip2.create_clip_vit_L = vision_factory("clip_L")
    for model_cls in set(registry.mapping["model_name_mapping"].values()):
        if issubclass(model_cls, blip2.Blip2Base) and "from_config" in vars(model_cls):
            model_cls.from_config = classmethod(_from_config_with_paths(vars(model_cls)["from_config"].__func__))
    blip2.Blip2Base._lavis_ext_offline = True
