"""Loss curves from training runs' logs.

    python -m lavis_ext.tools.plot_log OUTPUT_DIR [OUTPUT_DIR ...] [--out loss.png]

An ``OUTPUT_DIR`` is a job directory, or any directory above job directories (``run.output_dir``).
A job's curve comes from ``metrics.jsonl`` (``runner_ext``: one record per iteration, ``step`` and
``loss``, plus ``loss_*`` parts) when it has one, else from LAVIS's ``log.txt`` (any runner: the
config, then one ``{"train_loss": ...}`` line per epoch). All curves share one plot.
:func:`plot_stages` draws the demo's two stages side by side on one figure.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lavis_ext.runners.runner_ext import METRICS_FILE  # noqa: E402  (runner_ext's per-iteration log)

LAVIS_LOG_FILE = "log.txt"  # LAVIS's per-epoch log
SMOOTHING = 20  # iterations in the moving average drawn over per-iteration losses


class LogError(ValueError):
    """A log that holds no loss; the message names the file."""


@dataclass
class Curve:
    """Losses of one job: ``x`` in iterations (``metrics.jsonl``) or epochs (``log.txt``)."""

    label: str
    x_unit: str
    x: list[float]
    series: dict[str, list[float]] = field(default_factory=dict)  # "loss" first, then its parts


def read_metrics(path: Path, label: str) -> Curve:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records or any("loss" not in r or "step" not in r for r in records):
        raise LogError(f"{path}: expected one JSON record with 'step' and 'loss' per line")
    names = ["loss"] + sorted({k for r in records for k in r if k.startswith("loss_")})
    return Curve(label, "iteration", [r["step"] for r in records],
                 {n: [float(r.get(n, "nan")) for r in records] for n in names})


def read_lavis_log(path: Path, label: str) -> Curve:
    """Per-epoch ``train_*loss*`` values; the indented config and other lines are skipped."""
    epochs = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line of the indented config
        if isinstance(record, dict) and "train_loss" in record:
            epochs.append(record)
    if not epochs:
        raise LogError(f"{path}: no line with 'train_loss'")
    names = ["train_loss"] + sorted({k for r in epochs for k in r if k.startswith("train_loss_")})
    return Curve(label, "epoch", list(range(1, len(epochs) + 1)),
                 {n.removeprefix("train_"): [float(r.get(n, "nan")) for r in epochs] for n in names})


def read_job(job: Path, label: str | None = None) -> Curve:
    """A job directory's curve: ``metrics.jsonl`` if present, else ``log.txt``."""
    label = label or job.name
    if (job / METRICS_FILE).is_file():
        return read_metrics(job / METRICS_FILE, label)
    if (job / LAVIS_LOG_FILE).is_file():
        return read_lavis_log(job / LAVIS_LOG_FILE, label)
    raise FileNotFoundError(f"{job}: neither {METRICS_FILE} nor {LAVIS_LOG_FILE}")


def find_jobs(output_dir: Path) -> list[Path]:
    """``output_dir`` itself if it holds a log, else every directory below it that does, sorted."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise FileNotFoundError(f"{output_dir}: no such directory")
    jobs = {p.parent for name in (METRICS_FILE, LAVIS_LOG_FILE) for p in output_dir.rglob(name)}
    if not jobs:
        raise FileNotFoundError(f"{output_dir}: no {METRICS_FILE} or {LAVIS_LOG_FILE} in it or below it")
    return sorted(jobs)


def moving_average(values: list[float], window: int) -> list[float]:
    averaged, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        averaged.append(total / min(i + 1, window))
    return averaged


def draw(ax, curve: Curve, colour=None, parts: bool = True) -> None:
    """The total loss (raw and smoothed per iteration, with markers per epoch) and, if ``parts``, its parts."""
    names = list(curve.series) if parts else ["loss"]
    for n, name in enumerate(names):
        values = curve.series[name]
        label = curve.label if name == "loss" else f"{curve.label}: {name}"
        line_colour = colour if name == "loss" else f"C{n + 2}"
        if curve.x_unit == "epoch":
            ax.plot(curve.x, values, marker="o", color=line_colour, label=label)
            continue
        ax.plot(curve.x, values, color=line_colour, alpha=0.25, linewidth=0.8)
        ax.plot(curve.x, moving_average(values, SMOOTHING), color=line_colour, label=label)
    ax.set_xlabel(curve.x_unit)
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_runs(output_dirs: list[Path], out: Path) -> Path:
    """Every job under ``output_dirs`` on one plot; returns ``out``."""
    curves = [read_job(job, f"{job.parent.name}/{job.name}") for d in output_dirs for job in find_jobs(Path(d))]
    fig, ax = plt.subplots(figsize=(8, 5))
    for n, curve in enumerate(curves):
        draw(ax, curve, colour=f"C{n}", parts=len(curves) == 1)
    return _save(fig, out)


def plot_stages(stages: dict[str, Path], out: Path) -> Path:
    """One panel per stage (e.g. ``{"stage 1": job_dir, "stage 2": job_dir}``), on one figure."""
    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4.5), squeeze=False)
    for n, (ax, (name, job)) in enumerate(zip(axes[0], stages.items())):
        draw(ax, read_job(Path(job), name), colour=f"C{n}")
        ax.set_title(name)
    return _save(fig, out)


def _save(fig, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dirs", nargs="+", type=Path, help="job directories or run.output_dir directories")
    parser.add_argument("--out", type=Path, default=Path("loss.png"), help="the PNG to write")
    args = parser.parse_args(argv)
    out = plot_runs(args.output_dirs, args.out)
    print(out)
    return out


if __name__ == "__main__":
    main()
