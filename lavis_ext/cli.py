"""What ``train.py`` and ``evaluate.py`` share: LAVIS's CLI, distributed set-up and one run.

``--cfg-path`` and ``--options k=v ...`` are LAVIS's. ``--resume auto`` continues the most
recent run under ``run.output_dir`` (its job directory and its ``checkpoint_last.pth``);
``--resume PATH`` resumes from a given checkpoint.
"""
from __future__ import annotations

import argparse
import datetime
import faulthandler
import gc
import random
import signal
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

import lavis_ext  # noqa: F401  (patches LAVIS, registers lavis-ext's parts)
from lavis.common.config import Config
from lavis.common.dist_utils import get_rank, init_distributed_mode, is_dist_avail_and_initialized
from lavis.common.logger import setup_logger
from lavis.common.registry import registry
from lavis_ext import offline
from lavis_ext.runners.runner_ext import find_latest_checkpoint

# run options read by runner_ext, lavis-ext's tasks or this module that stock yamls do not carry
EXTRA_RUN_KEYS = {"amp", "accum_grad_iters", "save_every_iters", "max_iters", "max_nonfinite_steps",
                  "resume_ckpt_path", "find_unused_parameters", "seed", "runner", "evaluate", "length_penalty"}


class OptionsError(KeyError):
    """An ``--options`` key that names nothing in the config."""

    def __str__(self) -> str:
        return self.args[0]


def parse_args(argv: list[str] | None, description: str) -> Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cfg-path", required=True, help="path to the project yaml")
    parser.add_argument("--options", nargs="+", default=[],
                        help="override settings of the yaml, as key=value (e.g. run.max_epoch=2)")
    parser.add_argument("--resume", default=None, help="'auto' (latest run under run.output_dir) or a checkpoint path")
    return parser.parse_args(argv)


def check_options(cfg: Config, options: list[str]) -> None:
    """Refuse ``--options`` keys that the config does not have (LAVIS silently adds them)."""
    project = OmegaConf.load(cfg.args.cfg_path)
    merged = OmegaConf.merge(Config.build_runner_config(project), Config.build_model_config(project),
                             Config.build_dataset_config(project))
    for option in options:
        key = option.split("=", 1)[0]
        if "=" not in option:
            raise OptionsError(f"--options {option!r}: expected key=value")
        if OmegaConf.select(merged, key, default=None) is not None:
            continue
        if key.startswith("run.") and key[4:] in EXTRA_RUN_KEYS:
            continue
        if key.startswith("model.") and key[6:] in ("bert_path", "vit_path", "pretrained", "finetuned"):
            continue
        raise OptionsError(f"--options {key!r}: no such key in {cfg.args.cfg_path} (or its model/dataset defaults)")


def setup_seeds(seed: int) -> None:
    seed = seed + get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def decide_job_id(run_cfg, resume: str | None) -> str:
    """One job id for all ranks, decided on rank 0. With ``--resume auto`` it is the resumed run's."""
    job = [None]
    if get_rank() == 0:
        job[0] = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
        if resume == "auto":
            latest = find_latest_checkpoint(Path(run_cfg.output_dir).expanduser().absolute())
            if latest is None:
                raise FileNotFoundError(f"--resume auto: no checkpoint under run.output_dir = {run_cfg.output_dir}")
            job[0] = latest.parent.name
    if is_dist_avail_and_initialized():
        dist.broadcast_object_list(job, src=0)
    return job[0]


def run(argv: list[str] | None, evaluate: bool):
    """Build config, task, datasets, model and runner; train (or evaluate). Returns the runner."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: where is a hung rank?
    args = parse_args(argv, "lavis-ext evaluation" if evaluate else "lavis-ext training")
    cfg = Config(args)
    check_options(cfg, args.options)
    run_cfg = cfg.run_cfg
    init_distributed_mode(run_cfg)
    setup_seeds(int(run_cfg.get("seed", 42)))
    setup_logger()
    job_id = decide_job_id(run_cfg, args.resume)
    if args.resume == "auto":
        run_cfg.resume_ckpt_path = str(Path(run_cfg.output_dir).expanduser().absolute() / job_id / "checkpoint_last.pth")
    elif args.resume:
        run_cfg.resume_ckpt_path = args.resume
    if evaluate:
        run_cfg.evaluate = True
    offline.configure(cfg.model_cfg)

    from lavis.tasks import setup_task

    task = setup_task(cfg)
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg)
    runner_cls = registry.get_runner_class(run_cfg.get("runner", "runner_base"))
    if runner_cls is None:
        raise KeyError(f"run.runner = {run_cfg.get('runner')!r} is not a registered runner")
    runner = runner_cls(cfg=cfg, job_id=job_id, task=task, model=model, datasets=datasets)
    if evaluate:
        runner.evaluate(skip_reload=True)
    else:
        runner.train()
    if is_dist_avail_and_initialized():
        close_distributed(runner)
    return runner


def close_distributed(runner) -> None:
    """Leave together and tear down in order.

    Rank 0 may still be scoring, hence the barrier. DDP holds a reference to the process group,
    so it is freed first: freed after ``destroy_process_group`` (when the runner is collected)
    a rank could hang in the gloo teardown, and exiting with a live group could abort with
    "terminate called without an active exception".
    """
    runner._wrapped_model = None  # RunnerBase's DDP wrapper; the bare model stays
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
