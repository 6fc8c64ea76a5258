"""runner_ext's step logic on a one-layer probe model: gradient accumulation, non-finite skips, bf16 autocast."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import run_python

PROBE = ["tests/runner_probe.py", "--cfg-path", "tests/configs/probe_tiny.yaml"]


def train_probe(env, output_dir: Path, *options: str):
    result = run_python([*PROBE, "--options", f"run.output_dir={output_dir}", *options], env)
    records = [json.loads(line) for f in output_dir.glob("*/metrics.jsonl") for line in f.read_text().splitlines()]
    return result, records


def test_accumulation_steps_the_optimizer_every_n_batches(tiny_env, tmp_path):
    result, records = train_probe(tiny_env, tmp_path, "run.accum_grad_iters=2")
    assert result.returncode == 0, result.stderr[-3000:]
    weights = [r["loss_probe_weight"] for r in records]  # before each iteration's step
    assert len(weights) == 8  # 16 captions / batch 2
    assert [weights[i] == weights[i + 1] for i in range(7)] == [True, False] * 3 + [True]


def test_without_accumulation_every_batch_steps(tiny_env, tmp_path):
    _, records = train_probe(tiny_env, tmp_path)
    weights = [r["loss_probe_weight"] for r in records]
    assert all(a != b for a, b in zip(weights, weights[1:]))


def test_non_finite_loss_skips_the_step_and_training_goes_on(tiny_env, tmp_path):
    result, records = train_probe(tiny_env, tmp_path, "model.nan_iters=[2,3]")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["iter"] for r in records] == [0, 1, 4, 5, 6, 7]  # the NaN iterations are not logged
    weights = {r["iter"]: r["loss_probe_weight"] for r in records}
    assert weights[1] != weights[4]  # the step after iteration 1 happened; 2 and 3 changed nothing more
    assert "non-finite loss nan, step skipped (2 in a row)" in result.stderr


def test_too_many_non_finite_losses_in_a_row_abort(tiny_env, tmp_path):
    result, _ = train_probe(tiny_env, tmp_path, "model.nan_iters=[1,2,3]", "run.max_nonfinite_steps=3")
    assert result.returncode != 0
    assert "NonFiniteLossError: 3 non-finite losses in a row" in result.stderr


def test_amp_bf16_autocasts_on_cpu(tiny_env, tmp_path):
    _, plain = train_probe(tiny_env, tmp_path / "fp32", "run.max_iters=2")
    result, bf16 = train_probe(tiny_env, tmp_path / "bf16", "run.max_iters=2", "run.amp=bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["loss_probe_bf16"] for r in plain] == [0.0, 0.0]
    assert [r["loss_probe_bf16"] for r in bf16] == [1.0, 1.0]
