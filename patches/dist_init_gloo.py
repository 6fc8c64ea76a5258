"""LAVIS's distributed init assumes CUDA and NCCL.

Upstream: ``lavis/common/dist_utils.py:72`` calls ``torch.cuda.set_device`` (fails on CPU
torch), ``:73`` hard-codes ``backend="nccl"``, and ``:64`` (SLURM) takes
``rank % torch.cuda.device_count()`` (division by zero without GPUs). A CPU ``torchrun``
job cannot start.

Fix: NCCL and ``set_device`` when CUDA is available, gloo otherwise. The result is the same
``args`` fields LAVIS sets (``rank``, ``world_size``, ``gpu``, ``distributed``,
``dist_backend``), so the rest of LAVIS is unchanged.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def init_distributed_mode(args) -> None:
    from lavis.common.dist_utils import setup_for_distributed

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
        args.gpu = int(os.environ.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in os.environ:
        args.rank = int(os.environ["SLURM_PROCID"])
        args.world_size = int(os.environ["SLURM_NTASKS"])
        args.gpu = args.rank % max(torch.cuda.device_count(), 1)
    else:
        print("Not using distributed mode")
        args.distributed = False
        return

    args.distributed = True
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(args.gpu)
    args.dist_backend = "nccl" if use_cuda else "gloo"
    print(f"| distributed init (rank {args.rank}, world {args.world_size}, {args.dist_backend}): {args.dist_url}",
          flush=True)
    if not dist.is_initialized():
        dist.init_process_group(backend=args.dist_backend, init_method=args.dist_url, world_size=args.world_size,
                                rank=args.rank, timeout=datetime.timedelta(minutes=60))
    dist.barrier()
    setup_for_distributed(args.rank == 0)


def apply() -> None:
    from lavis.common import dist_utils

    dist_utils.init_distributed_mode = init_distributed_mode
