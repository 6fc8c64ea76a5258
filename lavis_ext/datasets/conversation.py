"""Image conversations in LLaVA's / XTuner's JSON format, for instruction tuning (stage 3).

Registers the ``llava_conversation`` builder (default config ``configs/datasets/conversation/llava.yaml``)
and the ``internlm2_chat`` text processor that encodes a conversation with
:class:`~lavis_ext.models.blip2_models.chat_format.ChatFormat`.

An annotation file is a JSON list of records, as ``llava_v1_5_mix665k.json``::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

or with ``"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]`` in place of
``conversations`` (roles ``system``/``human``/``gpt`` there). ``image`` is relative to the
builder's image root. ``<image>`` must occur exactly once, in the first user turn; as XTuner's
``llava_map_fn`` does, it is moved to the front of that turn as ``<image>\\n``.

Checked when the files are read; a bad record raises :class:`~lavis_ext.datasets.base.DataError`
naming the file, the record index and the problem: an unknown role, turns that do not alternate
(after an optional system turn, user and assistant turns alternate and the last one answers), a
missing or second ``<image>``, an empty conversation, a missing image file. Records without
``image`` (text-only, e.g. mix665k's ShareGPT part) cannot feed BLIP-2 and are skipped, counted in
the log; so are conversations left with no supervised token after truncation to the processor's
``max_txt_len`` (:attr:`ConversationDataset.skipped` holds both counts).

Samples: ``{"image", "input_ids", "labels", "image_position", "conversation_id"}``, where the
ids and labels are the chat-format encoding and the query embeddings go before
``input_ids[image_position]`` (``Blip2InternLM.forward`` reads them).
"""
from __future__ import annotations

import logging
import os
from collections import Counter

import numpy as np

from lavis.common.registry import registry
from lavis.processors.base_processor import BaseProcessor
from omegaconf import OmegaConf
from PIL import Image

from lavis_ext.models.blip2_models.chat_format import IMAGE_TOKEN, ChatFormat, LLMTokens, check_messages
from lavis_ext.datasets.base import AnnSource, DataError, ImageDatasetExt
from lavis_ext.datasets.builders import OfflineBuilderExt, register_builder_ext
from lavis_ext.models.internlm2 import load_internlm2_tokenizer
from lavis_ext.local_paths import require_dir

logger = logging.getLogger(__name__)

