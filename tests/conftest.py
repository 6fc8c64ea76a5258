"""Shared fixtures: tiny BLIP-2 parts and data, built once per session in a temp dir."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PYTHONWARNINGS", "ignore")

import lavis_ext  # noqa: E402,F401  (patches must precede any transformers import)


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


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux ``/proc``)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def run_python(args: list[str], env: dict[str, str], cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python ARGS`` with captured output. A run that hangs past ``timeout`` fails with the
    Python stacks of its ranks (``SIGUSR1``, see ``lavis_ext.cli``) and its output's tail."""
    process = subprocess.Popen([sys.executable, *args], env=env, cwd=cwd, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in child_pids(process.pid) or [process.pid]:  # torchrun's workers, or the process
            os.kill(pid, signal.SIGUSR1)
        time.sleep(1)  # the stacks end the output
        for pid in child_pids(process.pid):
            os.kill(pid, signal.SIGKILL)
        process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(args)}\n--- stdout\n{stdout[-3000:]}\n"
                    f"--- stderr (with the ranks' stacks)\n{stderr[-12000:]}", pytrace=False)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def torchrun(args: list[str], env: dict[str, str], nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_python(["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", *args],
                      env, timeout=timeout)


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
