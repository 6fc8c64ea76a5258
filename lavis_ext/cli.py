"""What ``train.py`` and ``evaluate.py`` share: LAVIS's CLI, distributed set-up and one run.

``--cfg-path`` and ``--options k=v ...`` are LAVIS's. ``--resume auto`` continues the most
recent run under ``run.output_dir`` (its job directory and its ``checkpoint_last.pth``);
``--resume PATH`` resumes from a given checkpoint.

Bad input ends in one line on stderr, ``error: <message naming the file or key>``, and exit
code 2 (:func:`main`); ``--debug`` or ``LAVIS_EXT_DEBUG=1`` also prints the traceback. Under
torchrun the line comes once: rank 0 reports at once, the other ranks only after
:data:`PEER_GRACE_S`, by which time torchrun has stopped them if rank 0 failed too.
"""
from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import os
import pickle
import random
import signal
import sys
import tempfile
import time
import traceback
from argparse import Namespace
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image

import lavis_ext  # noqa: F401  (patches LAVIS, registers lavis-ext's parts)
from lavis.common.config import Config
from lavis.common.dist_utils import get_rank, init_distributed_mode, is_dist_avail_and_initialized
from lavis.common.logger import setup_logger
from lavis.common.registry import registry
from lavis_ext.datasets.base import set_max_image_pixels
from lavis_ext.errors import ConfigError, LavisExtError
from lavis_ext.run_options import RunOptions, nearest
from lavis_ext.runners.runner_ext import find_latest_checkpoint, rng_state, set_rng_state

RUN_KEYS = {option.name for option in fields(RunOptions)}
# what bad input raises: lavis-ext's checks, and the OS, config, JSON, image and unpickling errors
# that reach the top without one of them around
USER_ERRORS = (LavisExtError, OSError, json.JSONDecodeError, yaml.YAMLError, OmegaConfBaseException,
               Image.DecompressionBombError, pickle.UnpicklingError)
DEBUG_ENV = "LAVIS_EXT_DEBUG"
EXIT_BAD_INPUT = 2
PEER_GRACE_S = 5.0  # torchrun stops the other ranks within its monitor interval (0.1 s) of a failure


class OptionsError(LavisExtError, KeyError):
    """An ``--options`` key that names nothing in the config."""

    def __str__(self) -> str:
        return self.args[0]


def parse_args(argv: list[str] | None, description: str) -> Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cfg-path", required=True, help="path to the project yaml")
    parser.add_argument("--options", nargs="+", default=[],
                        help="override settings of the yaml, as key=value (e.g. run.max_epoch=2)")
    parser.add_argument("--resume", default=None, help="'auto' (latest run under run.output_dir) or a checkpoint path")
    parser.add_argument("--debug", action="store_true",
                        help=f"print the traceback of an error, not just its message (or set {DEBUG_ENV}=1)")
    return parser.parse_args(argv)


def check_model(cfg_path: str, options: list[str]) -> None:
    """``model.arch`` and ``model.model_type`` (after ``--options``) name a registered model and one
    of its types; LAVIS's own checks are bare asserts (``config.py:62,69``, ``base_model.py:76-78``)."""
    project = OmegaConf.load(cfg_path)
    overrides = OmegaConf.from_dotlist([o for o in options if "=" in o])
    check_model_section(OmegaConf.merge(project.get("model") or {}, overrides.get("model") or {}), cfg_path)


def check_model_section(model, source) -> None:
    """A ``model`` section's ``arch`` is a registered model and its ``model_type`` one of that
    model's types; ``source`` (the yaml, or the flag) is named in the error."""
    arch, model_type = model.get("arch"), model.get("model_type")
    model_cls = registry.get_model_class(arch) if arch else None
    if model_cls is None:
        raise ConfigError(f"model.arch = {arch!r} ({source}): not a registered model; "
                          f"registered: {sorted(registry.mapping['model_name_mapping'])}")
    if model_type not in model_cls.PRETRAINED_MODEL_CONFIG_DICT:
        raise ConfigError(f"model.model_type = {model_type!r} ({source}): {arch} has the model types "
                          f"{sorted(model_cls.PRETRAINED_MODEL_CONFIG_DICT)}")


def check_output_dir(run_cfg) -> None:
    """``run.output_dir`` can be created and written, checked before anything is built."""
    root = Path(str(run_cfg.output_dir)).expanduser().absolute()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        raise ConfigError(f"run.output_dir = {run_cfg.output_dir}: cannot create or write it "
                          f"({exc.strerror or exc}: {exc.filename or root})") from exc


def model_defaults(model_cfg):
    """The registered model's config dataclass (``config_class``: its keys and defaults), or None
    for models that take their keys from the yaml alone (stock LAVIS)."""
    model_cls = registry.get_model_class(model_cfg.get("arch") or "")
    return getattr(model_cls, "config_class", None)


def model_image_size(model_cfg) -> int | None:
    """``model.image_size``, or the model's default where the yaml leaves it out."""
    defaults = model_defaults(model_cfg)
    return model_cfg.get("image_size", defaults.image_size if defaults else None)


