"""Instruction-tuning data: the chat format's ids and labels, the image's place, the LLaVA/XTuner builder."""
from __future__ import annotations

import json
import re

import pytest
import torch
from lavis.common.registry import registry
from lavis.models import load_model
from lavis.processors.blip_processors import BlipImageEvalProcessor
from omegaconf import OmegaConf
from PIL import Image

from lavis_ext.constants import IGNORE_INDEX
from lavis_ext.datasets.base import DataError
from lavis_ext.datasets.conversation import (
    SKIP_NO_SUPERVISION,
    SKIP_TEXT_ONLY,
    ConversationDataset,
    InternLM2ChatProcessor,
)
from lavis_ext.models.blip2_models.chat_format import ChatFormat, LLMTokens
from lavis_ext.models.internlm2 import load_internlm2_tokenizer

N_QUERY = 4  # num_query_token of the tiny model type
TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "<image>\nWhat color is the car?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "Two cats?"},
    {"role": "assistant", "content": "a dog"},
]
# The tiny fixture's ids of TWO_TURNS, by segment (each segment is encoded on its own; SentencePiece
# gives each text chunk its dummy-prefix piece "▁" = 287; 13 is the byte piece of "\n").
IM_START, IM_END, NL = 389, 388, [287, 13]
SYSTEM = [1, IM_START, 267, 335, 295, 291, 288, 318, 13, 69, 288, 268, 292, 293, 288, 309, 299, IM_END] + NL
USER_1_BEFORE_IMAGE = [IM_START, 287, 300, 295, 273, 13]  # <|im_start|>user\n
USER_1_AFTER_IMAGE = NL + [90, 298, 289, 291, 261, 290, 278, 292, 266, 295, 263, 272, 292, 328, IM_END] + NL
ASSISTANT_PROMPT = [IM_START, 259, 295, 295, 293, 295, 291, 289, 296, 291, 13]  # <|im_start|>assistant\n
ANSWER_1 = [287, 265, 303, IM_END]  # "red" + <|im_end|>
USER_2 = [IM_START, 287, 300, 295, 273, 13, 316, 301, 290, 272, 291, 295, 328, IM_END] + NL
ANSWER_2 = [259, 284, 290, 304, IM_END]  # "a dog" + <|im_end|>
EXPECTED_IDS = (SYSTEM + USER_1_BEFORE_IMAGE + USER_1_AFTER_IMAGE + ASSISTANT_PROMPT + ANSWER_1 + NL
                + USER_2 + ASSISTANT_PROMPT + ANSWER_2 + NL)
EXPECTED_LABELS = ([IGNORE_INDEX] * len(SYSTEM + USER_1_BEFORE_IMAGE + USER_1_AFTER_IMAGE + ASSISTANT_PROMPT)
                   + ANSWER_1 + [IGNORE_INDEX] * len(NL + USER_2 + ASSISTANT_PROMPT) + ANSWER_2 + [IGNORE_INDEX] * 2)
IMAGE_POSITION = len(SYSTEM + USER_1_BEFORE_IMAGE)


@pytest.fixture(scope="module")
def tokenizer(tiny_llm):
    return load_internlm2_tokenizer(tiny_llm)


