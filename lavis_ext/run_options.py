"""The ``run.*`` options lavis-ext reads beyond LAVIS's own, declared once with types and defaults.

``--options`` checking (:func:`lavis_ext.cli.check_options`), ``runner_ext``, lavis-ext's tasks
and the README's option table (:func:`option_table`) all come from :class:`RunOptions`. LAVIS's
own run keys (``lr_sched``, ``init_lr``, ``batch_size_train``, ``num_beams`` ...) keep LAVIS's
meaning and defaults.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from lavis_ext.errors import ConfigError
from lavis_ext.text_zh import SEGMENTERS

AMP_CHOICES = ("bf16", "fp16", "false")
DATA_PARALLEL_CHOICES = ("ddp", "fsdp")
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default (Image.MAX_IMAGE_PIXELS)


def _option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RunOptions:
    """Run options with their defaults; build with :meth:`from_run_cfg`, which checks values."""

    runner: str = _option("runner_base", "registered runner; lavis-ext's projects use `runner_ext`")
    device: str = _option("auto", "`auto` (CUDA when available), `cpu` or `cuda`")
    seed: int = _option(42, "rank r seeds Python, NumPy and torch with seed + r")
    amp: str = _option("false", "autocast of the training step: `bf16`, `fp16` (CUDA, with a GradScaler) or `false`")
    accum_grad_iters: int = _option(1, "batches per optimizer step (gradient accumulation)")
    save_every_iters: int = _option(0, "also save `checkpoint_last.pth` every N iterations; 0: at epoch ends only")
    max_iters: int = _option(0, "stop after N iterations (smoke runs); 0: all epochs")
    max_nonfinite_steps: int = _option(10, "abort after N non-finite losses in a row (each is skipped)")
    resume_ckpt_path: str = _option("", "checkpoint to resume from (`--resume` sets it)")
    data_parallel: str = _option("ddp", "distributed training: `ddp`, or `fsdp` (FSDP2: parameters, gradients and "
                                 "optimizer state sharded across ranks; refuses `valid_splits`/`test_splits`: "
                                 "evaluate its checkpoint with `evaluate.py`)")
    find_unused_parameters: bool = _option(False, "DDP's `find_unused_parameters`")
    length_penalty: float | None = _option(None, "beam-search length penalty of evaluation; unset: the model's")
    max_image_pixels: int = _option(DEFAULT_MAX_IMAGE_PIXELS, "larger images are bad samples (decompression bombs)")
    segmenter: str = _option("", "score Chinese captions on `jieba` words or `char`acters; unset: English")

    @classmethod
    def from_run_cfg(cls, run_cfg: Mapping[str, Any]) -> RunOptions:
        """The declared options of ``run_cfg`` (other keys are LAVIS's), typed and checked."""
        values = {}
        for option in fields(cls):
            value = run_cfg.get(option.name)
            if value is not None:
                values[option.name] = _typed(option.name, value, type(option.default) if option.default is not None
                                             else float)
        if values.get("amp") == "true":  # LAVIS's `amp: True` means fp16 autocast
            values["amp"] = "fp16"
        options = cls(**values)
        if options.amp not in AMP_CHOICES:
            raise ConfigError(f"run.amp = {options.amp!r}: expected one of {', '.join(AMP_CHOICES)}")
        if options.data_parallel not in DATA_PARALLEL_CHOICES:
            raise ConfigError(f"run.data_parallel = {options.data_parallel!r}: expected one of "
                              f"{', '.join(DATA_PARALLEL_CHOICES)}")
        if options.segmenter and options.segmenter not in SEGMENTERS:
            raise ConfigError(f"run.segmenter = {options.segmenter!r}: expected one of {list(SEGMENTERS)} "
                              "(Chinese captions), or no key (English)")
        if options.accum_grad_iters < 1:
            raise ConfigError(f"run.accum_grad_iters = {options.accum_grad_iters}: expected 1 or more")
        return options


def _typed(name: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"run.{name} = {value!r}: expected true or false")
    if kind is str:
        return str(value).lower() if name == "amp" else str(value)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"run.{name} = {value!r}: expected {kind.__name__}") from None


def nearest(key: str, known: Iterable[str]) -> str:
    """`` (nearest: a, b)`` for an unknown ``key``, or ``""`` when nothing is close."""
    close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
    return f" (nearest: {', '.join(close)})" if close else ""


def option_table() -> str:
    """The README's table of run options, made from :class:`RunOptions`."""
    rows = ["| `run.` key | default | what |", "|---|---|---|"]
    for option in fields(RunOptions):
        default = "unset" if option.default is None or option.default == "" else f"`{option.default}`"
        rows.append(f"| `{option.name}` | {default} | {option.metadata['help']} |")
    return "\n".join(rows)
