"""``Blip2InternLM.chat`` and the terminal chat (``python -m lavis_ext.chat``) on tiny models."""
from __future__ import annotations

import io
import json
import os

import jinja2
import pytest
import torch
from lavis.models import load_model
from omegaconf import OmegaConf
from test_internlm2_chat import chat_llm, chat_model, force_tokens  # noqa: F401  (fixtures)

from lavis_ext import chat as chat_cli
from lavis_ext.demo.pipeline import VQA_YAML
from lavis_ext.tiny.blip2 import write_lavis_checkpoint
from lavis_ext.tiny.data import draw_shape

QA = "Question: {} Short answer:"
HISTORY = [("what colour is it?", "red"), ("and its shape?", "a circle")]
GREEDY = {"num_beams": 1, "max_new_tokens": 6}


@pytest.fixture
def base_model(tiny_model_env):
    torch.manual_seed(0)
    return load_model("blip2_internlm", "tiny", is_eval=True)


def image(size: int = 32) -> torch.Tensor:
    return torch.randn(3, size, size, generator=torch.Generator().manual_seed(1))


def llm_inputs(model, monkeypatch) -> list[dict]:
    """The keyword arguments of every ``model.llm.generate`` call, recorded."""
    calls, generate = [], model.llm.generate

    def recording(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(model.llm, "generate", recording)
    return calls


def hub_template_text(llm_dir, messages) -> str:
    """The conversation as the hub's own ``chat_template`` (jinja, tokenizer_config.json) renders it."""
    config = json.loads((llm_dir / "tokenizer_config.json").read_text())
    return jinja2.Template(config["chat_template"]).render(messages=messages, add_generation_prompt=True,
                                                           bos_token="<s>")


def hub_template_ids(llm_dir, messages) -> list[int]:
    """:func:`hub_template_text`'s ids, encoded as transformers' ``apply_chat_template(tokenize=True)`` does."""
    from lavis_ext.models.internlm2 import load_internlm2_tokenizer

    return load_internlm2_tokenizer(llm_dir).encode(hub_template_text(llm_dir, messages), add_special_tokens=False)


def test_history_renders_to_exactly_the_chat_template_ids(chat_model, chat_llm, monkeypatch):  # noqa: F811
    calls = llm_inputs(chat_model, monkeypatch)
    chat_model.chat(image(224), HISTORY, "how many?", **GREEDY)
    messages = []
    for question, answer in HISTORY:
        messages += [{"role": "user", "content": QA.format(question)}, {"role": "assistant", "content": answer}]
    expected = hub_template_ids(chat_llm, messages + [{"role": "user", "content": QA.format("how many?")}])
    embeds = calls[0]["inputs_embeds"][0]
    n_query = chat_model.config.num_query_token
    assert embeds.shape[0] == n_query + len(expected)  # the queries, then the conversation
    assert torch.equal(embeds[n_query:], chat_model.llm.get_input_embeddings()(torch.tensor(expected)))


def test_an_image_placeholder_takes_the_queries_in_the_first_turn_only(chat_model, chat_llm, monkeypatch):  # noqa: F811
    """``run.prompt: "<image>\\n{}"`` (instruction-tuned models): the queries where a training turn has them."""
    calls = llm_inputs(chat_model, monkeypatch)
    chat_model.chat(image(224), HISTORY[:1], "how many?", template="<image>\n{}", **GREEDY)
    chat_model.chat(None, HISTORY[:1], "how many?", template="<image>\n{}", **GREEDY)
    (question, answer), tokenizer = HISTORY[0], chat_model.llm_tokenizer
    messages = [{"role": "user", "content": f"<image>\n{question}"}, {"role": "assistant", "content": answer},
                {"role": "user", "content": "how many?"}]
    before, after = [tokenizer.encode(part, add_special_tokens=False)  # each side of <image>, as chat_format
                     for part in hub_template_text(chat_llm, messages).split("<image>")]
    messages[0]["content"] = question
    embed = chat_model.llm.get_input_embeddings()
    queries = chat_model.encode_images(image(224)[None])[0]
    assert torch.equal(calls[0]["inputs_embeds"][0], torch.cat([embed(torch.tensor(before)), queries,
                                                                 embed(torch.tensor(after))]))
    without = tokenizer.encode(hub_template_text(chat_llm, messages), add_special_tokens=False)
    assert torch.equal(calls[1]["inputs_embeds"][0], embed(torch.tensor(without)))  # no image, no placeholder


def test_base_model_history_is_the_plain_qa_prompt(base_model, monkeypatch):
    calls = llm_inputs(base_model, monkeypatch)
    base_model.chat(image(), HISTORY, "how many?", **GREEDY)
    text = "Question: what colour is it? Short answer: red Question: and its shape? Short answer: a circle " \
           "Question: how many? Short answer:"
    expected = base_model.llm_tokenizer.encode(text)  # <s> first
    embeds = calls[0]["inputs_embeds"][0, base_model.config.num_query_token:]
    assert torch.equal(embeds, base_model.llm.get_input_embeddings()(torch.tensor(expected)))


def test_first_question_is_prompted_as_predict_answers(base_model):
    answer = base_model.chat(image(), [], "what is it?", num_beams=3, max_new_tokens=8, length_penalty=-1)
    sample = {"image": image()[None], "text_input": ["what is it?"]}
    assert [answer] == base_model.predict_answers(sample, num_beams=3, max_len=8, length_penalty=-1)


@pytest.mark.parametrize("settings", [{"num_beams": 1}, {"do_sample": True, "temperature": 0.7, "top_p": 0.8}],
                         ids=["greedy", "sampling"])
def test_streaming_ends_with_the_text_of_non_streaming(base_model, settings):
    settings = chat_cli.GenerationSettings(max_new_tokens=12, min_new_tokens=12, **settings)
    torch.manual_seed(3)
    streamed = list(chat_cli.stream_answer(base_model, image(), HISTORY, "what is it?", settings))
    torch.manual_seed(3)
    assert streamed[-1] == base_model.chat(image(), HISTORY, "what is it?", **settings.generate_kwargs())
    assert len(set(streamed)) > 2  # it grew token by token


def test_beam_search_answers_once(base_model):
    settings = chat_cli.GenerationSettings(num_beams=3, max_new_tokens=8)
    streamed = list(chat_cli.stream_answer(base_model, image(), [], "what is it?", settings))
    assert streamed == [base_model.chat(image(), [], "what is it?", **settings.generate_kwargs())]


def test_a_forced_stop_token_ends_the_answer(chat_model):  # noqa: F811
    tokenizer = chat_model.llm_tokenizer
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    answer = tokenizer.encode("two red circles", add_special_tokens=False)
    handle, calls = force_tokens(chat_model, [*answer, im_end, *answer])
    try:
        streamed = list(chat_cli.stream_answer(chat_model, image(224), HISTORY, "what is it?",
                                               chat_cli.GenerationSettings(num_beams=1, max_new_tokens=20)))
    finally:
        handle.remove()
    assert streamed[-1] == "two red circles"
    assert calls["n"] == len(answer) + 1  # generation stopped at <|im_end|>
    assert not any("im_end" in text for text in streamed)


def test_no_image_is_a_text_only_chat(base_model, monkeypatch):
    monkeypatch.setattr(base_model, "encode_images", None)  # the image path must not run
    calls = llm_inputs(base_model, monkeypatch)
    answer = base_model.chat(None, HISTORY, "what is it?", **GREEDY)
    prompt = base_model.chat_prompt(HISTORY, "what is it?", QA)
    ids = torch.tensor([base_model.llm_tokenizer.encode(prompt)])  # the LLM alone on the text
    assert torch.equal(calls[0]["inputs_embeds"], base_model.llm.get_input_embeddings()(ids))
    output = base_model.llm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                     min_new_tokens=1, num_beams=1, do_sample=False,
                                     eos_token_id=base_model.stop_token_ids,
                                     pad_token_id=base_model.llm_tokenizer.pad_token_id)
    assert answer == base_model.decode_answer(output[0, ids.shape[1]:].tolist())