def test_two_turn_conversation_with_system_exact_ids_and_labels(tokenizer):
    tokens = ChatFormat(tokenizer, max_txt_len=512).encode(TWO_TURNS)
    assert tokens.input_ids == EXPECTED_IDS
    assert tokens.labels == EXPECTED_LABELS
    assert tokens.image_position == IMAGE_POSITION
    # the hand-written chat tokens are the tokenizer's, looked up by text
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [IM_START, IM_END]
    # the supervised text is exactly the two answers, each closed by <|im_end|>
    supervised = [i for i, label in zip(tokens.input_ids, tokens.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == tokenizer.decode(tokenizer.encode("red<|im_end|>a dog<|im_end|>",
                                                                              add_special_tokens=False))


def test_segments_render_the_hub_chat_template(tokenizer):
    """Put together, the segments are the hub's template text (apply_chat_template)."""
    rounds = ChatFormat._round_segments(TWO_TURNS)
    text = tokenizer.bos_token + "".join(segment for segments in rounds for segment, _ in segments)
    assert text == tokenizer.apply_chat_template(TWO_TURNS)


def test_truncation_is_by_turns(tokenizer):
    full = ChatFormat(tokenizer, max_txt_len=512).encode(TWO_TURNS)
    first_round = len(SYSTEM + USER_1_BEFORE_IMAGE + USER_1_AFTER_IMAGE + ASSISTANT_PROMPT + ANSWER_1 + NL)
    for max_txt_len in (first_round, len(full.input_ids) - 1):  # the second round does not fit
        cut = ChatFormat(tokenizer, max_txt_len).encode(TWO_TURNS)
        assert cut.input_ids == full.input_ids[:first_round] and cut.labels == full.labels[:first_round]
    assert ChatFormat(tokenizer, first_round - 1).encode(TWO_TURNS).num_supervised == 0


@pytest.fixture
def model(tiny_model_env):
    torch.manual_seed(0)
    return load_model("blip2_internlm", "tiny", is_eval=True)


def test_image_position_holds_exactly_the_query_embeddings(model):
    tokens = ChatFormat(model.llm_tokenizer, 512).encode(TWO_TURNS)
    query = model.encode_images(torch.randn(1, 3, 32, 32))
    assert query.shape[1] == N_QUERY
    embeds, mask, labels = model.splice_llm_inputs(query, [tokens])
    text = model.llm.get_input_embeddings()(torch.tensor(tokens.input_ids))
    at = IMAGE_POSITION
    assert embeds.shape[1] == len(EXPECTED_IDS) + N_QUERY and mask.all()
    assert torch.equal(embeds[0, :at], text[:at])
    assert torch.equal(embeds[0, at:at + N_QUERY], query[0])
    assert torch.equal(embeds[0, at + N_QUERY:], text[at:])
    assert labels[0].tolist() == EXPECTED_LABELS[:at] + [IGNORE_INDEX] * N_QUERY + EXPECTED_LABELS[at:]


def test_chat_vqa_prompt_is_the_training_prefix(model, monkeypatch):
    """A VQA question in the chat format with ``<image>`` in its prompt is laid out exactly as the
    first round of a training conversation, up to the answer."""
    monkeypatch.setattr(model.config, "use_chat_template", True)
    question = "What color is the car?"
    prompt = model.format_question(question, "<image>\n{}")
    query = model.encode_images(torch.randn(1, 3, 32, 32))
    embeds, _, _ = model.build_llm_inputs(query, [prompt], padding_side="left")
    train = ChatFormat(model.llm_tokenizer, 512).encode(
        [{"role": "user", "content": f"<image>\n{question}"}, {"role": "assistant", "content": "red"}])
    prefix = train.input_ids[:train.labels.index(ANSWER_1[0])]
    expected, _, _ = model.splice_llm_inputs(query, [LLMTokens(prefix, prefix, train.image_position)])
    assert torch.equal(embeds, expected)


# --------------------------------------------------------------------------- the builder and its checks


def write_images(root, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (200, 10, 10)).save(path)


def llava_record(index: int, first: str = "<image>\nWhat color is the car?", **extra) -> dict:
    return {"id": f"r{index}", "image": f"img/{index}.png", **extra,
            "conversations": [{"from": "human", "value": first}, {"from": "gpt", "value": "red"},
                              {"from": "human", "value": "Two cats?"}, {"from": "gpt", "value": "a dog"}]}


def build_dataset(tmp_path, tiny_llm, records, max_txt_len: int = 512) -> ConversationDataset:
    ann = tmp_path / "conversations.json"
    ann.write_text(json.dumps(records))
    write_images(tmp_path, [f"img/{i}.png" for i in range(len(records))])
    processor = InternLM2ChatProcessor(str(tiny_llm), max_txt_len)
    return ConversationDataset(BlipImageEvalProcessor(image_size=32), processor, str(tmp_path), [str(ann)])


def test_llava_and_messages_records_give_the_chat_encoding(tmp_path, tiny_llm, tokenizer):
    messages = {"id": "m", "image": "img/1.png", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What color is the car?\n<image>"},  # XTuner moves <image> to the front
        {"role": "assistant", "content": "red"}, {"role": "user", "content": "Two cats?"},
        {"role": "assistant", "content": "a dog"}]}
    dataset = build_dataset(tmp_path, tiny_llm, [llava_record(0), messages])
    llava, xtuner = dataset[0], dataset[1]
    assert xtuner["input_ids"] == EXPECTED_IDS and xtuner["labels"] == EXPECTED_LABELS
    no_system = ChatFormat(tokenizer, 512).encode(TWO_TURNS[1:])
    assert llava["input_ids"] == no_system.input_ids and llava["image_position"] == no_system.image_position
    batch = dataset.collater([llava, xtuner])
    assert batch["image"].shape == (2, 3, 32, 32) and batch["conversation_id"] == ["r0", "m"]
    assert batch["input_ids"][1] == EXPECTED_IDS and batch["image_position"].tolist() == [
        no_system.image_position, IMAGE_POSITION]


BAD_RECORDS = {
    "unknown role": ({"conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "bot", "value": "a"}]},
                     r"turn 1 has unknown role from='bot'"),
    "not alternating": ({"conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "human", "value": "b"},
                                           {"from": "gpt", "value": "a"}]}, r"turns must alternate"),
    "missing <image>": ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a"}]},
                        r"missing <image>"),
    "second <image>": ({"conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "a"},
                                          {"from": "human", "value": "<image>\nand?"}, {"from": "gpt", "value": "b"}]},
                       r"2 x <image>"),
    "empty conversation": ({"conversations": []}, r"empty conversation"),
}


