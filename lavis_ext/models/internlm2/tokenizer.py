"""A thin SentencePiece wrapper with the rules of the hub's ``InternLM2Tokenizer``.

The hub class is remote code, and transformers' own ``LlamaTokenizer`` does not reproduce it
(the non-legacy prefix handling and the slow-to-fast conversion change the ids, and the
latter needs protobuf). This wrapper needs only ``sentencepiece``.
"""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
from transformers import BatchEncoding

TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# InternLM2's chat and tool tokens, in vocabulary order (ids 92538..92543 in the released
# 92544-piece model). They are ordinary pieces of the SentencePiece model.
SPECIAL_TOKENS = (
    "<|plugin|>",
    "<|interpreter|>",
    "<|action_end|>",
    "<|action_start|>",
    "<|im_end|>",
    "<|im_start|>",
)
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# The hub's chat template (tokenizer_config.json of internlm2-chat-*).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PADDING_STRATEGIES = ("longest", "max_length", "do_not_pad")


class InternLM2Tokenizer:
    """InternLM2's tokenizer over a local ``tokenizer.model``, with a small HF-like surface.

    Encoding follows the hub class: the special tokens (``<s>``, ``</s>``, ``<unk>`` and
    :data:`SPECIAL_TOKENS`) are split out of the text and map to their single ids; every
    other chunk goes through raw ``sp.encode`` (so each chunk gets SentencePiece's dummy
    prefix, as in the hub). ``bos`` is prepended when ``add_bos_token`` and ``eos`` appended
    when ``add_eos_token``. ``pad_token_id`` is the eos id, as in the hub config.

    Decoding mirrors encoding: each run of ordinary ids between special tokens is decoded
    with ``sp.decode`` on its own (which drops that chunk's dummy prefix) and the pieces are
    joined with nothing in between. Hence ``decode(encode(x, add_special_tokens=False)) == x``
    and ``decode(encode(x), skip_special_tokens=True) == x`` whenever SentencePiece itself
    round-trips ``x``. Differences from the hub's decode:

    * with ``skip_special_tokens=False`` the hub may insert spaces next to special tokens (its
      ``convert_tokens_to_string`` adds one per run of ordinary pieces that precedes a special
      token, then applies a prefix-space heuristic); this wrapper never adds spaces;
    * with ``skip_special_tokens=True`` the hub decodes the remaining ids as one run, so text
      on both sides of a dropped special token is joined by the right-hand chunk's dummy
      prefix (``"a<|im_end|>b"`` -> ``"a b"`` there, ``"ab"`` here). A single run of text,
      such as a generated answer cut at its stop token, decodes the same way in both;
    * no ``clean_up_tokenization`` step (HF's removal of spaces before punctuation, e.g.
      ``"a ."`` -> ``"a."``), so the text comes back exactly as SentencePiece decodes it.

    The hub behaviour above is described from its remote code, which is not run here.

    Truncation keeps the left part of the text and leaves room for bos/eos, like HF's
    default ``truncation_side="right"``.
    """

    def __init__(
        self,
        model_file: str | Path,
        *,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        padding_side: str = "right",
    ) -> None:
        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise FileNotFoundError(f"{self.model_file} does not exist")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.padding_side = padding_side

        self.bos_token_id, self.eos_token_id = self.sp.bos_id(), self.sp.eos_id()
        self.unk_token_id = self.sp.unk_id()
        if min(self.bos_token_id, self.eos_token_id, self.unk_token_id) < 0:
            raise ValueError(f"{self.model_file}: the SentencePiece model must define unk, bos and eos ids")
        self.pad_token_id = self.eos_token_id
        self.bos_token, self.eos_token, self.unk_token = (
            self.sp.id_to_piece(i) for i in (self.bos_token_id, self.eos_token_id, self.unk_token_id)
        )
        self.pad_token = self.eos_token

        absent = [token for token in SPECIAL_TOKENS if self.sp.piece_to_id(token) == self.unk_token_id]
        if absent:
            raise ValueError(f"{self.model_file}: special tokens missing from the vocabulary: {absent}")
        specials = (self.bos_token, self.eos_token, self.unk_token, *SPECIAL_TOKENS)
        self.special_token_ids: dict[str, int] = {token: self.sp.piece_to_id(token) for token in specials}
        self._special_ids = frozenset(self.special_token_ids.values())
        # Longest first, so no special token is cut short by one that is its prefix.
        alternatives = "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))
        self._special_pattern = re.compile(f"({alternatives})")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> InternLM2Tokenizer:
        """Load ``tokenizer.model`` from a directory, with flags from its ``tokenizer_config.json``.

        Read flags: ``add_bos_token`` (default True), ``add_eos_token`` (default False) and
        ``padding_side`` (default ``"right"``); other keys are not used.
        """
        path = Path(path)
        config_file = path / TOKENIZER_CONFIG_FILE
        config: dict[str, Any] = {}
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
        return cls(
            path / TOKENIZER_FILE,
            add_bos_token=bool(config.get("add_bos_token", True)),
            add_eos_token=bool(config.get("add_eos_token", False)),
            padding_side=config.get("padding_side", "right"),
        )

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def stop_token_ids(self) -> list[int]:
        """Generation stops at eos or ``<|im_end|>`` (the chat models' ``generation_config``)."""
        return [self.eos_token_id, self.special_token_ids[IM_END]]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.sp.piece_to_id(tokens)
        return [self.sp.piece_to_id(token) for token in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self.sp.id_to_piece(ids)
        return [self.sp.id_to_piece(i) for i in ids]

    def _encode_text(self, text: str) -> list[int]:
        """Ids of ``text`` without bos/eos: special tokens split out, raw ``sp.encode`` between."""
        ids: list[int] = []
        for chunk in self._special_pattern.split(text):
            if chunk in self.special_token_ids:
                ids.append(self.special_token_ids[chunk])
            elif chunk:
                ids.extend(self.sp.encode(chunk, out_type=int))
        return ids

    def _num_added_tokens(self) -> int:
        return int(self.add_bos_token) + int(self.add_eos_token)

    def _add_special_tokens(self, ids: list[int]) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        return bos + ids + eos

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._encode_text(text)
        return self._add_special_tokens(ids) if add_special_tokens else ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if token_id not in self._special_ids:
                run.append(token_id)
                continue
            parts.append(self.sp.decode(run))
            run = []
            if not skip_special_tokens:
                parts.append(self.sp.id_to_piece(token_id))
        parts.append(self.sp.decode(run))
        return "".join(parts)

    def batch_decode(
        self, sequences: Sequence[Sequence[int]] | torch.Tensor, skip_special_tokens: bool = False
    ) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in sequences]

    def __call__(
        self,
        text: str | Sequence[str],
        padding: bool | str = "longest",
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
        add_special_tokens: bool = True,
        padding_side: str | None = None,
    ) -> BatchEncoding:
        """Tokenize one text or a batch into ``input_ids`` and ``attention_mask``.

        ``padding``: ``"longest"``/True, ``"max_length"`` (needs ``max_length``) or
        ``"do_not_pad"``/False. ``padding_side`` overrides :attr:`padding_side` for this call.
        A single string with ``return_tensors=None`` gives flat lists, otherwise rows are batched
        (``[batch, length]`` tensors for ``"pt"``).
        """
        strategy = {True: "longest", False: "do_not_pad"}.get(padding, padding)
        if strategy not in PADDING_STRATEGIES:
            raise ValueError(f"padding must be one of {PADDING_STRATEGIES} or a bool, got {padding!r}")
        if (truncation or strategy == "max_length") and max_length is None:
            raise ValueError("truncation and padding='max_length' need max_length")
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")

        texts = [text] if isinstance(text, str) else list(text)
        rows = [self._encode_text(t) for t in texts]
        if truncation:
            budget = max(max_length - (self._num_added_tokens() if add_special_tokens else 0), 0)
            rows = [row[:budget] for row in rows]
        if add_special_tokens:
            rows = [self._add_special_tokens(row) for row in rows]

        masks = [[1] * len(row) for row in rows]
        if strategy != "do_not_pad":
            target = max_length if strategy == "max_length" else max(map(len, rows), default=0)
            padded = [self._pad(row, mask, target, side) for row, mask in zip(rows, masks)]
            rows, masks = [row for row, _ in padded], [mask for _, mask in padded]

        if isinstance(text, str) and return_tensors is None:
            return BatchEncoding({"input_ids": rows[0], "attention_mask": masks[0]})
        return BatchEncoding({"input_ids": rows, "attention_mask": masks}, tensor_type=return_tensors)

    def _pad(self, row: list[int], mask: list[int], length: int, side: str) -> tuple[list[int], list[int]]:
        extra = max(length - len(row), 0)
        pad_ids, pad_mask = [self.pad_token_id] * extra, [0] * extra
        if side == "left":
            return pad_ids + row, pad_mask + mask
        return row + pad_ids, mask + pad_mask

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
    ) -> str | list[int]:
        """Render InternLM2's chat format (:data:`CHAT_TEMPLATE`).

        ``<s>``, then ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then
        ``<|im_start|>assistant\\n`` when ``add_generation_prompt``. The string starts with the
        literal bos token, so encode it with ``add_special_tokens=False``; ``tokenize=True``
        does exactly that and returns the ids.
        """
        turns = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
        text = self.bos_token + turns + (f"{IM_START}assistant\n" if add_generation_prompt else "")
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def save_pretrained(self, save_directory: str | Path) -> tuple[Path, Path]:
        """Write ``tokenizer.model`` and a ``tokenizer_config.json`` for transformers' ``LlamaTokenizer``.

        ``legacy: true`` keeps ``LlamaTokenizer`` on raw ``sp.encode`` (and off protobuf), and
        the special tokens are declared as added tokens so it splits them out like this class.
        There is no ``auto_map``: no remote code is needed to load the result.
        """
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        model_file = directory / TOKENIZER_FILE
        if model_file.resolve() != self.model_file.resolve():
            shutil.copyfile(self.model_file, model_file)
        added_tokens = {
            str(token_id): {
                "content": token,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for token, token_id in sorted(self.special_token_ids.items(), key=lambda item: item[1])
        }
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "legacy": True,
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
            "additional_special_tokens": list(SPECIAL_TOKENS),
            "added_tokens_decoder": added_tokens,
            "clean_up_tokenization_spaces": False,
            "spaces_between_special_tokens": False,
            "padding_side": self.padding_side,
            "chat_template": CHAT_TEMPLATE,
        }
        config_file = directory / TOKENIZER_CONFIG_FILE
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return model_file, config_file


def load_internlm2_tokenizer(path: str | Path) -> InternLM2Tokenizer:
    """Load a local checkpoint directory's tokenizer (see :meth:`InternLM2Tokenizer.from_pretrained`)."""
    return InternLM2Tokenizer.from_pretrained(path)