# --------------------------------------------------------------------------- the terminal chat


def terminal(argv: list[str], lines: str) -> list[str]:
    """What the terminal chat prints for the input ``lines`` (answers may hold other line breaks than \\n)."""
    out = io.StringIO()
    chat_cli.run_terminal(chat_cli.parse_args(argv), io.StringIO(lines), out)
    return out.getvalue().split("\n")


def test_cli_answers_as_evaluate_predicts_with_the_demo_yaml(tiny_model_env, tmp_path, monkeypatch):
    """The demo's eval yaml: its model, its prompt and its generation settings (run section)."""
    monkeypatch.delenv("LAVIS_EXT_STAGE2_CKPT", raising=False)
    trained = chat_cli.load_chat_model(VQA_YAML).model
    with torch.no_grad():
        trained.llm_proj.weight.mul_(3.0)  # weights of its own, to come back through --checkpoint
    checkpoint = write_lavis_checkpoint(trained, tmp_path / "checkpoint.pth")
    image_file = tmp_path / "red.png"
    draw_shape("red", "circle", 64).save(image_file)
    lines = terminal(["--cfg-path", str(VQA_YAML), "--checkpoint", str(checkpoint), "--image", str(image_file)],
                     "what colour is it?\n")
    loaded = chat_cli.load_chat_model(VQA_YAML, checkpoint=checkpoint)
    run = OmegaConf.load(VQA_YAML).run
    sample = {"image": chat_cli.read_image(image_file, loaded.processor)[None], "text_input": ["what colour is it?"]}
    expected = loaded.model.predict_answers(sample, num_beams=run.num_beams, max_len=run.max_len,
                                            min_len=run.min_len, length_penalty=run.length_penalty, prompt=run.get("prompt", ""))
    assert sample["image"].shape[-1] == 64  # the yaml's image size
    assert lines[-2:] == [expected[0], ""]


