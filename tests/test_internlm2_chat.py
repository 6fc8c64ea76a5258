"""The shipped chat model type, ``pretrain_internlm2_chat_1_8b``, end to end on tiny parts.

Its LLM is a tiny checkpoint in the hub's internlm2-chat layout (``<|im_end|>`` only in
``tokenizer_config.json``, generation eos ``[2, <|im_end|>]``): prompts go through the chat
template, generation stops at ``<|im_end|>``, and answers come back without it.
"""
from __future__ import annotations

import pytest
import torch
from lavis.models import load_model

from lavis_ext.constants import IGNORE_INDEX
from lavis_ext.tiny.internlm2 import make_tiny_internlm2


@pytest.fixture(scope="module")
def chat_llm(tmp_path_factory):
    return make_tiny_internlm2(tmp_path_factory.mktemp("internlm2-chat"), chat=True)


@pytest.fixture
def chat_model(tiny_model_env, chat_llm, monkeypatch):
    """The 1.8B chat model type with the tiny BERT, ViT and chat LLM."""
    monkeypatch.setenv("LAVIS_EXT_INTERNLM2_CHAT_1_8B", str(chat_llm))
    torch.manual_seed(0)
    return load_model("blip2_internlm", "pretrain_internlm2_chat_1_8b", is_eval=True)


def force_tokens(model, tokens: list[int]):
    """Make the LLM emit ``tokens[k]`` at generation step ``k`` (an lm_head hook); returns the
    hook handle and a counter of LM head calls."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        if calls["n"] < len(tokens):
            output[..., tokens[calls["n"]]] += 1e4
        calls["n"] += 1
        return output

    return model.llm.lm_head.register_forward_hook(hook), calls


def test_prompts_are_in_the_chat_template(chat_model):
    tokenizer = chat_model.llm_tokenizer
    prompt = chat_model.format_question("what colour?", chat_model.config.qa_prompt)
    assert prompt == ("<|im_start|>user\nQuestion: what colour? Short answer:<|im_end|>\n"
                      "<|im_start|>assistant\n")
    ids = tokenizer.encode(prompt)
    assert ids[:2] == [1, len(tokenizer) - 1]  # <s><|im_start|>
    tail = [len(tokenizer) - 1, *tokenizer.encode("assistant\n", add_special_tokens=False)]
    assert ids[-len(tail):] == tail  # <|im_start|>assistant\n


@pytest.mark.parametrize("entry", ["predict_answers", "generate"])
def test_generation_stops_at_im_end_and_drops_it(chat_model, entry):
    tokenizer = chat_model.llm_tokenizer
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end == len(tokenizer) - 2 and im_end in chat_model.stop_token_ids
    answer = tokenizer.encode("two red circles , no", add_special_tokens=False)
    sample = {"image": torch.randn(1, 3, 224, 224), "text_input": ["what is it?"]}
    handle, calls = force_tokens(chat_model, [*answer, im_end, *answer])
    try:
        if entry == "predict_answers":
            output = chat_model.predict_answers(sample, num_beams=1, max_len=20)
        else:
            output = chat_model.generate(sample, num_beams=1, max_length=20)
    finally:
        handle.remove()
    assert output == ["two red circles, no"]  # the hub's decode (clean_up_tokenization), no <|im_end|>
    assert calls["n"] == len(answer) + 1  # nothing generated after <|im_end|>


def test_base_model_does_not_stop_at_im_end(tiny_model_env):
    """The base layout's generation_config has eos 2 only, and plain prompts: <|im_end|> is text."""
    model = load_model("blip2_internlm", "tiny", is_eval=True)
    im_end = model.llm_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.stop_token_ids == [2]
    handle, calls = force_tokens(model, [im_end])
    try:
        model.generate({"image": torch.randn(1, 3, 32, 32)}, num_beams=1, max_length=5, min_length=5)
    finally:
        handle.remove()
    assert calls["n"] == 5


def test_caption_prompts_and_targets_are_chat_turns(chat_model):
    """A chat model captions inside the chat template, and learns to end a caption with <|im_end|>."""
    tokenizer = chat_model.llm_tokenizer
    samples = {"image": torch.randn(2, 3, 224, 224), "text_input": ["a red circle", "一只猫"],
               "prompt": ["", "一张图片的描述："]}
    prompts = chat_model._prompts(samples, chat_model.config.prompt)
    assert prompts == ["<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n",
                       "<|im_start|>user\n一张图片的描述：<|im_end|>\n<|im_start|>assistant\n"]
    _, _, labels = chat_model.build_llm_inputs(chat_model.encode_images(samples["image"]), prompts,
                                               samples["text_input"])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, target in zip(labels.tolist(), samples["text_input"]):
        assert [t for t in row if t != IGNORE_INDEX] == tokenizer.encode(target, add_special_tokens=False) + [im_end]