def check_image_sizes(model_cfg, datasets: dict) -> None:
    """Each dataset's image processor yields ``model.image_size`` images (a mismatch would fail in
    the ViT at the first forward). Random processors run without disturbing the RNG streams."""
    size = model_image_size(model_cfg)
    if size is None:
        return
    size = int(size)
    probe = Image.new("RGB", (size + 17, size + 9))  # not square, not the size: a processor must resize
    for name, splits in datasets.items():
        for split, dataset in splits.items():
            processor = getattr(dataset, "vis_processor", None)
            if processor is None:
                continue
            saved = rng_state()
            try:
                image = processor(probe)
            finally:
                set_rng_state(saved)
            if torch.is_tensor(image) and image.dim() == 3 and tuple(image.shape[-2:]) != (size, size):
                kind = "train" if split == "train" else "eval"
                raise ConfigError(f"datasets.{name}.vis_processor.{kind}.image_size gives {image.shape[-2]}x"
                                  f"{image.shape[-1]} images, but model.image_size = {size}")


def check_options(cfg: Config, options: list[str]) -> None:
    """Refuse ``--options`` keys that the config does not have (LAVIS silently adds them)."""
    project = OmegaConf.load(cfg.args.cfg_path)
    merged = OmegaConf.merge(Config.build_runner_config(project), Config.build_model_config(project),
                             Config.build_dataset_config(project))
    defaults = model_defaults(merged.model)
    known = {*flat_keys(merged), *(f"run.{key}" for key in RUN_KEYS),
             *(f"model.{key}" for key in ("bert_path", "vit_path", "pretrained", "finetuned")),
             *(f"model.{f.name}" for f in (fields(defaults) if defaults else ()))}
    for option in options:
        key = option.split("=", 1)[0]
        if "=" not in option:
            raise OptionsError(f"--options {option!r}: expected key=value")
        if key not in known and OmegaConf.select(merged, key, default=None) is None:
            raise OptionsError(f"--options {key!r}: no such key in {cfg.args.cfg_path} (or its model/dataset "
                               f"defaults, or lavis_ext.run_options.RunOptions){nearest(key, known)}")


def flat_keys(config, prefix: str = "") -> list[str]:
    """Dotted paths of every key in ``config`` (a DictConfig), mappings included; interpolations
    are not resolved (an unset environment variable must not make a key unknown)."""
    keys = []
    for key, value in config.items_ex(resolve=False):
        path = f"{prefix}{key}"
        keys.append(path)
        if OmegaConf.is_dict(value):
            keys += flat_keys(value, f"{path}.")
    return keys


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
    check_model(args.cfg_path, args.options)
    cfg = Config(args)
    check_options(cfg, args.options)
    run_cfg = cfg.run_cfg
    check_output_dir(run_cfg)
    options = RunOptions.from_run_cfg(run_cfg)
    init_distributed_mode(run_cfg)
    setup_seeds(options.seed)
    setup_logger()
    job_id = decide_job_id(run_cfg, args.resume)
    if args.resume == "auto":
        run_cfg.resume_ckpt_path = str(Path(run_cfg.output_dir).expanduser().absolute() / job_id / "checkpoint_last.pth")
    elif args.resume:
        run_cfg.resume_ckpt_path = args.resume
    if evaluate:
        run_cfg.evaluate = True

    from lavis.tasks import setup_task

    task = setup_task(cfg)
    datasets = task.build_datasets(cfg)
    check_image_sizes(cfg.model_cfg, datasets)
    set_max_image_pixels(datasets, options.max_image_pixels)
    model = task.build_model(cfg)
    runner_cls = registry.get_runner_class(options.runner)
    if runner_cls is None:
        raise ConfigError(f"run.runner = {options.runner!r} is not a registered runner")
    runner = runner_cls(cfg=cfg, job_id=job_id, task=task, model=model, datasets=datasets)
    if evaluate:
        runner.evaluate(skip_reload=True)
    else:
        runner.train()
    if is_dist_avail_and_initialized():
        close = getattr(runner, "close", None)  # runner_ext's; a stock runner has none
        if close is not None:
            close()
        else:
            dist.barrier()
            dist.destroy_process_group()
    return runner


def main(argv: list[str] | None, evaluate: bool):
    """:func:`run`, with bad input reported as one line, ``error: <message>``, and exit code 2.

    Under torchrun, every rank but 0, and every rank on an unexpected exception (a peer that
    vanished mid-collective, a bug), first waits :data:`PEER_GRACE_S`: if another rank failed,
    torchrun stops this one meanwhile, and only the first failure is reported.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return exit_on_bad_input(lambda a: run(a, evaluate), argv)
    try:
        return run(argv, evaluate)
    except Exception as exc:
        bad_input = isinstance(exc, USER_ERRORS)
        if os.environ.get("RANK", "0") != "0" or not bad_input:
            time.sleep(PEER_GRACE_S)
        if not bad_input:
            raise
        write_error_line(exc, argv)
        sys.stdout.flush()  # tearing down the process group can take seconds; gone now, torchrun stops the rest
        os._exit(EXIT_BAD_INPUT)


def exit_on_bad_input(run_argv, argv: list[str] | None):
    """``run_argv(argv)`` in one process (the entry points' ``main``), with bad input reported by
    :func:`write_error_line` and exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return run_argv(argv)
    except USER_ERRORS as exc:
        write_error_line(exc, argv)
        sys.exit(EXIT_BAD_INPUT)


def write_error_line(exc: BaseException, argv: list[str]) -> None:
    """``error: <message>`` on stderr, after the traceback with ``--debug`` or ``LAVIS_EXT_DEBUG=1``
    (call it while ``exc`` is being handled)."""
    if "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        traceback.print_exc()
    sys.stderr.write(f"error: {error_line(exc)}\n")
    sys.stderr.flush()


def error_line(exc: BaseException) -> str:
    """The message of a bad-input error on one line (or its type's name, when it has none)."""
    return " ".join(str(exc).split()) or type(exc).__name__