def test_generation_settings_are_the_eval_yamls():
    run = OmegaConf.load(VQA_YAML).run
    settings = chat_cli.GenerationSettings.from_run_config(run)
    assert (settings.num_beams, settings.max_new_tokens, settings.min_new_tokens, settings.length_penalty,
            settings.template) == (run.num_beams, run.max_len, run.min_len, run.length_penalty, None)
    assert "prompt" not in run  # the model's qa_prompt asks the questions


def test_cli_commands_and_bad_images(tiny_model_env, tmp_path):
    good, broken = tmp_path / "good.png", tmp_path / "broken.png"
    draw_shape("blue", "square", 32).save(good)
    broken.write_bytes(good.read_bytes()[:16] + bytes(64))  # a PNG signature, then zeros
    lines = terminal(["--model-type", "tiny", "--num-beams", "1", "--max-new-tokens", "5", "--image", str(good)],
                     f"/image {tmp_path}/missing.png\n/image {broken}\n这是什么？\n/caption zh\n/caption fr\n"
                     f"/reset\n/image\n/wat\n")
    loaded = chat_cli.load_chat_model(model_type="tiny")
    settings = loaded.settings.replace(num_beams=1, max_new_tokens=5)
    picture = chat_cli.read_image(good, loaded.processor)
    broken_line = next(i for i, line in enumerate(lines) if line.startswith(f"error: cannot decode image {broken}"))
    assert lines[broken_line - 1] == f"error: image file not found: {tmp_path}/missing.png"
    # the chat goes on with the good image: the Chinese question is answered, then the caption
    answer = loaded.model.chat(picture, [], "这是什么？", **settings.generate_kwargs())
    assert lines[broken_line + 1:broken_line + 3] == [answer, chat_cli.caption(loaded.model, picture, "zh", settings)]
    assert lines[broken_line + 3:broken_line + 6] == ["usage: /caption [en|zh]", "history cleared", "usage: /image PATH"]
    assert lines[broken_line + 6].startswith("unknown command /wat")


def test_without_a_model_one_line_says_how_to_get_one(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        chat_cli.main(["--demo-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {chat_cli.NO_MODEL}\n"


def test_the_demo_model_is_found(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "environ", dict(os.environ))  # demo_model sets the demo's variables
    for name, mtime in (("older", 1), ("newer", 2)):
        checkpoint = tmp_path / "demo" / "pretrain_stage2" / name / "checkpoint_last.pth"
        checkpoint.parent.mkdir(parents=True)
        checkpoint.write_bytes(b"")
        os.utime(checkpoint, (mtime, mtime))
    cfg_path, checkpoint = chat_cli.demo_model(tmp_path)
    assert cfg_path == VQA_YAML and checkpoint.parent.name == "newer"
    assert os.environ["LAVIS_EXT_TINY_LLM"] == str(tmp_path / "llm")
