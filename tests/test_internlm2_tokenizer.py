"""InternLM2Tokenizer on a SentencePiece model trained on the fly."""
from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
import sentencepiece as spm
import torch

from lavis_ext.models.internlm2 import InternLM2Tokenizer, load_internlm2_tokenizer
from lavis_ext.models.internlm2.tokenizer import SPECIAL_TOKENS
from lavis_ext.tiny.internlm2 import make_tiny_internlm2

MIXED_TEXTS = [
    "Hello 世界, a red circle. 你好！",
    "一只猫 sitting on the sofa，旁边有 two dogs。",
    " leading space and  double  spaces ",
    "line one\nline two\n\n第三行",
    "unseen: Zürich ½ 🙂 ∑",
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_internlm2(tmp_path_factory.mktemp("internlm2"), chat=True)


@pytest.fixture(scope="module")
def sp(ckpt: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))


@pytest.fixture()
def tokenizer(ckpt: Path) -> InternLM2Tokenizer:
    return load_internlm2_tokenizer(ckpt)


def test_ids_and_sizes(tokenizer: InternLM2Tokenizer, sp: spm.SentencePieceProcessor, ckpt: Path) -> None:
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    assert len(tokenizer) == tokenizer.vocab_size == sp.get_piece_size()
    assert json.loads((ckpt / "config.json").read_text())["vocab_size"] == len(tokenizer)
    assert tokenizer.stop_token_ids == [2, sp.piece_to_id("<|im_end|>")]
    assert tokenizer.padding_side == "right"


@pytest.mark.parametrize("token", [*SPECIAL_TOKENS, "<s>", "</s>"])
def test_special_tokens_encode_to_their_single_id(
    tokenizer: InternLM2Tokenizer, sp: spm.SentencePieceProcessor, token: str
) -> None:
    token_id = sp.piece_to_id(token)
    assert token_id != sp.unk_id()
    assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
    assert tokenizer.convert_tokens_to_ids(token) == token_id
    assert tokenizer.convert_ids_to_tokens(token_id) == token
    # Raw SentencePiece would not: a dummy-prefix piece first, and <s>/</s> spelled out.
    assert sp.encode(token) != [token_id]


def test_encode_is_raw_sentencepiece_around_special_tokens(
    tokenizer: InternLM2Tokenizer, sp: spm.SentencePieceProcessor
) -> None:
    text = MIXED_TEXTS[0]
    assert tokenizer.encode(text) == [sp.bos_id(), *sp.encode(text)]
    assert tokenizer.encode(text, add_special_tokens=False) == sp.encode(text)
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert tokenizer.encode("<|im_start|>user\n你好<|im_end|>\n", add_special_tokens=False) == [
        im_start,
        *sp.encode("user\n你好"),
        im_end,
        *sp.encode("\n"),
    ]


