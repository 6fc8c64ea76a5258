"""A tiny BLIP-2 x InternLM2 that has learned to caption and answer about two images, for the chat
CLI and web app tests: its answers are words (a random tiny model says byte soup), so a page can
be read back exactly."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lavis_ext.text_zh import CAPTION_PROMPT_ZH

QA = "Question: {} Short answer:"  # the tiny model type's qa_prompt
SHAPES = {"red": "circle", "blue": "square"}  # colour -> the shape drawn in it
TRAIN_STEPS = 100  # enough for every answer below from each of the 12 initialisations tried


def chat_examples(colour: str) -> list[tuple[str, str]]:
    """``(prompt, target)`` pairs the model learns for the image of a ``colour`` shape."""
    shape = SHAPES[colour]
    zh = {"red": "一个红色的圆形", "blue": "一个蓝色的方形"}[colour]
    colour_question = QA.format("what colour is it?")
    # a second turn that repeats the first answer, whatever the image: only the history tells it
    # (BLIP-2's plain multi-turn prompt, as Blip2InternLM.chat_prompt writes it); without one, "say what"
    again = [(f"{colour_question} {word} {QA.format('say it again')}", f"{word} again") for word in SHAPES]
    again.append((QA.format("say it again"), "say what"))
    return [("", f"a {colour} {shape}"), (CAPTION_PROMPT_ZH, zh), (colour_question, colour),
            (QA.format("what shape is it?"), shape), *again]


def train_chat_model(dst: Path) -> dict[str, Path]:
    """Images ``red.png``, ``blue.png`` and ``checkpoint.pth`` (every weight, the ViT's too) of a
    tiny model type trained on :func:`chat_examples` (LLM unfrozen: it learns in seconds)."""
    from lavis.models import load_model
    from lavis.processors.blip_processors import BlipImageEvalProcessor

    from lavis_ext.tiny.data import draw_shape

    torch.manual_seed(0)
    model = load_model("blip2_internlm", "tiny", is_eval=False)
    model.config.max_txt_len = 128  # a QA prompt alone is ~30 tiny-vocab tokens
    model.set_trainable(freeze_vit=True, freeze_llm=False, freeze_qformer=False)
    processor = BlipImageEvalProcessor(image_size=model.config.image_size)
    files, images, prompts, targets = {}, [], [], []
    for colour in SHAPES:
        files[colour] = dst / f"{colour}.png"
        draw_shape(colour, SHAPES[colour], model.config.image_size).save(files[colour])
        for prompt, target in chat_examples(colour):
            images.append(processor(draw_shape(colour, SHAPES[colour], model.config.image_size)))
            prompts.append(prompt)
            targets.append(target)
    samples = {"image": torch.stack(images), "prompt": prompts, "text_input": targets}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(TRAIN_STEPS):
        loss = model(samples)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    files["checkpoint"] = dst / "checkpoint.pth"
    torch.save({"model": model.state_dict()}, files["checkpoint"])
    return files


@pytest.fixture(scope="session")
def trained_chat(tiny_parts, tiny_llm, tmp_path_factory) -> dict[str, Path]:
    """:func:`train_chat_model`'s files; the tiny model type reads its parts from the environment."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LAVIS_EXT_BERT", str(tiny_parts["bert"]))
        patch.setenv("LAVIS_EXT_VIT", str(tiny_parts["vit"]))
        patch.setenv("LAVIS_EXT_TINY_LLM", str(tiny_llm))
        patch.delenv("LAVIS_EXT_STAGE1_CKPT", raising=False)
        return train_chat_model(tmp_path_factory.mktemp("chat_model"))
