"""``model.llm_cache``: generate, predict_answers and chat through a static KV cache give the tokens the
dynamic cache gives."""
from __future__ import annotations

import pytest
import torch
from lavis.models import load_model

CHAT_TEMPLATE = {"use_chat_template": True}


def load(llm_cache: str, **options):
    torch.manual_seed(0)
    model = load_model("blip2_internlm", "tiny", is_eval=True)
    model.config.llm_cache = llm_cache
    for key, value in options.items():
        setattr(model.config, key, value)
    return model


def recording(model) -> list[dict]:
    """Wrap ``model.llm.generate`` to record its keyword arguments and output ids."""
    calls, generate = [], model.llm.generate

    def record(**kwargs):
        output = generate(**kwargs)
        calls.append({"cache_implementation": kwargs.get("cache_implementation"), "ids": output.tolist()})
        return output

    model.llm.generate = record
    return calls


def images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))


CASES = {
    # every new token is forced (min = max), so each call compares 8 tokens per row, never an empty answer
    "generate greedy": lambda m: m.generate({"image": images(3), "prompt": ["a photo of", "", "two red"]},
                                            num_beams=1, max_length=8, min_length=8),
    "generate beams": lambda m: m.generate({"image": images(2)}, num_beams=3, max_length=8, min_length=8),
    "predict_answers greedy": lambda m: m.predict_answers(
        {"image": images(2), "text_input": ["what colour?", "how many circles are there?"]},
        num_beams=1, max_len=6, min_len=6),
    "predict_answers beams": lambda m: m.predict_answers(
        {"image": images(2), "text_input": ["what colour?", "how many?"]}, num_beams=3, max_len=6, min_len=6),
    "chat greedy": lambda m: m.chat(images(1)[0], [("what is it?", "a red circle")], "and its colour?",
                                    num_beams=1, max_new_tokens=6, min_new_tokens=6),
    "chat text only, beams": lambda m: m.chat(None, [], "hello", num_beams=3, max_new_tokens=6, min_new_tokens=6),
}


@pytest.mark.parametrize("options", [{}, CHAT_TEMPLATE], ids=["plain", "chat"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_static_cache_gives_the_dynamic_tokens(tiny_model_env, case, options):
    runs = {}
    for cache in ("static", "dynamic"):
        model = load(cache, **options)
        calls = recording(model)
        runs[cache] = (CASES[case](model), calls)
    (static_text, static_calls), (dynamic_text, dynamic_calls) = runs["static"], runs["dynamic"]
    assert [c["cache_implementation"] for c in static_calls] == ["static"]
    assert [c["cache_implementation"] for c in dynamic_calls] == [None]
    assert static_calls[0]["ids"] == dynamic_calls[0]["ids"]
    assert static_text == dynamic_text


def test_static_is_the_default(tiny_model_env):
    assert load_model("blip2_internlm", "tiny", is_eval=True).config.llm_cache == "static"


def test_unknown_cache_is_refused(tiny_model_env):
    from omegaconf import OmegaConf

    from lavis_ext.models.blip2_models.blip2_internlm import Blip2InternLMConfig

    cfg = OmegaConf.create({"llm_cache": "paged"})
    with pytest.raises(ValueError, match=r"model.llm_cache = 'paged'"):
        Blip2InternLMConfig.from_lavis(cfg)
