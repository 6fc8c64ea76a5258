"""A deterministic, resumable training sampler."""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """Shuffled indices for one epoch and one rank, reproducible from ``(seed, epoch)``.

    Like ``DistributedSampler(drop_last=True)``: every rank gets ``len(dataset) // world``
    indices of one shared permutation. ``start`` skips the first indices of this rank's
    share, so a run resumed mid-epoch sees exactly the batches it had not yet seen,
    without loading the skipped ones.
    """

    def __init__(self, num_samples: int, *, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if num_samples < world_size:
            raise ValueError(f"{num_samples} training samples cannot be split over {world_size} processes")
        self.num_samples, self.seed, self.rank, self.world_size, self.shuffle = (
            num_samples, seed, rank, world_size, shuffle)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        per_rank = self.num_samples // self.world_size
        return order[self.rank * per_rank:(self.rank + 1) * per_rank]

    def __iter__(self):
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        return self.num_samples // self.world_size - self.start
