"""InternLM2Tokenizer on tiny checkpoints in the hub's layout (``lavis_ext.tiny.internlm2``).

The chat and tool tokens live in ``tokenizer_config.json`` (``added_tokens_decoder``) on the
last six ids, whose SentencePiece pieces are ``[UNUSED_TOKEN_141]`` ... ``[UNUSED_TOKEN_146]``.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import jinja2
import pytest
import sentencepiece as spm
import torch

from lavis_ext.models.internlm2 import InternLM2Tokenizer, load_internlm2_tokenizer
from lavis_ext.models.internlm2.tokenizer import TokenizerFileError
from lavis_ext.tiny.internlm2 import HUB_ADDED_TOKENS, make_tiny_internlm2

# internlm/internlm2-chat-1_8b tokenizer_config.json "chat_template", as the hub writes it.
HUB_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Pieces of `encode(text, add_special_tokens=False)` on the fixture's tokenizer (trained on
# DEFAULT_TEXTS), checked by hand: raw SentencePiece on each chunk (a dummy-prefix `▁` at each
# chunk's start, byte fallback for unseen characters), added tokens as one piece each.
ENCODINGS = [
    ("Hello world", ["▁", "H", "e", "l", "lo", "▁w", "o", "r", "l", "d"]),
    ("a red circle on a blue square.", ["▁a", "▁", "re", "d", "▁c", "i", "r", "c", "le", "▁", "on", "▁a", "▁b",
                                        "l", "u", "e", "▁s", "qu", "a", "re", "."]),
    ("The quick brown fox", ["▁T", "he", "▁", "qu", "i", "c", "k", "▁b", "r", "o", "w", "n", "▁", "f", "o", "x"]),
    ("你好", ["▁", "你", "好"]),
    ("你好，世界！", ["▁", "你", "好", "，", "世", "界", "！"]),
    ("一只猫", ["▁", "一只", "猫"]),
    ("Hello 世界", ["▁", "H", "e", "l", "lo", "▁", "世", "界"]),
    ("红色 circle", ["▁", "红色", "▁c", "i", "r", "c", "le"]),
    (" leading space", ["▁", "▁", "le", "a", "d", "in", "g", "▁s", "p", "a", "c", "e"]),
    ("trailing space ", ["▁t", "r", "a", "i", "l", "in", "g", "▁s", "p", "a", "c", "e", "▁"]),
    ("double  space", ["▁d", "o", "u", "b", "le", "▁", "▁s", "p", "a", "c", "e"]),
    ("   three leading", ["▁", "▁", "▁", "▁t", "h", "re", "e", "▁", "le", "a", "d", "in", "g"]),
    ("line one\nline two", ["▁", "l", "in", "e", "▁", "on", "e", "<0x0A>", "l", "in", "e", "▁t", "w", "o"]),
    ("\n", ["▁", "<0x0A>"]),
    ("a\n\nb", ["▁a", "<0x0A>", "<0x0A>", "b"]),
    ("tab\there", ["▁t", "a", "b", "<0x09>", "he", "re"]),
    ("\tleading tab", ["▁", "<0x09>", "le", "a", "d", "in", "g", "▁t", "a", "b"]),
    ("emoji 🙂", ["▁", "e", "m", "o", "j", "i", "▁", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]),
    ("🙂🙂", ["▁", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]),
    ("digits 2024 and 3.14", ["▁d", "i", "g", "i", "t", "s", "▁", "<0x32>", "<0x30>", "<0x32>", "<0x34>", "▁a",
                              "n", "d", "▁", "<0x33>", ".", "<0x31>", "<0x34>"]),
    ("0", ["▁", "<0x30>"]),
    ("Zürich", ["▁", "<0x5A>", "<0xC3>", "<0xBC>", "r", "i", "c", "h"]),
    ("<|im_start|>", ["<|im_start|>"]),
    ("<|im_end|>", ["<|im_end|>"]),
    ("<|im_start|>user\n你好<|im_end|>\n", ["<|im_start|>", "▁", "u", "s", "er", "<0x0A>", "你", "好", "<|im_end|>",
                                           "▁", "<0x0A>"]),
    ("<s>hi</s>", ["<s>", "▁", "h", "i", "</s>"]),
    ("a<|im_end|>b", ["▁a", "<|im_end|>", "▁b"]),
    ("<|im_end|><|im_start|>", ["<|im_end|>", "<|im_start|>"]),
    ("x <|plugin|> y", ["▁", "x", "▁", "<|plugin|>", "▁", "▁", "y"]),
    ("<|action_start|><|interpreter|>\ncode<|action_end|>", ["<|action_start|>", "<|interpreter|>", "▁", "<0x0A>",
                                                             "c", "o", "d", "e", "<|action_end|>"]),
    ("<|im_end", ["▁", "<0x3C>", "<0x7C>", "i", "m", "<0x5F>", "e", "n", "d"]),
    ("", []),
    (" ", ["▁", "▁"]),
]
# `decode(..., skip_special_tokens=True)` of the encoded text: the hub's one-run decode (rule b)
# and transformers' clean_up_tokenization (rule a), next to `skip_special_tokens=False`.
DECODINGS = [
    ("a red circle .", "a red circle.", "a red circle."),
    ("is n't it ?", "isn't it?", "isn't it?"),
    ("it 's red !", "it's red!", "it's red!"),
    ("a , b", "a, b", "a, b"),
    ("你好 。", "你好 。", "你好 。"),  # full-width punctuation is not cleaned
    ("a<|im_end|>b", "a b", " a<|im_end|>b"),
    ("<|im_start|>user\n你好<|im_end|>\n", "user\n你好 \n", " <|im_start|> user\n你好<|im_end|>\n"),
    ("<s>hi</s>", "hi", " <s> hi</s>"),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_internlm2(tmp_path_factory.mktemp("internlm2-chat"), chat=True, num_layers=0)


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_internlm2(tmp_path_factory.mktemp("internlm2-base"), num_layers=0)


@pytest.fixture(scope="module")
def sp(ckpt: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))


@pytest.fixture()
def tokenizer(ckpt: Path) -> InternLM2Tokenizer:
    return load_internlm2_tokenizer(ckpt)


def _copy_tokenizer(src: Path, dst: Path, **config_changes) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "tokenizer.model", dst / "tokenizer.model")
    config = json.loads((src / "tokenizer_config.json").read_text()) | config_changes
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


# ---------------------------------------------------------------- the hub layout
@pytest.mark.parametrize("variant", ["base", "chat"])
def test_hub_layout_loads_with_chat_tokens_on_the_last_ids(variant: str, ckpt: Path, base_ckpt: Path) -> None:
    path = ckpt if variant == "chat" else base_ckpt
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    vocab = sp.get_piece_size()
    # The fixture is the hub's layout: placeholders in SentencePiece, the texts only in the config.
    assert [sp.id_to_piece(i) for i in range(vocab - 6, vocab)] == [f"[UNUSED_TOKEN_{n}]" for n in range(141, 147)]
    assert sp.piece_to_id("<|im_end|>") == sp.unk_id()
    config = json.loads((path / "tokenizer_config.json").read_text())
    assert config["added_tokens_decoder"][str(vocab - 2)]["content"] == "<|im_end|>"
    assert ("chat_template" in config) == (variant == "chat")

    tokenizer = load_internlm2_tokenizer(path)
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2, 2)
    assert len(tokenizer) == vocab == json.loads((path / "config.json").read_text())["vocab_size"]
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [vocab - 1, vocab - 2]
    for offset, (text, placeholder) in enumerate(HUB_ADDED_TOKENS):
        token_id = vocab - 6 + offset
        assert tokenizer.encode(text, add_special_tokens=False) == [token_id]
        assert tokenizer.convert_ids_to_tokens(token_id) == text
        assert tokenizer.decode([token_id]) == " " + text  # the hub's space before a leading special token
        assert "[UNUSED_TOKEN" not in tokenizer.decode([5, token_id, 6])
        assert tokenizer.decode([5, token_id, 6], skip_special_tokens=True) == tokenizer.decode([5, 6])
    assert tokenizer.stop_token_ids == [2, vocab - 2]
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ([2, vocab - 2] if variant == "chat" else 2)


def test_pieces_named_as_the_tokens_still_load(tmp_path: Path, ckpt: Path) -> None:
    """Older conversions put the chat tokens into the SentencePiece model as pieces."""
    model = io.BytesIO()
    texts = ["a red circle", "a blue square", "你好"] * 4
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, model_type="bpe",
                                   vocab_size=300, byte_fallback=True, hard_vocab_limit=False, minloglevel=2,
                                   user_defined_symbols=["<|im_end|>", "<|im_start|>"])
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items() if int(k) < 3}
    config["additional_special_tokens"] = ["<|im_start|>", "<|im_end|>"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_internlm2_tokenizer(tmp_path)
    assert tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"]) == [3, 4]
    assert tokenizer.encode("a<|im_end|>", add_special_tokens=False)[-1] == 3
    assert tokenizer.stop_token_ids == [2, 3]


# ---------------------------------------------------------------- encoding
@pytest.mark.parametrize(("text", "pieces"), ENCODINGS, ids=[repr(t)[:30] for t, _ in ENCODINGS])
def test_encoding_table(tokenizer: InternLM2Tokenizer, sp: spm.SentencePieceProcessor, text: str,
                        pieces: list[str]) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids) == pieces
    vocab = sp.get_piece_size()
    added = {text: vocab - 6 + offset for offset, (text, _) in enumerate(HUB_ADDED_TOKENS)}
    assert ids == [added[p] if p in added else sp.piece_to_id(p) for p in pieces]
    assert tokenizer.encode(text) == [1, *ids]


def test_bos_first_and_eos_only_when_configured(ckpt: Path, tmp_path: Path) -> None:
    default = load_internlm2_tokenizer(ckpt)
    ids = default.encode("a red circle")
    assert ids[0] == default.bos_token_id and default.eos_token_id not in ids
    flipped = load_internlm2_tokenizer(_copy_tokenizer(ckpt, tmp_path, add_bos_token=False, add_eos_token=True))
    assert flipped.encode("a red circle") == ids[1:] + [flipped.eos_token_id]


# ---------------------------------------------------------------- decoding
@pytest.mark.parametrize(("text", "skipped", "kept"), DECODINGS)
def test_decoding_follows_the_hub_class(tokenizer: InternLM2Tokenizer, text: str, skipped: str, kept: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == skipped
    assert tokenizer.decode(torch.tensor(ids), skip_special_tokens=True) == skipped
    assert tokenizer.decode(ids) == kept


def test_generated_answer_cut_at_its_stop_token(tokenizer: InternLM2Tokenizer) -> None:
    answer = tokenizer.encode("two red circles .", add_special_tokens=False)
    generated = [answer + [tokenizer.convert_tokens_to_ids("<|im_end|>")], answer + [2, 2]]
    assert tokenizer.batch_decode(generated, skip_special_tokens=True) == ["two red circles."] * 2


# ---------------------------------------------------------------- chat template
def test_chat_template_is_the_hubs(tokenizer: InternLM2Tokenizer, ckpt: Path, sp: spm.SentencePieceProcessor) -> None:
    assert json.loads((ckpt / "tokenizer_config.json").read_text())["chat_template"] == HUB_CHAT_TEMPLATE
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "a red circle"}]
    for generation_prompt in (False, True):
        hub = jinja2.Template(HUB_CHAT_TEMPLATE).render(messages=messages, bos_token="<s>",
                                                        add_generation_prompt=generation_prompt)
        assert tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt) == hub

    im_start, im_end, newline = sp.get_piece_size() - 1, sp.get_piece_size() - 2, 13
    user = [287, 300, 295, 273, newline, 343, 348]  # ▁ u s er \n 你 好
    assistant = [259, 295, 295, 293, 295, 291, 289, 296, 291, newline]  # ▁a s s i s t a n t \n
    content = [289, 287, 265, 303, 261, 293, 292, 297, 277]  # a ▁ re d ▁c i r c le
    expected = [1, im_start, *user, im_end, 287, newline, im_start, *assistant, *content, im_end, 287, newline]
    assert tokenizer.apply_chat_template(messages, tokenize=True) == expected


# ---------------------------------------------------------------- batching
def test_padding_right_and_left(tokenizer: InternLM2Tokenizer) -> None:
    texts = ["a red circle on a blue square", "你好"]
    short, long = tokenizer.encode(texts[1]), tokenizer.encode(texts[0])
    n_pad = len(long) - len(short)
    assert n_pad > 0

    right = tokenizer(texts)
    assert right.input_ids.shape == right.attention_mask.shape == (2, len(long))
    assert right.input_ids[1].tolist() == short + [tokenizer.pad_token_id] * n_pad
    assert right.attention_mask[1].tolist() == [1] * len(short) + [0] * n_pad

    left = tokenizer(texts, padding_side="left")
    assert left.input_ids[1].tolist() == [tokenizer.pad_token_id] * n_pad + short
    assert left.attention_mask[1].tolist() == [0] * n_pad + [1] * len(short)
    tokenizer.padding_side = "left"
    assert torch.equal(tokenizer(texts).input_ids, left.input_ids)


def test_call_options(tokenizer: InternLM2Tokenizer) -> None:
    text = "a red circle on a blue square"
    ids = tokenizer.encode(text)
    single = tokenizer(text, return_tensors=None)
    assert single["input_ids"] == ids and single["attention_mask"] == [1] * len(ids)
    assert tokenizer([text, "你好"], padding=False, return_tensors=None)["input_ids"] == [ids, tokenizer.encode("你好")]
    truncated = tokenizer([text], truncation=True, max_length=4)
    assert truncated.input_ids.tolist() == [ids[:4]]
    padded = tokenizer(["你好"], padding="max_length", max_length=8)
    assert padded.input_ids.shape == (1, 8) and padded.attention_mask.sum().item() == len(tokenizer.encode("你好"))
    assert tokenizer([text], add_special_tokens=False).input_ids.tolist() == [ids[1:]]
    with pytest.raises(ValueError, match="max_length"):
        tokenizer([text], truncation=True)


def test_save_pretrained_round_trips(tokenizer: InternLM2Tokenizer, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer" and "auto_map" not in config
    assert config["added_tokens_decoder"][str(len(tokenizer) - 2)]["content"] == "<|im_end|>"
    reloaded = InternLM2Tokenizer.from_pretrained(tmp_path)
    for text, _ in ENCODINGS:
        assert reloaded.encode(text) == tokenizer.encode(text)
    assert reloaded.stop_token_ids == tokenizer.stop_token_ids


# ---------------------------------------------------------------- bad files
def test_special_token_nowhere_is_refused(ckpt: Path, tmp_path: Path) -> None:
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    decoder = {k: v for k, v in config["added_tokens_decoder"].items() if v["content"] != "<|im_start|>"}
    path = _copy_tokenizer(ckpt, tmp_path, added_tokens_decoder=decoder)
    with pytest.raises(TokenizerFileError, match=r"tokenizer_config\.json: special token '<\|im_start\|>' is neither"):
        load_internlm2_tokenizer(path)


def test_missing_or_malformed_files_name_the_file(ckpt: Path, tmp_path: Path) -> None:
    no_model = _copy_tokenizer(ckpt, tmp_path / "no_model")
    (no_model / "tokenizer.model").unlink()
    with pytest.raises(TokenizerFileError, match=r"no_model/tokenizer\.model does not exist"):
        load_internlm2_tokenizer(no_model)

    no_config = _copy_tokenizer(ckpt, tmp_path / "no_config")
    (no_config / "tokenizer_config.json").unlink()
    with pytest.raises(TokenizerFileError, match=r"no_config/tokenizer_config\.json does not exist"):
        load_internlm2_tokenizer(no_config)

    broken = _copy_tokenizer(ckpt, tmp_path / "broken")
    (broken / "tokenizer_config.json").write_text('{"bos_token": "<s>",')
    with pytest.raises(TokenizerFileError, match=r"broken/tokenizer_config\.json: not valid JSON"):
        load_internlm2_tokenizer(broken)

    wrong = _copy_tokenizer(ckpt, tmp_path / "wrong", added_tokens_decoder={"x": {"content": "<|im_end|>"}})
    with pytest.raises(TokenizerFileError, match=r"wrong/tokenizer_config\.json: added_tokens_decoder key 'x'"):
        load_internlm2_tokenizer(wrong)

    not_sp = _copy_tokenizer(ckpt, tmp_path / "not_sp")
    (not_sp / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerFileError, match=r"not_sp/tokenizer\.model: not a SentencePiece model"):
        load_internlm2_tokenizer(not_sp)