# role names per record format: LLaVA's "conversations" ("from"/"value"), or "messages" ("role"/"content")
FORMATS = {
    "conversations": ("from", "value", {"system": "system", "human": "user", "gpt": "assistant"}),
    "messages": ("role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
}
SKIP_TEXT_ONLY = "text-only (no image)"
SKIP_NO_SUPERVISION = "no supervised token after truncation"


def parse_record(record, source: AnnSource) -> list[dict[str, str]]:
    """A record's turns as ``{"role", "content"}`` messages, ``<image>\\n`` in front of the first
    user turn when the record has an image; raises :class:`DataError` naming ``source`` and the problem."""
    if not isinstance(record, dict):
        raise DataError(f"{source}: expected an object with 'conversations' or 'messages', got {type(record).__name__}")
    keys = [k for k in FORMATS if k in record]
    if len(keys) != 1:
        raise DataError(f"{source}: expected exactly one of {list(FORMATS)}, got keys {sorted(record)}")
    role_key, content_key, roles = FORMATS[keys[0]]
    turns = record[keys[0]]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{source}: empty conversation ({keys[0]!r} is {turns!r})")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get(content_key), str):
            raise DataError(f"{source}: turn {i} must be an object with a string {content_key!r}, got {turn!r}")
        if turn.get(role_key) not in roles:
            raise DataError(f"{source}: turn {i} has unknown role {role_key}={turn.get(role_key)!r}; "
                            f"expected one of {list(roles)}")
        messages.append({"role": roles[turn[role_key]], "content": turn[content_key]})
    has_image = "image" in record
    if has_image and not isinstance(record["image"], str):
        raise DataError(f"{source}: 'image' must be a path string, got {record['image']!r}")
    count = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if has_image and count != 1:
        raise DataError(f"{source}: {'missing' if count == 0 else f'{count} x'} {IMAGE_TOKEN}: "
                        f"a record with an image needs exactly one {IMAGE_TOKEN}, in the first user turn")
    if not has_image and count:
        raise DataError(f"{source}: {IMAGE_TOKEN} in a record without 'image'")
    if has_image:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is not None and IMAGE_TOKEN in first_user["content"]:
            first_user["content"] = f"{IMAGE_TOKEN}\n" + first_user["content"].replace(IMAGE_TOKEN, "").strip()
    try:
        check_messages(messages)
    except ValueError as err:
        raise DataError(f"{source}: {err}") from err
    return messages


@registry.register_processor("internlm2_chat")
class InternLM2ChatProcessor(BaseProcessor):
    """Text processor: ``{"role", "content"}`` messages -> :class:`~lavis_ext.models.blip2_models.chat_format.LLMTokens`.

    Config: ``llm_path`` (the InternLM2 or converted Llama directory whose tokenizer is used: the
    model's ``llm_path``) and ``max_txt_len`` (text tokens per conversation, truncated by turns).
    """

    KEYS = ("name", "llm_path", "max_txt_len")

    def __init__(self, llm_path: str, max_txt_len: int):
        super().__init__()
        tokenizer = load_internlm2_tokenizer(require_dir(llm_path, "text_processor.llm_path"))
        self.chat_format = ChatFormat(tokenizer, max_txt_len)

    @classmethod
    def from_config(cls, cfg=None):
        cfg = OmegaConf.create() if cfg is None else cfg
        unknown = sorted(set(cfg) - set(cls.KEYS))
        missing = [k for k in ("llm_path", "max_txt_len") if cfg.get(k) in (None, "")]
        if unknown or missing:
            raise ValueError(f"text_processor internlm2_chat: unknown keys {unknown}, missing keys {missing}; "
                             f"it takes {list(cls.KEYS[1:])}")
        return cls(str(cfg.llm_path), int(cfg.max_txt_len))

    def __call__(self, messages) -> LLMTokens:
        return self.chat_format.encode(messages)


class ConversationDataset(ImageDatasetExt):
    """LLaVA/XTuner conversations (module docstring), each encoded once when the files are read.

    ``text_processor`` is an :class:`InternLM2ChatProcessor`; other arguments: :class:`ImageDatasetExt`.
    """

    LIST_KEYS = ("input_ids", "labels", "conversation_id")

    @classmethod
    def check_record(cls, record, source: AnnSource) -> None:
        parse_record(record, source)

    def _select(self, annotations, sources):
        kept, kept_sources = [], []
        self.skipped: Counter[str] = Counter()
        for record, source in zip(annotations, sources):
            if "image" not in record:
                self.skipped[SKIP_TEXT_ONLY] += 1
                continue
            path = os.path.join(self.vis_root, record["image"])
            if not os.path.isfile(path):
                raise DataError(f"{source}: image file not found: {path}")
            tokens = self.text_processor(parse_record(record, source))
            if tokens.num_supervised == 0:
                self.skipped[SKIP_NO_SUPERVISION] += 1
                continue
            # int32 arrays: a list of Python ints per token would take ~7x the memory on mix665k
            kept.append({"image": record["image"], "conversation_id": record.get("id", source.index),
                         "input_ids": np.asarray(tokens.input_ids, dtype=np.int32),
                         "labels": np.asarray(tokens.labels, dtype=np.int32), "image_position": tokens.image_position})
            kept_sources.append(source)
        if self.skipped:
            logger.warning("%s: skipped %s of %d records (kept %d)", self.name, dict(self.skipped), len(annotations),
                           len(kept))
        if not kept:
            raise DataError(f"{self.name}: no usable conversation among {len(annotations)} records "
                            f"(skipped: {dict(self.skipped)})")
        return kept, kept_sources

    def _sample(self, index: int, image: Image.Image) -> dict:
        ann = self.annotation[index]
        return {"image": self.vis_processor(image), "input_ids": ann["input_ids"].tolist(),
                "labels": ann["labels"].tolist(), "image_position": ann["image_position"],
                "conversation_id": ann["conversation_id"]}


@register_builder_ext("llava_conversation", "conversation/llava.yaml")
class ConversationBuilder(OfflineBuilderExt):
    """LLaVA/XTuner conversation files (train split), encoded by the ``internlm2_chat`` text processor."""

    train_dataset_cls = ConversationDataset
    eval_dataset_cls = None
