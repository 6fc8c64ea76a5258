"""Stage-1 BLIP-2 (ITC + ITM + LM Q-Former) whose contrastive targets follow ``image_id``.

Registered as ``blip2_qformer_ext``; the stock ``blip2`` model is left untouched.

Why
---
COCO has five captions per image. Stock LAVIS 1.0.2 (``blip2_qformer.py:153-161``) treats
only the diagonal as positive, so two captions of the same image in one global batch push
each other apart in ITC, and ITM may sample one as the other's "hard negative"
(``:168-172`` zero only the diagonal).

Upstream fixed this later: 93e0179 (HEAD ``lavis/models/blip2_models/blip2_qformer.py:159-167``
soft ITC targets from ``pos_idx = image_ids == image_ids_all.T``; ``:180-183`` mask every
same-id pair out of the ITM negative sampling). Its ``samples["image_id"].view(-1, 1)``
assumes an int tensor, but 71a2da9 made COCO return raw string ids (``"coco_328757"``),
so training crashed with ``'list' object has no attribute 'view'`` (#629, #658). The crash
disappears as soon as VG is mixed in, only because VG samples have no ``image_id`` key and
``ConcatDataset.collater`` drops keys that not every sample has.

What this model does
--------------------
- :func:`image_ids_to_tensor` maps ids to int64: ints stay, numeric strings parse, any other
  string (``"coco_1"``, ``"vg_1"``) maps through a 63-bit blake2b hash of its UTF-8 bytes,
  prefix included, so the value is the same in every process (Python's ``hash()`` is salted
  per process and would break cross-rank matching).
- ids are gathered across ranks; :func:`itc_targets` gives every caption of the same image,
  on any rank, an equal share of the target mass; the loss is the soft-target cross entropy
  of upstream HEAD (:func:`soft_cross_entropy`), with the stock ``label_smoothing=0.1``.
- :func:`itm_negative_weights` zeroes every same-id pair, not just the diagonal.
- Samples without an id (key absent, ``None``, or ``None`` entries) are positive only with
  themselves: exactly the stock diagonal targets at ``rank * bs`` offsets. Ids are gathered
  on every rank even when absent, so ranks whose batches differ in this never deadlock.

Note: LAVIS 1.0.2's ``CaptionDataset`` returns a per-dataset int *index* as ``image_id``;
two datasets with index ids would collide. String ids (as the raw annotations hold) are
namespaced by their prefix.
"""
from __future__ import annotations

import hashlib
import logging
import numbers
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from lavis.common.dist_utils import get_rank, is_dist_avail_and_initialized
from lavis.common.registry import registry
from lavis.models import base_model
from lavis.models.base_model import concat_all_gather
from lavis.models.blip2_models.blip2_qformer import Blip2Qformer
from lavis.models.blip_models.blip_outputs import BlipOutput, BlipSimilarity

from lavis_ext import blip2_parts
from lavis_ext.checkpoint import load_checkpoint_file, load_state_dict_named, model_weights

logger = logging.getLogger(__name__)

NO_ID = -1  # marks a sample without an image id; real ids are >= 0
_INT64_MAX = 2**63 - 1

ImageIds = Union[torch.Tensor, Sequence[Any], str, int]


# --------------------------------------------------------------------------- image ids


def stable_id_hash(image_id: str) -> int:
    """A 63-bit, non-negative, process-independent hash of ``image_id``'s UTF-8 bytes."""
    digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def image_id_to_int(image_id: Any) -> int:
    """One id to a non-negative int; ``None`` to :data:`NO_ID`.

    ``7``, ``"7"`` and ``"007"`` are all 7; ``"coco_7"`` and ``"vg_7"`` hash, and differ.
    """
    if image_id is None:
        return NO_ID
    if isinstance(image_id, torch.Tensor):
        if image_id.numel() != 1:
            raise ValueError(f"image_id: expected one id per sample, got a tensor of shape {tuple(image_id.shape)}")
        image_id = image_id.item()
    if isinstance(image_id, numbers.Integral):
        value = int(image_id)
        if not 0 <= value <= _INT64_MAX:
            raise ValueError(f"image_id {value}: int ids must lie in [0, 2**63)")
        return value
    if isinstance(image_id, str):
        if image_id.isascii() and image_id.isdigit() and int(image_id) <= _INT64_MAX:
            return int(image_id)
        return stable_id_hash(image_id)
    raise TypeError(f"image_id {image_id!r}: expected an int, a str or None, got {type(image_id).__name__}")


