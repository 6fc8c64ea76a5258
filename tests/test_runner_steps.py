"""runner_ext's step logic on a one-layer probe model: gradient accumulation, non-finite skips (one
rank and two), bf16 autocast, and the fp16 GradScaler step.

Each training run records every optimizer step (tests/runner_probe.py: the parameters before the
step and the gradients it applies), so the checks compare values, not just when weights change.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from conftest import run_python, torchrun
from lavis_ext.runners.runner_ext import RunnerExt

PROBE = ["tests/runner_probe.py", "--cfg-path", "tests/configs/probe_tiny.yaml"]


def train_probe(env, output_dir: Path, *options: str, nproc: int = 0, timeout: int = 300):
    """Train the probe; returns the result, rank 0's metrics records and every rank's recorded steps."""
    output_dir.mkdir(parents=True)
    args = [*PROBE, "--options", f"run.output_dir={output_dir}", *options]
    env = dict(env, PROBE_STEPS_DIR=str(output_dir))
    result = torchrun(args, env, nproc=nproc, timeout=timeout) if nproc else run_python(args, env, timeout=timeout)
    records = [json.loads(line) for f in output_dir.glob("*/metrics.jsonl") for line in f.read_text().splitlines()]
    steps = [torch.load(p) for p in sorted(output_dir.glob("rank*.pt"))]
    return SimpleNamespace(result=result, records=records, steps=steps)


@pytest.fixture(scope="module")
def plain(tiny_env, tmp_path_factory):
    """The probe trained without accumulation, NaNs or autocast: 8 iterations of batch 2, a step each."""
    run = train_probe(tiny_env, tmp_path_factory.mktemp("plain") / "out")
    assert run.result.returncode == 0, run.result.stderr[-3000:]
    return run


def assert_same_step(step, reference, exact: bool = False):
    for name, (param, grad) in reference.items():
        if exact:
            assert torch.equal(step[name][0], param) and torch.equal(step[name][1], grad), name
        else:  # float rounding differs with the batch split: within 1e-5 of each tensor's largest entry
            for what, got, want in (("before the step", step[name][0], param), ("gradient", step[name][1], grad)):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item(), msg=f"{name} {what}")


def test_without_accumulation_every_batch_steps(plain):
    weights = [r["loss_probe_weight"] for r in plain.records]
    assert len(weights) == 8 and all(a != b for a, b in zip(weights, weights[1:]))
    (steps,) = plain.steps
    assert len(steps) == 8


def test_accumulation_equals_one_step_on_the_summed_batch(tiny_env, tmp_path):
    """2 batches of 2 accumulated take the step one batch of 4 takes: same gradient, same weights."""
    accumulated = train_probe(tiny_env, tmp_path / "accum", "run.accum_grad_iters=2")
    summed = train_probe(tiny_env, tmp_path / "batch4", "run.batch_size_train=4")
    for run in (accumulated, summed):
        assert run.result.returncode == 0, run.result.stderr[-3000:]
    weights = [r["loss_probe_weight"] for r in accumulated.records]  # before each iteration's step
    assert len(weights) == 8  # 16 captions / batch 2
    assert [weights[i] == weights[i + 1] for i in range(7)] == [True, False] * 3 + [True]
    (steps,), (reference,) = accumulated.steps, summed.steps
    assert len(steps) == len(reference) == 4
    for step, expected in zip(steps, reference):
        assert_same_step(step, expected)


def test_non_finite_loss_skips_the_step_and_training_goes_on(plain, tiny_env, tmp_path):
    run = train_probe(tiny_env, tmp_path / "nan", "model.nan_iters=[2,3]")
    assert run.result.returncode == 0, run.result.stderr[-3000:]
    assert [r["iter"] for r in run.records] == [0, 1, 4, 5, 6, 7]  # the NaN iterations are not logged
    assert "non-finite loss nan, step skipped (2 in a row)" in run.result.stderr
    (steps,), (plain_steps,) = run.steps, plain.steps
    assert len(steps) == 6
    assert_same_step(steps[1], plain_steps[1], exact=True)
    # the step at iteration 4 starts from exactly the weights the plain run had before iteration 2
    assert all(torch.equal(steps[2][n][0], plain_steps[2][n][0]) for n in plain_steps[2])


def test_one_rank_non_finite_skips_the_step_on_both(tiny_env, tmp_path):
    """Rank 1's loss is NaN at iteration 1, rank 0's is not: both skip it, together (no DDP hang)."""
    run = train_probe(tiny_env, tmp_path / "ranks", "run.distributed=True", "model.nan_iters=[1]",
                      "model.nan_ranks=[1]", nproc=2, timeout=120)
    assert run.result.returncode == 0, run.result.stderr[-3000:]
    assert [r["iter"] for r in run.records] == [0, 2, 3]  # rank 0 logs; 16 captions / (2 x 2 ranks)
    rank0, rank1 = run.steps
    assert len(rank0) == len(rank1) == 3
    for a, b in zip(rank0, rank1):  # DDP: the same weights and the same averaged gradient on both ranks
        assert_same_step(a, b, exact=True)


def test_too_many_non_finite_losses_in_a_row_abort(tiny_env, tmp_path):
    run = train_probe(tiny_env, tmp_path / "abort", "model.nan_iters=[1,2,3]", "run.max_nonfinite_steps=3")
    assert run.result.returncode != 0
    assert "NonFiniteLossError: 3 non-finite losses in a row" in run.result.stderr


def test_amp_bf16_autocasts_on_cpu(plain, tiny_env, tmp_path):
    run = train_probe(tiny_env, tmp_path / "bf16", "run.max_iters=2", "run.amp=bf16")
    assert run.result.returncode == 0, run.result.stderr[-3000:]
    assert [r["loss_probe_bf16"] for r in plain.records[:2]] == [0.0, 0.0]
    assert [r["loss_probe_bf16"] for r in run.records] == [1.0, 1.0]


# --------------------------------------------------------------------------- fp16 GradScaler


def runner_with(model: torch.nn.Module, amp, scaler=None, accum: int = 1) -> RunnerExt:
    """A RunnerExt holding only what its step needs: config, device, an SGD optimizer, the scaler."""
    runner = RunnerExt.__new__(RunnerExt)
    runner.config = SimpleNamespace(run_cfg=OmegaConf.create({"amp": amp, "device": "cpu", "accum_grad_iters": accum}))
    runner._device, runner._scaler = None, scaler
    runner._optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    return runner


def test_fp16_on_cpu_trains_in_fp32_without_a_scaler(caplog):
    """runner_ext only builds a (CUDA) GradScaler where fp16 autocast runs: on CUDA."""
    runner = runner_with(torch.nn.Linear(2, 1), amp="fp16")
    with caplog.at_level(logging.WARNING):
        dtype = runner.amp_dtype
    if torch.cuda.is_available():
        runner.config.run_cfg.device = "cuda"
        assert runner.amp_dtype == torch.float16 and isinstance(runner.scaler, torch.amp.GradScaler)
    else:
        assert dtype is None and runner.scaler is None
        assert "run.amp fp16 needs CUDA: training in fp32 on cpu" in caplog.text


def test_fp16_scaler_step_unscales_gradients():
    """The step through a GradScaler (a CPU one here: the same unscale/step/update calls) applies the
    true gradient, not the scaled one, also when accumulating."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x = torch.randn(4, 3)
    before = [p.detach().clone() for p in model.parameters()]
    reference = torch.nn.Linear(3, 1)
    reference.load_state_dict(model.state_dict())
    reference(x).pow(2).mean().backward()
    expected = [p.detach() - 0.5 * p.grad for p in reference.parameters()]

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    runner = runner_with(model, amp="fp16", scaler=scaler, accum=2)
    for i, half in enumerate((x[:2], x[2:])):
        runner._backward_and_step(model(half).pow(2).mean(), step_now=i == 1)
    for param, want, start in zip(model.parameters(), expected, before):
        assert not torch.equal(param, start)
        torch.testing.assert_close(param.detach(), want, rtol=1e-5, atol=1e-6)
    assert scaler.get_scale() == 1024.0


def test_fp16_scaler_skips_an_overflowing_step_and_lowers_the_scale():
    model = torch.nn.Linear(3, 1)
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    runner = runner_with(model, amp="fp16", scaler=scaler)
    # a finite loss whose scaled gradient overflows, as fp16 gradients do
    runner._backward_and_step((model.weight * 1e38).sum() + model.bias.sum(), step_now=True)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert scaler.get_scale() == 512.0
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step
