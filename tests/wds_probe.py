"""train.py with stage 1's model recording what it trains on, for tests/test_webdataset.py.

Every forward of ``blip2_qformer_ext`` appends ``{"epoch", "keys"}`` (the webdataset keys of its
batch) to ``$WDS_PROBE_DIR/rank<r>.jsonl``, so a test can count which samples each rank saw.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lavis_ext  # noqa: F401  (patches, registry)
from lavis.common.dist_utils import get_rank
from lavis.common.registry import registry

from lavis_ext.cli import main

model_cls = registry.get_model_class("blip2_qformer_ext")
forward = model_cls.forward


def recording_forward(self, samples):
    record = {"epoch": samples["epoch"], "keys": list(samples["key"])}
    with open(Path(os.environ["WDS_PROBE_DIR"]) / f"rank{get_rank()}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return forward(self, samples)


model_cls.forward = recording_forward

if __name__ == "__main__":
    main(sys.argv[1:], evaluate=False)
