"""Beam-search captioning with the stage-1 Q-Former expands the batch twice.

Upstream: ``lavis/models/blip2_models/blip2_qformer.py:289`` repeats the image embeddings
``num_beams`` times before calling ``generate``, which (transformers >= 4.27) expands every
model input by ``num_beams`` again. ``num_beams > 1`` then fails at
``lavis/models/blip2_models/Qformer.py:1104`` with ``RuntimeError: Sizes of tensors must
match except in dimension 1``.

Fix: ``Blip2Qformer.generate`` passes the un-expanded batch and lets ``generate`` expand it.
"""
from __future__ import annotations

import torch


def generate(self, samples, use_nucleus_sampling=False, num_beams=3, max_length=30, min_length=10,
             top_p=0.9, repetition_penalty=1.0):
    """Same arguments and result as upstream: one caption per image."""
    image = samples["image"]
    with self.maybe_autocast():
        image_embeds = self.ln_vision(self.visual_encoder(image))
    image_embeds = image_embeds.float()
    image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long, device=image.device)
    bos = torch.full((image.size(0), 1), self.tokenizer.bos_token_id, dtype=torch.long, device=image.device)
    outputs = self.Qformer.generate(
        input_ids=bos,
        query_embeds=self.query_tokens.expand(image_embeds.shape[0], -1, -1),
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_atts,
        max_length=max_length,
        min_length=min_length,
        num_beams=1 if use_nucleus_sampling else num_beams,
        do_sample=use_nucleus_sampling,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        eos_token_id=self.tokenizer.sep_token_id,
        pad_token_id=self.tokenizer.pad_token_id,
    )
    return self.tokenizer.batch_decode(outputs, skip_special_tokens=True)


def apply() -> None:
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

    Blip2Qformer.generate = torch.no_grad()(generate)
