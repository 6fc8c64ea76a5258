"""InternLM2's chat format for BLIP-2: token ids, labels and the image's place in the text.

A sample's text is laid out as InternLM2's chat template renders it (see
``lavis_ext.models.internlm2.tokenizer.CHAT_TEMPLATE``)::

    <s><|im_start|>system\\n{system}<|im_end|>\\n                 (optional)
    <|im_start|>user\\n<image>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n
    <|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n ...

and the query embeddings take the place of ``<image>``. Labels follow XTuner's ``internlm2_chat``
template (``SUFFIX='<|im_end|>'``, ``suffix_as_eos``, ``SEP='\\n'``): only each assistant's content
and its ``<|im_end|>`` are supervised; the bos, system and user turns, the template tokens and the
``\\n`` after each ``<|im_end|>`` are ``IGNORE_INDEX``.

Each segment (a prompt part, an answer, its ``<|im_end|>``, the separator) is encoded on its own
and the ids are concatenated; nothing is found by splitting a rendered string, so labels cannot
drift from the ids (LLaVA's "tokenization mismatch", which masks whole samples).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lavis_ext.constants import IGNORE_INDEX
from lavis_ext.models.internlm2.tokenizer import IM_END, IM_START

IMAGE_TOKEN = "<image>"  # where the query embeddings go (LLaVA's DEFAULT_IMAGE_TOKEN)
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class LLMTokens:
    """One sample's text ids, their labels, and where the image's query embeddings go.

    The query embeddings are inserted before ``input_ids[image_position]`` (0: in front of the
    text, as stage 2 lays out captions); their labels are ``IGNORE_INDEX``.
    """

    input_ids: list[int]
    labels: list[int]
    image_position: int

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def encode_with_image(tokenizer, text: str, add_bos: bool) -> tuple[list[int], int]:
    """Ids of ``text`` (bos first when ``add_bos``) with at most one ``<image>`` cut out, and its position.

    The parts before and after ``<image>`` are encoded on their own; without ``<image>`` the
    position is 0 (the image in front of the text).
    """
    parts = text.split(IMAGE_TOKEN)
    if len(parts) > 2:
        raise ValueError(f"{len(parts) - 1} {IMAGE_TOKEN} tokens in one text; at most one is allowed: {text!r}")
    ids = [tokenizer.bos_token_id] if add_bos else []
    if len(parts) == 1:
        return ids + tokenizer.encode(text, add_special_tokens=False), 0
    before, after = parts
    ids += tokenizer.encode(before, add_special_tokens=False)
    position = len(ids)
    return ids + tokenizer.encode(after, add_special_tokens=False), position


def check_messages(messages: Sequence[Mapping[str, str]]) -> None:
    """An optional system turn, then user and assistant turns alternating, ending with an assistant
    turn; ``<image>`` at most once, in the first user turn. Raises ``ValueError`` saying what is wrong."""
    roles = [m["role"] for m in messages]
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown role(s) {unknown}; expected {list(ROLES)}")
    turns = roles[1:] if roles[:1] == ["system"] else roles
    expected = ["user", "assistant"] * ((len(turns) + 1) // 2)
    if not turns or turns != expected[:len(turns)]:
        raise ValueError(f"turns must alternate user, assistant, ... after an optional system turn; got {roles}")
    if turns[-1] != "assistant":
        raise ValueError(f"the conversation must end with an assistant turn (the answer to train on); got {roles}")
    images = [i for i, m in enumerate(messages) for _ in range(m["content"].count(IMAGE_TOKEN))]
    first_user = roles.index("user")
    if len(images) > 1 or images not in ([], [first_user]):
        raise ValueError(f"{IMAGE_TOKEN} must occur at most once, in the first user turn "
                         f"(message {first_user}); found it in messages {images}")


class ChatFormat:
    """Encodes conversations in InternLM2's chat format (module docstring) with a tokenizer.

    ``max_txt_len`` bounds the text tokens of a training sample (the query embeddings are not
    counted). Truncation is by turns: rounds (a user turn and its answer) are kept from the start
    while they fit, and the first round that does not fit is dropped with all that follow. A
    conversation whose first round does not fit keeps no supervised token
    (:attr:`LLMTokens.num_supervised` is 0); the caller skips it.
    """

    def __init__(self, tokenizer, max_txt_len: int):
        if max_txt_len < 1:
            raise ValueError(f"max_txt_len must be positive, got {max_txt_len}")
        self.tokenizer = tokenizer
        self.max_txt_len = max_txt_len

    @staticmethod
    def _round_segments(messages: Sequence[Mapping[str, str]]) -> list[list[tuple[str, bool]]]:
        """Per round, ``(text, supervised)`` segments; the system turn goes with the first round."""
        rounds: list[list[tuple[str, bool]]] = []
        pending: list[tuple[str, bool]] = []
        for message in messages:
            role, content = message["role"], message["content"]
            if role == "system":
                pending.append((f"{IM_START}system\n{content}{IM_END}\n", False))
            elif role == "user":
                pending.append((f"{IM_START}user\n{content}{IM_END}\n{IM_START}assistant\n", False))
            else:
                rounds.append(pending + [(content, True), (IM_END, True), ("\n", False)])
                pending = []
        return rounds

    def _encode_round(self, segments: list[tuple[str, bool]], offset: int) -> tuple[list[int], list[int], int | None]:
        """Ids and labels of one round's segments; the image position counts from ``offset``."""
        ids: list[int] = []
        labels: list[int] = []
        image_position = None
        for text, supervised in segments:
            segment_ids, position = encode_with_image(self.tokenizer, text, add_bos=False)
            if IMAGE_TOKEN in text:
                image_position = offset + len(ids) + position
            ids += segment_ids
            labels += segment_ids if supervised else [IGNORE_INDEX] * len(segment_ids)
        return ids, labels, image_position

    def encode(self, messages: Sequence[Mapping[str, str]]) -> LLMTokens:
        """A training conversation (``{"role", "content"}`` messages, ending with an assistant turn),
        truncated by turns to ``max_txt_len``."""
        check_messages(messages)
        ids, labels = [self.tokenizer.bos_token_id], [IGNORE_INDEX]
        image_position = 0
        for segments in self._round_segments(messages):
            round_ids, round_labels, position = self._encode_round(segments, offset=len(ids))
            if len(ids) + len(round_ids) > self.max_txt_len:
                break
            ids += round_ids
            labels += round_labels
            image_position = position if position is not None else image_position
        return LLMTokens(ids, labels, image_position)
