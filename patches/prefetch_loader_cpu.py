"""The runner's data loader wrapper needs CUDA.

Upstream: ``lavis/runners/runner_base.py:538`` wraps every map-style loader in
``PrefetchLoader``, whose constructor (``lavis/datasets/datasets/dataloader_utils.py:56``)
creates a ``torch.cuda.Stream()``; on CPU torch that fails before the first batch.

Fix: without CUDA the wrapper passes batches through unchanged; with CUDA it is upstream's
stream-prefetching loader. ``RunnerBase.create_loaders`` builds it inside a nested function,
so the name is replaced where the runner looks it up.
"""
from __future__ import annotations

import torch


def apply() -> None:
    from lavis.datasets.datasets import dataloader_utils
    from lavis.runners import runner_base, runner_iter

    upstream = dataloader_utils.PrefetchLoader
    if getattr(runner_base.PrefetchLoader, "_lavis_ext", False):
        return

    class PrefetchLoader(upstream):
        _lavis_ext = True

        def __init__(self, loader):
            self.loader = loader
            self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None

        def __iter__(self):
            if self.stream is None:
                return iter(self.loader)
            return super().__iter__()

    for module in (dataloader_utils, runner_base, runner_iter):
        if hasattr(module, "PrefetchLoader"):
            module.PrefetchLoader = PrefetchLoader
