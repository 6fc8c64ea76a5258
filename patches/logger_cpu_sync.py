"""The metric logger syncs through a CUDA tensor.

Upstream: ``lavis/common/logger.py:43`` (``SmoothedValue.synchronize_between_processes``)
builds its all-reduce tensor with ``device="cuda"``; under gloo on CPU the first epoch
ends with ``AssertionError: Torch not compiled with CUDA enabled``.

Fix: reduce on the device the process group's backend uses (CUDA for NCCL, CPU otherwise).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def synchronize_between_processes(self) -> None:
    """Sum ``count`` and ``total`` over ranks (the deque stays local, as upstream)."""
    from lavis.common import dist_utils

    if not dist_utils.is_dist_avail_and_initialized():
        return
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([self.count, self.total], dtype=torch.float64, device=device)
    dist.barrier()
    dist.all_reduce(t)
    self.count, self.total = int(t[0].item()), t[1].item()


def apply() -> None:
    from lavis.common.logger import SmoothedValue

    SmoothedValue.synchronize_between_processes = synchronize_between_processes
