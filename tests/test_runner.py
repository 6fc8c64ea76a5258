"""runner_ext through train.py: 2-process gloo training, checkpoints, exact resume, crash safety."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, losses, run_python, torchrun

STAGE1_STOCK = "tests/configs/stage1_stock_tiny.yaml"


def train(env, output_dir: Path, *extra: str, nproc: int = 2):
    args = ["train.py", "--cfg-path", STAGE1_STOCK, "--options", f"run.output_dir={output_dir}", *extra]
    result = torchrun(args, env, nproc=nproc) if nproc else run_python(args, env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_two_process_stage1_trains_checkpoints_and_resumes_exactly(tiny_env, tmp_path):
    full, parts = tmp_path / "full", tmp_path / "parts"
    train(tiny_env, full)
    (job,) = full.iterdir()
    assert {"checkpoint_0.pth", "checkpoint_1.pth", "checkpoint_last.pth", "log.txt"} <= {p.name for p in job.iterdir()}
    reference = losses(full)
    assert len(reference) == 8  # 16 captions / (2 per batch x 2 ranks) x 2 epochs

    train(tiny_env, parts, "run.max_iters=3")  # interrupted mid-epoch 0
    assert len(losses(parts)) == 3
    result = train(tiny_env, parts, "--resume", "auto")
    assert "resumed from" in result.stderr
    assert losses(parts) == reference  # bit-for-bit on CPU


def test_single_process_without_torchrun(tiny_env, tmp_path):
    train(tiny_env, tmp_path, "run.distributed=False", "run.max_iters=2", nproc=0)
    assert len(losses(tmp_path)) == 2


def test_stock_lavis_checkpoint_resumes(tiny_env, tmp_path):
    """A checkpoint in stock LAVIS's format (frozen weights dropped, no position/RNG) resumes."""
    train(tiny_env, tmp_path / "a", "run.max_epoch=1", nproc=0, *[])
    (job,) = (tmp_path / "a").iterdir()
    checkpoint = torch.load(job / "checkpoint_0.pth", weights_only=False)
    stock = {k: checkpoint[k] for k in ("model", "optimizer", "config", "scaler", "epoch")}
    torch.save(stock, tmp_path / "stock.pth")
    result = train(tiny_env, tmp_path / "b", f"run.resume_ckpt_path={tmp_path / 'stock.pth'}", nproc=0)
    assert "resumed from" in result.stderr and "at epoch 1" in result.stderr


def test_hung_run_fails_with_each_ranks_stack(tiny_env, tiny_coco, tmp_path):
    """A run past its time limit is reported with both ranks' Python stacks (SIGUSR1 -> faulthandler).
    The ranks hang as on a stalled file system, without spending CPU: each image is a FIFO nobody writes."""
    stalled = tmp_path / "images"
    for image in (tiny_coco.parent / "images").rglob("*.jpg"):
        (stalled / image.relative_to(tiny_coco.parent / "images")).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(stalled / image.relative_to(tiny_coco.parent / "images"))
    run = ["train.py", "--cfg-path", STAGE1_STOCK, "--options", f"run.output_dir={tmp_path / 'out'}"]
    with pytest.raises(pytest.fail.Exception) as failure:
        torchrun(run, {**tiny_env, "TINY_COCO_IMAGES": str(stalled)}, timeout=25)
    message = str(failure.value)
    assert "timed out after 25 s" in message
    assert message.count("lavis_ext/cli.py") >= 2, message[-3000:]


CLOSE_SCRIPT = """
import sys, weakref, torch, torch.distributed as dist
from lavis_ext.runners.runner_ext import RunnerExt
dist.init_process_group("gloo")
runner = RunnerExt.__new__(RunnerExt)  # only what close() uses: the DDP wrapper
runner._wrapped_model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
wrapper = weakref.ref(runner._wrapped_model)
destroy = dist.destroy_process_group
def checked_destroy():
    print(f"rank {dist.get_rank()}: DDP alive at destroy: {wrapper() is not None}", flush=True)
    destroy()
dist.destroy_process_group = checked_destroy
runner.close()
"""


