"""train.py with a one-layer probe model registered, for tests/test_runner_steps.py.

The probe's loss can be made NaN at chosen iterations (``model.nan_iters``), and it logs through
runner_ext's per-iteration metrics what the runner did to it: the sum of its weight before the
step (``loss_probe_weight``) and whether its forward ran under bf16 autocast (``loss_probe_bf16``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import lavis_ext  # noqa: F401  (patches, registry)
from lavis.common.registry import registry
from lavis.models.base_model import BaseModel
from lavis_ext.cli import run


@registry.register_model("probe_linear")
class ProbeLinear(BaseModel):
    PRETRAINED_MODEL_CONFIG_DICT = {"default": str(Path(__file__).parent / "configs" / "probe_model.yaml")}

    def __init__(self, nan_iters):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 32 * 32, 1)
        self.nan_iters = set(nan_iters)

    @classmethod
    def from_config(cls, cfg):
        return cls(list(cfg.get("nan_iters", [])))

    def forward(self, samples):
        out = self.proj(samples["image"].flatten(1))
        loss = out.float().pow(2).mean()
        if samples["iters"] in self.nan_iters:
            loss = loss * float("nan")
        return {"loss": loss, "loss_probe_weight": self.proj.weight.detach().sum(),
                "loss_probe_bf16": torch.tensor(float(out.dtype == torch.bfloat16))}


if __name__ == "__main__":
    run(sys.argv[1:], evaluate=False)
