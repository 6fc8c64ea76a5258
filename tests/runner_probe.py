"""train.py with a one-layer probe model registered, for tests/test_runner_steps.py.

The probe's loss can be made NaN at chosen iterations (``model.nan_iters``), on every rank or
only on ``model.nan_ranks``. It logs through runner_ext's per-iteration metrics what the runner
did to it: the sum of its weight before the step (``loss_probe_weight``) and whether its forward
ran under bf16 autocast (``loss_probe_bf16``). With ``$PROBE_STEPS_DIR`` set, every optimizer step
of every rank is recorded in ``<dir>/rank<r>.pt``: the parameters just before the step and the
gradients the step applies.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import lavis_ext  # noqa: F401  (patches, registry)
from lavis.common.dist_utils import get_rank
from lavis.common.registry import registry
from lavis.models.base_model import BaseModel
from lavis_ext.cli import run


@registry.register_model("probe_linear")
class ProbeLinear(BaseModel):
    PRETRAINED_MODEL_CONFIG_DICT = {"default": str(Path(__file__).parent / "configs" / "probe_model.yaml")}
    built: "ProbeLinear | None" = None  # the probe of this process, for the step recorder

    def __init__(self, nan_iters, nan_ranks):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 32 * 32, 1)
        self.nan_iters, self.nan_ranks = set(nan_iters), set(nan_ranks)
        ProbeLinear.built = self

    @classmethod
    def from_config(cls, cfg):
        return cls(list(cfg.get("nan_iters", [])), list(cfg.get("nan_ranks", [])))

    def forward(self, samples):
        out = self.proj(samples["image"].flatten(1))
        loss = out.float().pow(2).mean()
        if samples["iters"] in self.nan_iters and (not self.nan_ranks or get_rank() in self.nan_ranks):
            loss = loss * float("nan")
        return {"loss": loss, "loss_probe_weight": self.proj.weight.detach().sum(),
                "loss_probe_bf16": torch.tensor(float(out.dtype == torch.bfloat16))}


def record_steps(directory: Path) -> None:
    """Record, before every optimizer step, the probe's parameters and their gradients."""
    steps = []

    def before_step(optimizer, args, kwargs):
        probe = ProbeLinear.built
        steps.append({name: (p.detach().clone(), p.grad.detach().clone()) for name, p in probe.named_parameters()})
        torch.save(steps, directory / f"rank{get_rank()}.pt")

    register_optimizer_step_pre_hook(before_step)


if __name__ == "__main__":
    if os.environ.get("PROBE_STEPS_DIR"):
        record_steps(Path(os.environ["PROBE_STEPS_DIR"]))
    run(sys.argv[1:], evaluate=False)