def test_ddp_is_freed_before_the_process_group(tiny_env, tmp_path):
    """Freed after destroy_process_group, DDP hung the exit of a gloo rank (8 of 40 launches
    of a 2-rank job on loaded cores; 0 of 40 in this order)."""
    script = tmp_path / "close.py"
    script.write_text(CLOSE_SCRIPT)
    result = torchrun([str(script)], tiny_env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: DDP alive at destroy: False" in result.stdout


def test_kill_during_save_leaves_previous_checkpoint(tmp_path):
    """SIGKILL while a large checkpoint is being written: the previous one still loads."""
    target = tmp_path / "checkpoint_last.pth"
    from lavis_ext.checkpoint import atomic_save

    atomic_save({"step": 1, "w": torch.ones(3)}, target)
    writer = subprocess.Popen([sys.executable, "-c", (
        "import torch, sys; from lavis_ext.checkpoint import atomic_save; "
        "print('start', flush=True); "
        f"atomic_save({{'step': 2, 'w': torch.randn(64, 1024, 1024)}}, __import__('pathlib').Path({str(target)!r}))")],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "start"
    deadline = time.time() + 60
    while not list(tmp_path.glob(".checkpoint_last.pth.tmp*")) and time.time() < deadline:
        time.sleep(0.01)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert list(tmp_path.glob(".checkpoint_last.pth.tmp*")), "the kill should land during the write"
    assert torch.load(target)["step"] == 1


def test_stock_runner_fails_where_runner_ext_works(tiny_env):
    """The upstream problems runner_ext overrides: CPU `model` property and strict resume."""
    script = """
import lavis_ext, torch
from types import SimpleNamespace
from omegaconf import OmegaConf
from lavis.runners.runner_base import RunnerBase
from lavis_ext.runners.runner_ext import RunnerExt
from lavis_ext.checkpoint import load_partial_state
model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
model.device = torch.device("cpu")
for p in model[0].parameters():
    p.requires_grad = False
cfg = SimpleNamespace(run_cfg=OmegaConf.create({"device": "cpu", "distributed": False}))
for cls in (RunnerBase, RunnerExt):
    runner = cls.__new__(cls)
    runner.config, runner._model, runner._wrapped_model, runner._device = cfg, model, None, None
    print(cls.__name__, "model is None:", runner.model is None)
trainable = {k: v for k, v in model.state_dict().items() if k.startswith("1.")}
try:
    model.load_state_dict(trainable)
    print("strict: ok")
except RuntimeError:
    print("strict: fails")
load_partial_state(model, trainable, "ckpt")
print("partial: ok")
"""
    result = run_python(["-c", script], tiny_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RunnerBase model is None: True" in result.stdout
    assert "RunnerExt model is None: False" in result.stdout
    assert "strict: fails" in result.stdout and "partial: ok" in result.stdout


LAVIS_EXT_MODELS = {  # project yaml -> what makes it a tiny run of the same model
    "blip2_qformer_ext": ("lavis_ext/projects/blip2/train/pretrain_stage1.yaml", []),
    "blip2_internlm": ("lavis_ext/projects/blip2/train/pretrain_stage2_internlm2_1_8b.yaml",
                       ["model.llm_dtype=fp32", "model.pretrained=", "model.llm_path={tiny_llm}"]),
}


@pytest.mark.parametrize("arch", sorted(LAVIS_EXT_MODELS))
def test_lavis_ext_model_resumes_from_a_path_with_workers(arch, tiny_env, tiny_llm, tiny_coco, tmp_path):
    """Both lavis-ext models, one process, a data-loader worker: checkpoints every 2 steps
    (save_every_iters), and ``--resume PATH`` of a run stopped at step 3 continues it exactly."""
    from lavis_ext.tiny.data import make_vg_caption_data
    from test_pretrain_pipeline import TINY_RUN, data_options

    yaml, model_options = LAVIS_EXT_MODELS[arch]
    data = data_options(tiny_coco, make_vg_caption_data(tmp_path / "vg", num_images=4))
    deterministic = [f"datasets.{d}.vis_processor.train.name=blip_image_eval" for d in ("coco_caption_ext", "vg_caption_ext")]
    options = [*data, *deterministic, *TINY_RUN, *(o.format(tiny_llm=tiny_llm) for o in model_options), "run.max_epoch=1",
               "run.num_workers=1", "run.save_every_iters=2", "run.distributed=False"]

    def train(output: Path, *extra: str, resume: Path | None = None):
        resume_args = ["--resume", str(resume)] if resume else []
        result = run_python(["train.py", "--cfg-path", yaml, *resume_args, "--options", *options, *extra,
                             f"run.output_dir={output}"], tiny_env)
        assert result.returncode == 0, result.stderr[-4000:]
        return result

    full = train(tmp_path / "full")
    reference = losses(tmp_path / "full")
    assert len(reference) == 10  # (16 COCO + 4 VG captions) / batch 2
    saved = [int(s) for s in re.findall(r"saved checkpoint: epoch 0, step (\d+)", full.stdout + full.stderr)]
    assert saved == [2, 4, 6, 8, 10]  # every 2 steps; the last one is the epoch's end
    train(tmp_path / "part", "run.max_iters=3")
    (checkpoint,) = (tmp_path / "part").glob("*/checkpoint_last.pth")
    assert torch.load(checkpoint, weights_only=False)["next_iter"] == 3
    resumed = train(tmp_path / "resumed", resume=checkpoint)
    assert "at epoch 0, iteration 3" in resumed.stdout + resumed.stderr
    assert losses(tmp_path / "resumed") == reference[3:]
