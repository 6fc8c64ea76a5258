"""plot_log reads runner_ext's metrics.jsonl and LAVIS's log.txt and writes PNGs."""
from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from lavis_ext.tools.plot_log import LogError, find_jobs, main, plot_stages, read_job


def write_metrics(job, steps: int = 50):
    job.mkdir(parents=True)
    with open(job / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            itc, lm = 2 * math.exp(-step / 20), 3 * math.exp(-step / 30)
            f.write(json.dumps({"step": step, "epoch": 0, "iter": step - 1, "lr": 1e-3, "loss": itc + lm,
                                "loss_itc": itc, "loss_lm": lm}) + "\n")
    return job


def write_lavis_log(job, epochs: int = 3):
    """As LAVIS's runner writes it: the config indented over many lines, then one line per epoch."""
    job.mkdir(parents=True)
    lines = [json.dumps({"run": {"task": "image_text_pretrain"}, "model": {"arch": "blip2"}}, indent=4)]
    lines += [json.dumps({"train_lr": "0.001", "train_loss": f"{4.0 / (e + 1):.3f}"}) for e in range(epochs)]
    (job / "log.txt").write_text("\n".join(lines) + "\n")
    return job


def test_reads_metrics_with_loss_parts(tmp_path):
    curve = read_job(write_metrics(tmp_path / "run" / "20240101"))
    assert curve.x_unit == "iteration" and curve.x[:3] == [1, 2, 3]
    assert list(curve.series) == ["loss", "loss_itc", "loss_lm"]
    assert curve.series["loss"][0] == pytest.approx(2 * math.exp(-1 / 20) + 3 * math.exp(-1 / 30))


def test_reads_lavis_log_past_its_config(tmp_path):
    curve = read_job(write_lavis_log(tmp_path / "stock" / "job"))
    assert curve.x_unit == "epoch" and curve.x == [1, 2, 3]
    assert curve.series == {"loss": [4.0, 2.0, pytest.approx(1.333)]}


def test_log_without_loss_is_named(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    (job / "log.txt").write_text('{\n    "run": {}\n}\n')
    with pytest.raises(LogError, match="log.txt"):
        read_job(job)


def test_cli_plots_every_job_below_the_given_dirs(tmp_path):
    write_metrics(tmp_path / "ext" / "job_a")
    write_lavis_log(tmp_path / "stock" / "job_b")
    assert find_jobs(tmp_path) == [tmp_path / "ext" / "job_a", tmp_path / "stock" / "job_b"]
    out = main([str(tmp_path / "ext"), str(tmp_path / "stock"), "--out", str(tmp_path / "png" / "loss.png")])
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 300


def test_plot_stages_draws_one_panel_per_stage(tmp_path):
    out = plot_stages({"stage 1": write_metrics(tmp_path / "s1"), "stage 2": write_metrics(tmp_path / "s2")},
                      tmp_path / "stages.png")
    with Image.open(out) as image:
        assert image.width > image.height  # panels side by side


def test_missing_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_jobs(tmp_path / "nowhere")