def image_ids_to_tensor(ids: ImageIds, device: Optional[torch.device] = None) -> torch.LongTensor:
    """Per-sample ids (list/tuple, tensor, or one scalar) to an int64 tensor of shape ``[bs]``.

    Entries may be ints, numeric strings, other strings (hashed, see :func:`stable_id_hash`)
    or ``None`` (:data:`NO_ID`). The result lives on ``device``.
    """
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"image_id tensor must be integral, got {ids.dtype}")
        flat = ids.reshape(-1).to(device=device, dtype=torch.long)
        if (flat < 0).any():
            raise ValueError("image_id tensor holds negative ids; ids must be >= 0")
        return flat
    if isinstance(ids, (str, numbers.Integral)):
        ids = [ids]
    return torch.tensor([image_id_to_int(i) for i in ids], dtype=torch.long, device=device)


# --------------------------------------------------------------------------- targets and losses


def positive_mask(ids: torch.Tensor, ids_all: torch.Tensor, rank: int = 0) -> torch.BoolTensor:
    """``[bs, world_bs]``: True where local sample i and global sample j show the same image.

    Sample i is always its own positive (column ``rank * bs + i``); :data:`NO_ID` matches
    nothing else, so samples without ids get the stock diagonal.
    """
    bs = ids.size(0)
    if ids_all.size(0) < (rank + 1) * bs:
        raise ValueError(f"gathered ids ({ids_all.size(0)}) too few for rank {rank} with batch size {bs}")
    pos = (ids.view(-1, 1) == ids_all.view(1, -1)) & (ids.view(-1, 1) != NO_ID)
    own = torch.arange(bs, device=ids.device)
    pos[own, rank * bs + own] = True
    return pos


def itc_targets(ids: torch.Tensor, ids_all: torch.Tensor, rank: int = 0) -> torch.FloatTensor:
    """ITC target distribution ``[bs, world_bs]``: each row spreads 1 evenly over its positives.

    As upstream HEAD ``blip2_qformer.py:159-167`` (``pos_idx / pos_idx.sum(1)``), before smoothing.
    """
    pos = positive_mask(ids, ids_all, rank).float()
    return pos / pos.sum(1, keepdim=True)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """``-(log_softmax(logits) * smoothed_targets).sum(1).mean()``.

    Smoothing mixes in the uniform distribution as ``F.cross_entropy(label_smoothing=...)``
    does, so with one-hot targets this equals the stock loss exactly (and upstream HEAD's
    ``0.9 * sim_targets + 0.1 / n`` for ``label_smoothing=0.1``).
    """
    targets = (1.0 - label_smoothing) * targets + label_smoothing / targets.size(1)
    return -(F.log_softmax(logits, dim=1) * targets).sum(1).mean()


@torch.no_grad()
def itm_negative_weights(sim: torch.Tensor, pos_mask: torch.Tensor, rank: int = 0) -> torch.Tensor:
    """Sampling weights for ITM hard negatives: ``softmax(sim) + 1e-4``, zero at every positive.

    ``sim`` and ``pos_mask`` are ``[bs, world_bs]``. Stock 1.0.2 (``blip2_qformer.py:168-172``)
    zeroes only the diagonal block at ``rank * bs``. A row whose every column is a positive
    (the whole global batch shows one image) has no valid negative: it falls back to the
    stock rule, zeroing only its own column, and a warning is logged.

    A row with non-finite similarities (a diverged step) is sampled uniformly instead of
    failing in ``torch.multinomial``: the step's ITC loss is non-finite as well, so
    runner_ext skips it or aborts (``run.max_nonfinite_steps``), and every rank still runs
    the same collectives.
    """
    bs = sim.size(0)
    base = F.softmax(sim.float(), dim=1) + 1e-4
    diverged = ~torch.isfinite(base).all(1)
    if diverged.any():
        logger.warning("ITM: %d sample(s) have non-finite similarities; negatives drawn uniformly", int(diverged.sum()))
        base = base.masked_fill(diverged.unsqueeze(1), 1.0)
    weights = base.masked_fill(pos_mask, 0.0)
    empty = weights.sum(1) == 0
    if empty.any():
        logger.warning("ITM: %d sample(s) have no negative with another image id; "
                       "using a same-image caption as negative", int(empty.sum()))
        own = torch.arange(bs, device=sim.device)
        only_self = base.clone()
        only_self[own, rank * bs + own] = 0.0
        weights[empty] = only_self[empty]
    return weights


def sample_negatives(weights: torch.Tensor) -> torch.LongTensor:
    """One column per row, drawn with probability proportional to ``weights``."""
    return torch.multinomial(weights, 1).squeeze(1)


