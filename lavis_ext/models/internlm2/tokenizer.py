"""InternLM2's tokenizer over a local checkpoint directory, with the rules of the hub's class.

The hub class (``tokenization_internlm2.InternLM2Tokenizer``) is remote code, and transformers'
own ``LlamaTokenizer`` does not reproduce it (the non-legacy prefix handling and the slow-to-fast
conversion change the ids, and the latter needs protobuf). This wrapper needs only
``sentencepiece`` and reads the checkpoint as released:

- ``tokenizer.model``: SentencePiece BPE with byte fallback; ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2.
  Its last six pieces are placeholders named ``[UNUSED_TOKEN_141]`` ... ``[UNUSED_TOKEN_146]``.
- ``tokenizer_config.json``: the texts of the special tokens. ``added_tokens_decoder`` maps those
  six ids to ``<|plugin|>``, ``<|interpreter|>``, ``<|action_end|>``, ``<|action_start|>``,
  ``<|im_end|>`` and ``<|im_start|>``; ``additional_special_tokens``, ``bos_token`` ...
  ``pad_token`` name the special tokens; ``add_bos_token``/``add_eos_token`` are the flags.
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
from transformers import BatchEncoding, PreTrainedTokenizerBase

from lavis_ext.errors import LavisExtError

TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# The hub's chat template (tokenizer_config.json of internlm2-chat-*).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# tokenizer_config.json keys naming one special token each (the hub class's defaults).
NAMED_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
PADDING_STRATEGIES = ("longest", "max_length", "do_not_pad")


class TokenizerFileError(LavisExtError, ValueError):
    """A tokenizer file that is missing, malformed or inconsistent; the message names the file."""


def _token_text(value: Any, file: Path, key: str) -> str:
    """A token as ``tokenizer_config.json`` writes it: a string, or an AddedToken dict with ``content``."""
    if isinstance(value, Mapping):
        value = value.get("content")
    if not isinstance(value, str) or not value:
        raise TokenizerFileError(f"{file}: {key} must be a token string or {{'content': ...}}, got {value!r}")
    return value


def read_tokenizer_config(path: Path) -> dict[str, Any]:
    """``tokenizer_config.json`` of a checkpoint directory, as a dict; errors name the file."""
    file = path / TOKENIZER_CONFIG_FILE
    if not file.is_file():
        raise TokenizerFileError(f"{file} does not exist (an InternLM2 checkpoint directory has it beside "
                                 f"{TOKENIZER_FILE}; it holds the special tokens)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TokenizerFileError(f"{file}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise TokenizerFileError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config


class InternLM2Tokenizer:
    """InternLM2's tokenizer with a small HF-like surface; build it with :meth:`from_pretrained`.

    Encoding follows the hub class: the added tokens (``<s>``, ``</s>``, ``<unk>``, the chat and
    tool tokens) are split out of the text and map to their single ids; every other chunk goes
    through raw ``sp.encode`` (so each chunk gets SentencePiece's dummy prefix, as in the hub).
    ``bos`` is prepended when ``add_bos_token`` and ``eos`` appended when ``add_eos_token``.

    Decoding follows the hub's ``convert_tokens_to_string``:

    * ``skip_special_tokens=True`` drops the special ids and decodes what is left as one run, so
      ``"a<|im_end|>b"`` gives ``"a b"``;
    * ``skip_special_tokens=False`` writes each special token's text; a space goes before each run
      of text that precedes a special token, and before a leading special token
      (``"<s>Hi"`` gives ``" <s>Hi"``), as the hub class does;
    * then transformers' ``clean_up_tokenization`` always runs (``"a ."`` -> ``"a."``,
      ``"it 's"`` -> ``"it's"``), whatever ``clean_up_tokenization_spaces`` says.

    Truncation keeps the left part of the text and leaves room for bos/eos, like HF's
    default ``truncation_side="right"``.
    """

    def __init__(
        self,
        model_file: str | Path,
        added_tokens: Mapping[str, int],
        special_tokens: Mapping[str, str],
        additional_special_tokens: Sequence[str],
        *,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        padding_side: str = "right",
        source: str | Path | None = None,
    ) -> None:
        """``added_tokens``: text -> id of the tokens split out of the text (each must be a piece
        id of the SentencePiece model); ``special_tokens``: ``bos_token``/``eos_token``/
        ``unk_token``/``pad_token`` -> text; ``additional_special_tokens``: the other special
        texts (chat and tool tokens). ``source`` names the file in errors."""
        self.model_file = Path(model_file)
        source = source or self.model_file
        if not self.model_file.is_file():
            raise TokenizerFileError(f"{self.model_file} does not exist")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        except (RuntimeError, OSError) as error:
            raise TokenizerFileError(f"{self.model_file}: not a SentencePiece model ({error})") from None
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.padding_side = padding_side

        outside = {text: i for text, i in added_tokens.items() if not 0 <= i < self.sp.get_piece_size()}
        if outside:
            raise TokenizerFileError(f"{source}: added tokens {outside} lie outside the "
                                     f"{self.sp.get_piece_size()} pieces of {self.model_file}")
        self.added_tokens: dict[str, int] = dict(added_tokens)

        def resolve(text: str) -> int:
            if text in self.added_tokens:
                return self.added_tokens[text]
            piece_id = self.sp.piece_to_id(text)
            if self.sp.id_to_piece(piece_id) != text:  # piece_to_id answers the unk id for a non-piece
                raise TokenizerFileError(f"{source}: special token {text!r} is neither in added_tokens_decoder "
                                         f"nor a piece of {self.model_file}")
            self.added_tokens[text] = piece_id  # a literal piece is split out of text like an added token
            return piece_id

        self.bos_token, self.eos_token = special_tokens["bos_token"], special_tokens["eos_token"]
        self.unk_token, self.pad_token = special_tokens["unk_token"], special_tokens["pad_token"]
        self.bos_token_id, self.eos_token_id = resolve(self.bos_token), resolve(self.eos_token)
        self.unk_token_id, self.pad_token_id = resolve(self.unk_token), resolve(self.pad_token)
        self.additional_special_tokens = list(additional_special_tokens)
        specials = [*special_tokens.values(), *self.additional_special_tokens]
        self.special_token_ids: dict[str, int] = {text: resolve(text) for text in specials}
        self._special_ids = frozenset(self.special_token_ids.values())
        self._added_texts = {i: text for text, i in self.added_tokens.items()}
        # Longest first, so no added token is cut short by one that is its prefix.
        alternatives = "|".join(re.escape(t) for t in sorted(self.added_tokens, key=len, reverse=True))
        self._added_pattern = re.compile(f"({alternatives})")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> InternLM2Tokenizer:
        """Load ``tokenizer.model`` and ``tokenizer_config.json`` from a checkpoint directory.

        Read from the config: ``added_tokens_decoder``, ``additional_special_tokens``,
        ``bos_token``/``eos_token``/``unk_token``/``pad_token`` (hub class defaults ``<s>``,
        ``</s>``, ``<unk>``, ``</s>``), ``add_bos_token`` (default True), ``add_eos_token``
        (default False) and ``padding_side`` (default ``"right"``).
        """
        path = Path(path)
        config = read_tokenizer_config(path)
        file = path / TOKENIZER_CONFIG_FILE
        decoder = config.get("added_tokens_decoder", {})
        if not isinstance(decoder, Mapping):
            raise TokenizerFileError(f"{file}: added_tokens_decoder must map ids to tokens")
        added: dict[str, int] = {}
        for key, entry in decoder.items():
            if not str(key).isdigit():
                raise TokenizerFileError(f"{file}: added_tokens_decoder key {key!r} is not a token id")
            added[_token_text(entry, file, f"added_tokens_decoder[{key!r}]")] = int(key)
        special = {key: _token_text(config.get(key, default), file, key) for key, default in NAMED_SPECIAL_TOKENS.items()}
        additional = config.get("additional_special_tokens", [])
        if not isinstance(additional, list):
            raise TokenizerFileError(f"{file}: additional_special_tokens must be a list")
        additional = [_token_text(t, file, "additional_special_tokens") for t in additional]
        return cls(
            path / TOKENIZER_FILE, added, special, additional,
            add_bos_token=bool(config.get("add_bos_token", True)),
            add_eos_token=bool(config.get("add_eos_token", False)),
            padding_side=config.get("padding_side", "right"),
            source=file,
        )

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def stop_token_ids(self) -> list[int]:
        """eos, and ``<|im_end|>`` where the checkpoint has it (the chat models' ``generation_config``)."""
        return [self.eos_token_id] + ([self.added_tokens[IM_END]] if IM_END in self.added_tokens else [])

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.added_tokens.get(tokens, self.sp.piece_to_id(tokens))
        return [self.convert_tokens_to_ids(token) for token in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self._added_texts.get(ids, self.sp.id_to_piece(ids))
        return [self.convert_ids_to_tokens(i) for i in ids]

    def _encode_text(self, text: str) -> list[int]:
        """Ids of ``text`` without bos/eos: added tokens split out, raw ``sp.encode`` between."""
        ids: list[int] = []
        for chunk in self._added_pattern.split(text):
            if chunk in self.added_tokens:
                ids.append(self.added_tokens[chunk])
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
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        text, run, previous_is_special = "", [], False
        for token_id in ids:
            if token_id in self._special_ids:
                text += ("" if previous_is_special else " ") + self.sp.decode(run) + self._added_texts[token_id]
                run, previous_is_special = [], True
            else:
                run.append(token_id)
                previous_is_special = False
        return PreTrainedTokenizerBase.clean_up_tokenization(text + self.sp.decode(run))

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
        the added tokens are declared in ``added_tokens_decoder`` so it splits them out like this
        class and decodes their ids as their texts, not as the ``[UNUSED_TOKEN_*]`` pieces.
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
                "special": token_id in self._special_ids,
            }
            for token, token_id in sorted(self.added_tokens.items(), key=lambda item: item[1])
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
            "additional_special_tokens": self.additional_special_tokens,
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
