"""bench/gpu_check.sh cannot rot: its --dry-run (tiny sizes, CPU) runs every row and writes the JSON and table."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from conftest import REPO

MEASURED_ROWS = {  # the dry run's rows -> keys their numbers must have
    "stage-2 train step": {"lavis_ext_s", "hf_s", "ratio", "stability_steps", "nonfinite_losses"},
    "stage-2 train step, LoRA r=8": {"lavis_ext_s", "hf_s", "ratio", "nonfinite_losses"},
    "stage-2 train step, FSDP2 over 1 rank": {"lavis_ext_s", "hf_s", "ratio", "nonfinite_losses", "fsdp_units"},
    "greedy captioning, 20 tokens": {"lavis_ext_tok_s", "lavis_ext_dynamic_tok_s", "hf_tok_s", "ratio",
                                     "static_over_dynamic"},
    "stage-1 train step, batch 4": {"lavis_ext_s", "nonfinite_losses"},
}


def numbers(row: dict) -> list[float]:
    return [v for v in row.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]


def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "dry-run"
    rows = {r["row"]: r for r in report["rows"]}
    assert set(rows) == set(MEASURED_ROWS)
    for name, keys in MEASURED_ROWS.items():
        row = rows[name]
        assert keys <= set(row), f"{name}: missing {keys - set(row)}"
        assert all(math.isfinite(v) for v in numbers(row)), f"{name}: {row}"
        assert row.get("nonfinite_losses", 0) == 0
    assert rows["stage-2 train step, FSDP2 over 1 rank"]["fsdp_units"] > 0  # the model was sharded
    table = (tmp_path / "gpu_check.md").read_text().splitlines()
    assert sum(line.startswith("| ") for line in table) == 1 + len(rows)  # header and one line per row