def test_bos_first_and_eos_only_when_configured(ckpt: Path, tmp_path: Path) -> None:
    default = load_internlm2_tokenizer(ckpt)
    ids = default.encode("a red circle")
    assert ids[0] == default.bos_token_id and default.eos_token_id not in ids
    assert default.bos_token_id not in default.encode("a red circle", add_special_tokens=False)

    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config |= {"add_bos_token": False, "add_eos_token": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.model").write_bytes((ckpt / "tokenizer.model").read_bytes())
    flipped = load_internlm2_tokenizer(tmp_path)
    assert flipped.encode("a red circle") == ids[1:] + [flipped.eos_token_id]


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_decode_round_trips(tokenizer: InternLM2Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(ids) == "<s>" + text
    assert tokenizer.decode(torch.tensor(ids), skip_special_tokens=True) == text


def test_decode_keeps_text_around_special_tokens_exact(tokenizer: InternLM2Tokenizer) -> None:
    chat = "<s><|im_start|>user\n Hello 世界<|im_end|>\n<|im_start|>assistant\n红色 circle<|im_end|></s>"
    ids = tokenizer.encode(chat, add_special_tokens=False)
    assert tokenizer.decode(ids) == chat
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\n Hello 世界\nassistant\n红色 circle"
    first_turn = ids[: ids.index(tokenizer.convert_tokens_to_ids("<|im_end|>")) + 1]
    assert tokenizer.batch_decode([ids, first_turn], skip_special_tokens=True) == [
        "user\n Hello 世界\nassistant\n红色 circle",
        "user\n Hello 世界",
    ]


def test_chat_template(tokenizer: InternLM2Tokenizer, ckpt: Path) -> None:
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "这是什么? What is it?"},
    ]
    expected = (
        "<s><|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\n这是什么? What is it?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True) == expected
    assert tokenizer.apply_chat_template(messages) == expected.removesuffix("<|im_start|>assistant\n")

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert ids == tokenizer.encode(expected, add_special_tokens=False)
    assert ids[:2] == [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<|im_start|>")]
    assert ids.count(tokenizer.bos_token_id) == 1

    # The hub's jinja template (as written to tokenizer_config.json) renders the same string.
    template = json.loads((ckpt / "tokenizer_config.json").read_text())["chat_template"]
    rendered = jinja2.Template(template).render(
        messages=messages, bos_token="<s>", add_generation_prompt=True
    )
    assert rendered == expected


def test_padding_right_and_left(tokenizer: InternLM2Tokenizer) -> None:
    texts = ["a red circle on a blue square", "你好"]
    short = tokenizer.encode(texts[1])
    long = tokenizer.encode(texts[0])
    assert len(long) > len(short)
    n_pad = len(long) - len(short)

    right = tokenizer(texts)
    assert right.input_ids.shape == right.attention_mask.shape == (2, len(long))
    assert right.input_ids[1].tolist() == short + [tokenizer.pad_token_id] * n_pad
    assert right.attention_mask[1].tolist() == [1] * len(short) + [0] * n_pad
    assert right.attention_mask[0].tolist() == [1] * len(long)

    left = tokenizer(texts, padding_side="left")
    assert left.input_ids[1].tolist() == [tokenizer.pad_token_id] * n_pad + short
    assert left.attention_mask[1].tolist() == [0] * n_pad + [1] * len(short)
    assert torch.equal(left.input_ids[0], right.input_ids[0])

    tokenizer.padding_side = "left"
    assert torch.equal(tokenizer(texts).input_ids, left.input_ids)


def test_call_options(tokenizer: InternLM2Tokenizer) -> None:
    text = "a red circle on a blue square"
    ids = tokenizer.encode(text)

    single = tokenizer(text, return_tensors=None)
    assert single["input_ids"] == ids and single["attention_mask"] == [1] * len(ids)
    assert tokenizer(text).input_ids.tolist() == [ids]

    unpadded = tokenizer([text, "你好"], padding=False, return_tensors=None)
    assert unpadded["input_ids"] == [ids, tokenizer.encode("你好")]

    truncated = tokenizer([text], truncation=True, max_length=4)
    assert truncated.input_ids.tolist() == [ids[:4]] and truncated.input_ids[0, 0] == tokenizer.bos_token_id

    padded = tokenizer(["你好"], padding="max_length", max_length=8)
    assert padded.input_ids.shape == (1, 8)
    assert padded.attention_mask.sum().item() == len(tokenizer.encode("你好"))

    no_special = tokenizer([text], add_special_tokens=False)
    assert no_special.input_ids.tolist() == [ids[1:]]

    with pytest.raises(ValueError, match="max_length"):
        tokenizer([text], truncation=True)


def test_save_pretrained_round_trips(tokenizer: InternLM2Tokenizer, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and "auto_map" not in config
    assert config["legacy"] is True and config["add_bos_token"] is True and config["add_eos_token"] is False
    reloaded = InternLM2Tokenizer.from_pretrained(tmp_path)
    for text in MIXED_TEXTS:
        assert reloaded.encode(text) == tokenizer.encode(text)
    assert reloaded.stop_token_ids == tokenizer.stop_token_ids


def test_missing_special_token_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "plain.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a red circle", "a blue square"] * 4),
        model_prefix=str(model.with_suffix("")),
        model_type="bpe",
        vocab_size=20,
        minloglevel=2,
    )
    with pytest.raises(ValueError, match=r"<\|im_start\|>"):
        InternLM2Tokenizer(model)
