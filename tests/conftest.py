"""Shared fixtures: tiny BLIP-2 parts and data, built once per session in a temp dir."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fresh import REPO, child_pids, run_python, torchrun  # noqa: F401  (the tests import them from here)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PYTHONWARNINGS", "ignore")

import lavis_ext  # noqa: E402,F401  (patches must precede any transformers import)


LONGEST_FIRST = ("test_demo_learning.py::test_short_demo",)  # started first, so no worker waits on it at the end


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: not any(name in item.nodeid for name in LONGEST_FIRST))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_parts(tiny_dir) -> dict[str, Path]:
    """``bert`` (WordPiece vocab + tiny config) and ``vit`` (tiny EVA config) directories."""
    from lavis_ext.tiny.blip2 import make_tiny_bert, make_tiny_vit

    return {"bert": make_tiny_bert(tiny_dir / "bert"), "vit": make_tiny_vit(tiny_dir / "vit")}


@pytest.fixture(scope="session")
def tiny_coco(tiny_dir) -> Path:
    from lavis_ext.tiny.data import make_caption_data

    return make_caption_data(tiny_dir / "coco", num_images=8)


@pytest.fixture(scope="session")
def tiny_env(tiny_parts, tiny_coco) -> dict[str, str]:
    """Environment for subprocesses that build tiny models and read tiny COCO data (callers copy it to change it)."""
    env = dict(os.environ)
    env.update(LAVIS_EXT_BERT=str(tiny_parts["bert"]), LAVIS_EXT_VIT=str(tiny_parts["vit"]),
               TINY_COCO_ANN=str(tiny_coco), TINY_COCO_IMAGES=str(tiny_coco.parent / "images"),
               OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="session")
def tiny_llm(tiny_dir) -> Path:
    """A tiny InternLM2-format checkpoint (packed wqkv, sentencepiece tokenizer)."""
    from lavis_ext.tiny.internlm2 import make_tiny_internlm2

    return make_tiny_internlm2(tiny_dir / "llm")


@pytest.fixture
def tiny_model_env(tiny_parts, tiny_llm, monkeypatch):
    """Point the ``tiny`` blip2_internlm model type at the tiny fixtures."""
    monkeypatch.setenv("LAVIS_EXT_BERT", str(tiny_parts["bert"]))
    monkeypatch.setenv("LAVIS_EXT_VIT", str(tiny_parts["vit"]))
    monkeypatch.setenv("LAVIS_EXT_TINY_LLM", str(tiny_llm))
    monkeypatch.delenv("LAVIS_EXT_STAGE1_CKPT", raising=False)


def losses(output_dir: Path) -> list[float]:
    """Per-iteration losses of the one job under ``output_dir`` (runner_ext's ``metrics.jsonl``)."""
    (metrics,) = output_dir.glob("*/metrics.jsonl")
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