def _gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    # looked up at call time: patches.single_process guards it; guard here as well
    if not is_dist_avail_and_initialized():
        return tensor
    return base_model.all_gather_with_grad(tensor)


# --------------------------------------------------------------------------- model


@registry.register_model("blip2_qformer_ext")
class Blip2QformerIds(Blip2Qformer):
    """Stock stage-1 BLIP-2 with image-id-aware ITC targets and ITM negatives.

    Same architecture, weights, ``PRETRAINED_MODEL_CONFIG_DICT`` and generation as
    ``blip2``; ``from_config`` also honours ``embed_dim`` (stock ignores it).

    ``forward(samples)`` takes ``image`` ``[bs, 3, H, W]``, ``text_input`` (``bs`` strings) and
    optionally ``image_id`` (``bs`` ints / numeric strings / strings / ``None``, or a tensor).
    """

    LABEL_SMOOTHING = 0.1  # stock ITC smoothing (blip2_qformer.py:160-161)

    def forward(self, samples: dict) -> BlipOutput:
        image, text = samples["image"], samples["text_input"]
        bs, rank, device = image.size(0), get_rank(), image.device

        # step 1: images -> ViT patch embeddings -> query features (queries cross-attend to patches)
        image_embeds = self.ln_vision(self.visual_encoder(image))  # [bs, patches, vit_dim]
        query_output = blip2_parts.query_pass(self.Qformer.bert, self.query_tokens, image_embeds, use_cache=True)
        image_feats = F.normalize(self.vision_proj(query_output.last_hidden_state), dim=-1)  # [bs, q, d]

        # step 2: texts -> [CLS] features (Q-Former in text-only mode)
        text_tokens = self.tokenizer(text, padding="max_length", truncation=True, max_length=self.max_txt_len,
                                     return_tensors="pt").to(device)
        text_output = self.Qformer.bert(text_tokens.input_ids, attention_mask=text_tokens.attention_mask,
                                        return_dict=True)
        text_feat = F.normalize(self.text_proj(text_output.last_hidden_state[:, 0, :]), dim=-1)  # [bs, d]

        # step 3: image ids -> ITC targets over the global batch (gathered on every rank, ids or not)
        ids = self.batch_image_ids(samples, bs, device)
        targets = itc_targets(ids, concat_all_gather(ids), rank)  # [bs, world_bs]

        # step 4: image-text contrastive loss, soft targets in both directions
        sim_i2t, sim_t2i = self._similarities(image_feats, text_feat)  # [bs, world_bs] each
        loss_itc = (soft_cross_entropy(sim_i2t, targets, self.LABEL_SMOOTHING)
                    + soft_cross_entropy(sim_t2i, targets, self.LABEL_SMOOTHING)) / 2

        # step 5: image-text matching on (pos, pos), (text, hard-negative image), (hard-negative text, image)
        loss_itm = self._itm_loss(image_embeds, text_tokens, sim_i2t, sim_t2i, positives=targets > 0)

        # step 6: image-grounded captioning, decoding from the queries' cached keys/values
        loss_lm = self._lm_loss(text_tokens, query_output.past_key_values)

        return BlipOutput(
            loss=loss_itc + loss_itm + loss_lm,
            loss_itc=loss_itc,
            loss_itm=loss_itm,
            loss_lm=loss_lm,
            sims=BlipSimilarity(sim_i2t=sim_i2t.detach(), sim_t2i=sim_t2i.detach(),
                                sim_i2t_targets=targets, sim_t2i_targets=targets),
        )

    @staticmethod
    def batch_image_ids(samples: dict, bs: int, device: torch.device) -> torch.LongTensor:
        """``samples["image_id"]`` as ``[bs]`` int64 on ``device``; all :data:`NO_ID` if absent/None."""
        raw = samples.get("image_id")
        if raw is None:
            return torch.full((bs,), NO_ID, dtype=torch.long, device=device)
        ids = image_ids_to_tensor(raw, device)
        if ids.numel() != bs:
            raise ValueError(f"samples['image_id'] has {ids.numel()} ids for a batch of {bs}")
        return ids

    def _similarities(self, image_feats: torch.Tensor, text_feat: torch.Tensor):
        """Local-vs-global similarities, max over query tokens, over the temperature (stock ``:129-151``)."""
        image_feats_all = concat_all_gather(image_feats)  # [world_bs, q, d], no grad (as stock)
        text_feat_all = concat_all_gather(text_feat)  # [world_bs, d]
        sim_i2t = torch.einsum("iqd,td->itq", image_feats, text_feat_all).amax(-1) / self.temp
        sim_t2i = torch.einsum("td,iqd->tiq", text_feat, image_feats_all).amax(-1) / self.temp
        return sim_i2t, sim_t2i

    def _itm_loss(self, image_embeds, text_tokens, sim_i2t, sim_t2i, positives: torch.Tensor) -> torch.Tensor:
        bs = image_embeds.size(0)
        text_ids_world = concat_all_gather(text_tokens.input_ids)
        text_atts_world = concat_all_gather(text_tokens.attention_mask)
        image_embeds_world = _gather_with_grad(image_embeds)

        # hard negatives, never an image/caption with the same id
        neg_images = sample_negatives(itm_negative_weights(sim_t2i, positives, get_rank()))
        neg_texts = sample_negatives(itm_negative_weights(sim_i2t, positives, get_rank()))

        text_ids = torch.cat([text_tokens.input_ids, text_tokens.input_ids, text_ids_world[neg_texts]])
        text_atts = torch.cat([text_tokens.attention_mask, text_tokens.attention_mask, text_atts_world[neg_texts]])
        images = torch.cat([image_embeds, image_embeds_world[neg_images], image_embeds])  # pos, neg, pos

        query_tokens = self.query_tokens.expand(text_ids.size(0), -1, -1)
        output = self.Qformer.bert(text_ids, query_embeds=query_tokens,
                                   attention_mask=torch.cat([self._ones(query_tokens), text_atts], dim=1),
                                   encoder_hidden_states=images, encoder_attention_mask=self._ones(images),
                                   return_dict=True)
        logits = self.itm_head(output.last_hidden_state[:, : query_tokens.size(1), :]).mean(dim=1)
        labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)]).to(logits.device)
        return F.cross_entropy(logits, labels)

    def _lm_loss(self, text_tokens, past_key_values) -> torch.Tensor:
        decoder_input_ids = text_tokens.input_ids.clone()
        decoder_input_ids[:, 0] = self.tokenizer.bos_token_id
        labels = decoder_input_ids.masked_fill(decoder_input_ids == self.tokenizer.pad_token_id, -100)
        query_atts = torch.ones(decoder_input_ids.size(0), self.query_tokens.size(1), dtype=torch.long,
                                device=decoder_input_ids.device)
        output = self.Qformer(decoder_input_ids, attention_mask=torch.cat([query_atts, text_tokens.attention_mask], 1),
                              past_key_values=past_key_values, return_dict=True, labels=labels)
        return output.loss

    @staticmethod
    def _ones(embeds: torch.Tensor) -> torch.Tensor:
        """All-ones attention mask over the first two dims of ``embeds``."""
        return torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)

    def load_from_pretrained(self, url_or_filename):
        """Stock ``Blip2Base.load_from_pretrained`` (``blip2.py:80-96``: non-strict), read safely
        (:func:`~lavis_ext.checkpoint.load_checkpoint_file`) and naming the file on a mismatch."""
        return self._load_weights(url_or_filename, "model.pretrained")

    def load_checkpoint(self, url_or_filename):
        """Stock ``BaseModel.load_checkpoint`` (``base_model.py:29-53``), read as :meth:`load_from_pretrained`."""
        return self._load_weights(url_or_filename, "model.finetuned")

    def _load_weights(self, path, key: str):
        state_dict = model_weights(load_checkpoint_file(path, key), key, path)
        missing, unexpected = load_state_dict_named(self, state_dict, f"{key} = {path}")
        logger.info("loaded %s from %s; missing keys %s, unexpected keys %s", key, path, missing, unexpected)
        return missing, unexpected

    @classmethod
    def from_config(cls, cfg):
        """Stock ``Blip2Qformer.from_config`` (``blip2_qformer.py:483-510``), plus ``embed_dim``; the
        BERT and ViT come from ``cfg``'s ``bert_path``/``vit_path`` (:func:`blip2_parts.building_from`)."""
        with blip2_parts.building_from(cfg):
            model = cls(
                vit_model=cfg.get("vit_model", "eva_clip_g"),
                img_size=cfg.get("image_size"),
                drop_path_rate=cfg.get("drop_path_rate", 0),
                use_grad_checkpoint=cfg.get("use_grad_checkpoint", False),
                vit_precision=cfg.get("vit_precision", "fp16"),
                freeze_vit=cfg.get("freeze_vit", True),
                num_query_token=cfg.get("num_query_token"),
                cross_attention_freq=cfg.get("cross_attention_freq", 2),
                embed_dim=cfg.get("embed_dim", 256),
                max_txt_len=cfg.get("max_txt_len", 32),
            )
        model.load_checkpoint_from_config(cfg)
        return model
