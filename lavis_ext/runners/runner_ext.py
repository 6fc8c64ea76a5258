"""``runner_ext``: LAVIS's runner, fixed for CPU/gloo and made to resume the same run.

Registered under a new name; our project YAMLs select it with ``run.runner: runner_ext``.
What it changes in ``lavis/runners/runner_base.py`` (1.0.2):

- ``model`` (``:85-95``) wrapped the model only if it was not yet on the device, so on CPU
  it returned ``None``; DDP got ``device_ids=[gpu]`` even without GPUs. Evaluation-only runs
  are not wrapped at all (each rank predicts its shard; the tasks gather the results).
- ``train`` (``:406``) called ``dist.barrier()`` without a process group.
- ``_save_checkpoint`` (``:571-579``) dropped frozen weights, but ``_load_checkpoint``
  (``:628``) loaded strictly, so resuming from LAVIS's own checkpoints failed. Here the
  missing keys must be exactly the frozen parameters, and nothing may be unexpected.
- ``run.data_parallel: fsdp`` shards the model with FSDP2 instead of wrapping it in DDP
  (:mod:`lavis_ext.runners.fsdp`); its checkpoints have the same format.
- Training is this runner's own loop: autocast by ``run.amp`` (``bf16``/``fp16``/``false``),
  gradient accumulation, skipping of non-finite losses, atomic checkpoints holding the
  optimizer, scaler, position and RNG states, and mid-epoch resume that continues the run
  bit-for-bit (with ``num_workers: 0``; with workers the data order is still exact).

Run options it reads beyond LAVIS's are declared in :class:`lavis_ext.run_options.RunOptions`.
"""
from __future__ import annotations

import functools
import gc
import json
import logging
import os
import random
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from lavis.common.dist_utils import get_rank, get_world_size, is_dist_avail_and_initialized, is_main_process
from lavis.common.registry import registry
from lavis.runners.runner_base import RunnerBase
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import ChainDataset, DataLoader, Dataset, IterableDataset
from tqdm import tqdm

from lavis_ext.checkpoint import (atomic_save, atomic_write_text, load_checkpoint_file, load_partial_state,
                                  remove_stale_temporaries, temporary_path)
from lavis_ext.datasets.webdataset import WebDatasetCaptions
from lavis_ext.errors import ConfigError, LavisExtError
from lavis_ext.run_options import RunOptions
from lavis_ext.runners.fsdp import (full_optimizer_state_dict, full_trainable_state_dict, load_full_model_state,
                                    load_full_optimizer_state, parameter_bytes, shard_model)
from lavis_ext.runners.sampler import EpochSampler

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "checkpoint_last.pth"
METRICS_FILE = "metrics.jsonl"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(LavisExtError, RuntimeError):
    """Raised after ``run.max_nonfinite_steps`` consecutive non-finite losses."""


def barrier() -> None:
    """``dist.barrier()`` when there is a process group, nothing otherwise."""
    if is_dist_avail_and_initialized():
        dist.barrier()