@pytest.mark.parametrize("problem", list(BAD_RECORDS))
def test_bad_record_names_file_record_and_problem(tmp_path, tiny_llm, problem):
    record, message = BAD_RECORDS[problem]
    records = [llava_record(0), {"id": "bad", "image": "img/1.png", **record}]
    with pytest.raises(DataError, match=rf"conversations\.json record 1: .*{message}"):
        build_dataset(tmp_path, tiny_llm, records)


def test_missing_image_file_names_file_record_and_path(tmp_path, tiny_llm):
    records = [llava_record(0), llava_record(1, image="img/nowhere.png")]
    with pytest.raises(DataError, match=r"conversations\.json record 1: image file not found: .*img/nowhere\.png"):
        build_dataset(tmp_path, tiny_llm, records)


def test_unsupervised_and_text_only_records_are_skipped_and_counted(tmp_path, tiny_llm, caplog):
    long_question = "<image>\n" + " ".join(["What color is the car?"] * 20)
    text_only = {"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a"}]}
    records = [llava_record(0), llava_record(1, first=long_question), text_only, llava_record(3)]
    dataset = build_dataset(tmp_path, tiny_llm, records, max_txt_len=100)
    assert len(dataset) == 2 and [dataset[i]["conversation_id"] for i in range(2)] == ["r0", "r3"]
    assert dataset.skipped == {SKIP_NO_SUPERVISION: 1, SKIP_TEXT_ONLY: 1}
    assert re.search(r"skipped .*no supervised token after truncation': 1.* of 4 records \(kept 2\)", caplog.text)


def test_builder_from_a_project_block_feeds_the_model(tmp_path, tiny_llm, model):
    ann = tmp_path / "conversations.json"
    ann.write_text(json.dumps([llava_record(i) for i in range(2)]))
    write_images(tmp_path, ["img/0.png", "img/1.png"])
    block = OmegaConf.create({
        "vis_processor": {"train": {"name": "blip_image_eval", "image_size": 32}},
        "text_processor": {"train": {"name": "internlm2_chat", "llm_path": str(tiny_llm), "max_txt_len": 128}},
        "build_info": {"annotations": {"train": {"storage": str(ann)}}, "images": {"storage": str(tmp_path)}}})
    dataset = registry.get_builder_class("llava_conversation")(block).build_datasets()["train"]
    batch = dataset.collater([dataset[0], dataset[1]])
    model.train()
    loss = model(batch)["loss"]
    assert torch.isfinite(loss) and loss.item() > 0