def move_to(samples, device: torch.device):
    """Move every tensor in a (nested) batch to ``device``."""
    if torch.is_tensor(samples):
        return samples.to(device, non_blocking=True)
    if isinstance(samples, dict):
        return {k: move_to(v, device) for k, v in samples.items()}
    if isinstance(samples, (list, tuple)):
        return type(samples)(move_to(v, device) for v in samples)
    return samples


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_latest_checkpoint(output_root: Path) -> Path | None:
    """The most recently written ``checkpoint_last.pth`` under ``output_root/<job_id>/``."""
    candidates = sorted(output_root.glob(f"*/{LAST_CHECKPOINT}"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


@registry.register_runner("runner_ext")
class RunnerExt(RunnerBase):
    def __init__(self, cfg, task, model, datasets, job_id):
        super().__init__(cfg, task, model, datasets, job_id)
        logger.info("run options: %s", self.options)  # bad values fail here, before anything runs
        self._refuse_sharded_evaluation()
        self.start_iter = 0  # batches of ``start_epoch`` already trained (mid-epoch resume)
        self.global_step = 0
        self._train_sampler: EpochSampler | None = None

    # ------------------------------------------------------------------ set-up

    @functools.cached_property
    def options(self) -> RunOptions:
        return RunOptions.from_run_cfg(self.config.run_cfg)

    def setup_output_dir(self):
        """Absolute output dirs, shared by all ranks (``job_id`` is decided on rank 0)."""
        output_dir = Path(self.config.run_cfg.output_dir).expanduser().absolute() / self.job_id
        result_dir = output_dir / "result"
        if is_main_process():
            result_dir.mkdir(parents=True, exist_ok=True)
        barrier()
        # register_path refuses to overwrite; a second runner in one process must not fail
        registry.mapping["paths"]["output_dir"] = str(output_dir)
        registry.mapping["paths"]["result_dir"] = str(result_dir)
        self.output_dir, self.result_dir = output_dir, result_dir

    @property
    def device(self) -> torch.device:
        """``run.device``; ``auto`` is CUDA when available, else CPU."""
        if self._device is None:
            name = self.options.device
            self._device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
        return self._device

    def _refuse_sharded_evaluation(self) -> None:
        """FSDP training does not evaluate: a sharded model decodes only with every rank gathering
        the same layers in lockstep, which evaluation on each rank's own share of the data breaks."""
        if self.options.data_parallel != "fsdp" or self.evaluate_only:
            return
        splits = {key: list(self.config.run_cfg.get(key) or []) for key in ("valid_splits", "test_splits")}
        named = ", ".join(f"run.{key} = {value}" for key, value in splits.items() if value)
        if named:
            raise ConfigError(f"run.data_parallel = 'fsdp' with {named}: a sharded model is not evaluated "
                              "during training; train without these splits and evaluate the checkpoint with "
                              "evaluate.py")

    @property
    def uses_fsdp(self) -> bool:
        """Training distributed with ``run.data_parallel: fsdp``."""
        return self.options.data_parallel == "fsdp" and self.use_distributed and not self.evaluate_only

    @property
    def model(self):
        """The model on ``run.device``; when training distributed, DDP-wrapped (CPU: ``device_ids=None``)
        or sharded in place by FSDP2 (``run.data_parallel``). LAVIS's ``optimizer`` property reads
        this, so the optimizer is always built after the wrap (for FSDP: on the sharded parameters)."""
        if self._wrapped_model is None:
            self._model = self._model.to(self.device)
            if self.uses_fsdp:
                units = shard_model(self._model, self.device, get_world_size())
                local, full = parameter_bytes(self._model)
                per_rank = [None] * get_world_size()
                dist.all_gather_object(per_rank, local)
                logger.info("fsdp: units %s and the root; parameter bytes per rank: %d of %d (ranks: %s)",
                            units, local, full, per_rank)
                self._wrapped_model = self._model
            elif self.use_distributed and not self.evaluate_only:
                device_ids = [self.config.run_cfg.gpu] if self.device.type == "cuda" else None
                self._wrapped_model = DDP(self._model, device_ids=device_ids,
                                          find_unused_parameters=self.options.find_unused_parameters)
            else:
                self._wrapped_model = self._model
        return self._wrapped_model

    def close(self) -> None:
        """Leave the process group together, in order: all ranks meet (rank 0 may still be
        scoring), DDP is freed, then the group is destroyed. DDP holds a reference to the group:
        freed after ``destroy_process_group`` (when the runner is collected) a rank could hang in
        the gloo teardown, and exiting with a live group could abort with "terminate called
        without an active exception". An FSDP-sharded model holds the group itself (its shards
        are of no use without it), so the runner lets go of it, its optimizer and scheduler too."""
        if isinstance(self._wrapped_model, FSDPModule):
            self._model = self._optimizer = self._lr_sched = None
        self._wrapped_model = None  # the bare model stays (DDP)
        gc.collect()
        if is_dist_avail_and_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def unwrap_dist_model(self, model):
        """The bare model: DDP's ``module``; FSDP2 shards the module in place, so it is the model."""
        return model.module if isinstance(model, DDP) else model

    @property
    def amp_dtype(self) -> torch.dtype | None:
        amp = self.options.amp
        if amp == "false":
            return None
        if amp == "fp16" and self.device.type != "cuda":
            logger.warning("run.amp fp16 needs CUDA: training in fp32 on %s", self.device)
            return None
        return AMP_DTYPES[amp]

    def autocast(self):
        dtype = self.amp_dtype
        return torch.autocast(device_type=self.device.type, dtype=dtype) if dtype else nullcontext()

    @property
    def scaler(self):
        if self._scaler is None and self.amp_dtype == torch.float16:
            self._scaler = torch.amp.GradScaler("cuda")
        return self._scaler

    @property
    def seed(self) -> int:
        return self.options.seed

    @property
    def accum_grad_iters(self) -> int:
        return self.options.accum_grad_iters

    def create_loaders(self, datasets, num_workers, batch_sizes, is_trains, collate_fns, dataset_ratios=None):
        """Plain ``DataLoader``s. Train uses :class:`EpochSampler` (webdataset shards deal themselves
        to ranks and workers, and take its ``set_epoch``); eval shards without shuffling."""
        loaders = []
        for dataset, bsz, is_train, collate_fn in zip(datasets, batch_sizes, is_trains, collate_fns):
            if isinstance(dataset, ChainDataset) and len(dataset.datasets) == 1:
                dataset = dataset.datasets[0]  # LAVIS's concat_datasets chains each webdataset (data_utils.py:144)
            # an own generator: creating the loader iterator must not draw from the global RNG,
            # or a resumed run would see different random numbers than the uninterrupted one
            generator = torch.Generator().manual_seed(self.seed + get_rank())
            common = dict(batch_size=bsz, num_workers=num_workers, collate_fn=collate_fn, generator=generator,
                          pin_memory=self.device.type == "cuda", persistent_workers=False)
            if is_train and isinstance(dataset, WebDatasetCaptions):
                dataset.batch_size = bsz
                self._train_sampler = dataset
                loaders.append(DataLoader(dataset, drop_last=True, **dict(common, collate_fn=dataset.collater)))
                continue
            if not isinstance(dataset, Dataset) or isinstance(dataset, (list, tuple, IterableDataset)):
                raise TypeError(f"runner_ext trains on map-style datasets or webdataset shards (wds_caption), "
                                f"not {type(dataset).__name__}")
            if is_train:
                self._train_sampler = EpochSampler(len(dataset), seed=self.seed, rank=get_rank(),
                                                   world_size=get_world_size())
                loaders.append(DataLoader(dataset, sampler=self._train_sampler, drop_last=True, **common))
            else:
                sampler = None
                if self.use_distributed and self.use_dist_eval_sampler:
                    sampler = torch.utils.data.DistributedSampler(dataset, shuffle=False)
                loaders.append(DataLoader(dataset, sampler=sampler, shuffle=False, **common))
        return loaders

    # ------------------------------------------------------------------ training

    def train(self):
        self.log_config()
        if not self.evaluate_only and self.resume_ckpt_path:
            self._load_checkpoint(self.resume_ckpt_path)
        last_epoch = self.start_epoch
        for epoch in range(self.start_epoch, self.max_epoch):
            last_epoch = epoch
            if not self.evaluate_only:
                stats = self.train_epoch(epoch)
                self.log_stats(split_name="train", stats=stats)
                if self.reached_max_iters:
                    break
            for split_name in self.valid_splits:
                val_log = self.eval_epoch(split_name=split_name, cur_epoch=epoch)
                if val_log is not None and is_main_process():
                    self.log_stats(val_log, split_name)
            if self.evaluate_only:
                break
            barrier()
        self.evaluate(cur_epoch=last_epoch, skip_reload=True)

    @property
    def reached_max_iters(self) -> bool:
        return 0 < self.options.max_iters <= self.global_step

    def train_epoch(self, epoch: int) -> dict:
        model, loader, sampler = self.model, self.train_loader, self._train_sampler
        save_every, max_nonfinite = self.options.save_every_iters, self.options.max_nonfinite_steps
        start = self.start_iter if epoch == self.start_epoch else 0
        sampler.set_epoch(epoch, start * loader.batch_size)
        iters_per_epoch = start + len(loader)
        model.train()

        totals: dict[str, float] = {}
        steps = nonfinite_in_a_row = 0
        progress = tqdm(enumerate(loader, start=start), total=iters_per_epoch, initial=start,
                        desc=f"epoch {epoch}", disable=not is_main_process(), dynamic_ncols=True)
        for i, samples in progress:
            self.lr_scheduler.step(cur_epoch=epoch, cur_step=i)
            samples = move_to(samples, self.device)
            samples.update(epoch=epoch, num_iters_per_epoch=iters_per_epoch, iters=i)
            with self.autocast():
                output = model(samples)
            if not self._all_finite(output["loss"]):
                nonfinite_in_a_row += 1
                logger.warning("epoch %d iter %d: non-finite loss %s, step skipped (%d in a row)",
                               epoch, i, output["loss"].item(), nonfinite_in_a_row)
                self.optimizer.zero_grad(set_to_none=True)
                if nonfinite_in_a_row >= max_nonfinite:
                    raise NonFiniteLossError(f"{nonfinite_in_a_row} non-finite losses in a row (run.max_nonfinite_steps)")
                continue
            nonfinite_in_a_row = 0
            self._backward_and_step(output["loss"], step_now=(i + 1) % self.accum_grad_iters == 0)

            self.global_step += 1
            steps += 1
            losses = {k: v.item() for k, v in output.items() if k.startswith("loss") and torch.is_tensor(v)}
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + v
            lr = self.optimizer.param_groups[0]["lr"]
            self._log_iteration(epoch, i, lr, losses)
            progress.set_postfix(loss=f"{losses['loss']:.4f}", lr=f"{lr:.2e}")
            if self.reached_max_iters or (save_every and self.global_step % save_every == 0 and i + 1 < iters_per_epoch):
                self._save_checkpoint(epoch, next_iter=i + 1)
            if self.reached_max_iters:
                break
        progress.close()
        self.start_iter = 0
        if not self.reached_max_iters:
            self._save_checkpoint(epoch)
        stats = {k: f"{v / max(steps, 1):.4f}" for k, v in totals.items()}
        stats["lr"] = f"{self.optimizer.param_groups[0]['lr']:.6f}"
        return stats

    def _backward_and_step(self, loss: torch.Tensor, step_now: bool) -> None:
        """Backward of ``loss / accum_grad_iters``; an optimizer step every ``accum_grad_iters`` batches."""
        loss = loss / self.accum_grad_iters
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        if not step_now:
            return
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """True on every rank iff the loss is finite on every rank (so all ranks skip together)."""
        finite = torch.tensor([float(torch.isfinite(loss.detach()).all())], device=self.device)
        if is_dist_avail_and_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def _log_iteration(self, epoch: int, i: int, lr: float, losses: dict) -> None:
        if not is_main_process():
            return
        record = {"step": self.global_step, "epoch": epoch, "iter": i, "lr": lr}
        record.update(losses)
        with open(self.output_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, cur_epoch, is_best=False, next_iter: int | None = None):
        """Atomically write ``checkpoint_last.pth``; at the end of an epoch (``next_iter=None``)
        also ``checkpoint_{epoch}.pth``, the name LAVIS uses and stage 2 loads.

        Every rank contributes its RNG state (and, with FSDP, its shards); rank 0 writes.
        """
        rng_states = [None] * get_world_size()
        if is_dist_avail_and_initialized():
            dist.all_gather_object(rng_states, rng_state())
        else:
            rng_states = [rng_state()]
        model_state, optimizer_state = self._full_states()
        if is_main_process():
            end_of_epoch = next_iter is None
            checkpoint = {
                "model": model_state,
                "optimizer": optimizer_state,
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "config": self.config.to_dict(),
                "epoch": cur_epoch,
                "next_iter": 0 if end_of_epoch else next_iter,
                "global_step": self.global_step,
                "rng_states": rng_states,
            }
            last = self.output_dir / LAST_CHECKPOINT
            atomic_save(checkpoint, last)
            if end_of_epoch:
                named = self.output_dir / f"checkpoint_{'best' if is_best else cur_epoch}.pth"
                tmp = temporary_path(named)
                tmp.unlink(missing_ok=True)
                os.link(last, tmp)
                os.replace(tmp, named)
            logger.info("saved checkpoint: epoch %d, step %d -> %s", cur_epoch, self.global_step, last)
        barrier()

    def _full_states(self) -> tuple[dict, dict]:
        """Rank 0's trainable weights (frozen ones left out) and optimizer state, in full; ``{}`` on
        the other ranks. An FSDP model gathers them from the shards: every rank must call this."""
        model = self.unwrap_dist_model(self.model)
        if self.uses_fsdp:
            return full_trainable_state_dict(model), full_optimizer_state_dict(model, self.optimizer)
        if not is_main_process():
            return {}, {}
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        return {k: v for k, v in model.state_dict().items() if k not in frozen}, self.optimizer.state_dict()

    def _load_checkpoint(self, url_or_filename):
        """Resume: weights, optimizer, scaler, position and every rank's RNG state."""
        path = Path(url_or_filename)
        # with FSDP every rank reads the whole checkpoint: into CPU memory, and keeps its shards on the device
        checkpoint = load_checkpoint_file(path, "run.resume_ckpt_path (--resume)",
                                          map_location="cpu" if self.uses_fsdp else self.device)
        model = self.unwrap_dist_model(self.model)
        if self.uses_fsdp:
            load_full_model_state(model, checkpoint["model"], str(path))
            load_full_optimizer_state(model, self.optimizer, checkpoint["optimizer"], str(path))
        else:
            load_partial_state(model, checkpoint["model"], str(path))
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        next_iter = checkpoint.get("next_iter", 0)
        self.start_epoch = checkpoint["epoch"] + (0 if next_iter else 1)
        self.start_iter = next_iter
        self.global_step = checkpoint.get("global_step", 0)
        rng_states = checkpoint.get("rng_states")
        if rng_states:
            if len(rng_states) != get_world_size():
                logger.warning("checkpoint was written by %d processes, resuming with %d: RNG states not restored",
                               len(rng_states), get_world_size())
            else:
                set_rng_state(rng_states[get_rank()])
        if is_main_process():
            self._clean_job_dir()
        logger.info("resumed from %s at epoch %d, iteration %d", path, self.start_epoch, self.start_iter)

    def _clean_job_dir(self) -> None:
        """After a resume the job dir reads as if the run had never stopped: ``metrics.jsonl`` keeps
        only the steps up to the checkpoint (this run logs the later ones again), and the temporary
        files of an interrupted save are removed."""
        for stale in remove_stale_temporaries(self.output_dir):
            logger.info("removed %s, left by an interrupted save", stale)
        metrics = self.output_dir / METRICS_FILE
        if not metrics.is_file():
            return
        kept = []
        for line in metrics.read_text().splitlines():
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):  # a line cut short by the interruption
                continue
            if step <= self.global_step:
                kept.append(line + "\n")
        atomic_write_text(metrics, "".join(kept))

    @property
    def resume_ckpt_path(self):
        return self.options.resume_ckpt_path or None
