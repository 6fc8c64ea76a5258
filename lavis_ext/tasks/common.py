"""What lavis-ext's evaluation tasks share: the eval loop, gathering across ranks, the output files.

Replaces, for ``vqa_ext``, ``gqa_ext`` and ``captioning_ext`` (LAVIS's tasks stay as they are):

- ``lavis/tasks/base_task.py:79-96`` ``evaluation``: moved batches to CUDA unconditionally
  (``cuda_enabled=True`` from ``runner_base.py:469``), so CPU evaluation failed; printed a
  line every 10 batches. Here batches go to the model's device, with a progress bar on rank 0.
- ``base_task.py:245-282`` ``save_result``: merged per-rank files and removed the
  ``DistributedSampler`` padding with a list scan, quadratic in the number of results (hours
  for VQAv2's 214k questions), and never checked that nothing was lost. Here results are
  gathered in memory, de-duplicated by id, and checked against the dataset's ids.

Each run writes, in its output directory: ``<split>_metrics.json``, ``<split>_predictions.json``
(one row per question or image, with the truth), and ``<split>_report.txt`` (the metrics, a
breakdown, and the most frequent wrong answers); the metrics are also appended to LAVIS's
``evaluate.txt``.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import torch.distributed as dist
from lavis.common.dist_utils import get_world_size, is_dist_avail_and_initialized, is_main_process
from lavis.common.registry import registry
from tqdm import tqdm

from lavis_ext.checkpoint import atomic_write_text
from lavis_ext.runners.runner_ext import move_to
from lavis_ext.run_options import RunOptions

logger = logging.getLogger(__name__)


def gather_unique(results: list[dict], key: str, expected_ids) -> list[dict] | None:
    """All ranks' ``results`` on rank 0, one per ``key`` in ``expected_ids`` order; ``None`` elsewhere.

    Duplicates come from ``DistributedSampler`` padding the last batch. A missing or foreign id
    raises: a metric over part of the data must not look like a metric over all of it.
    """
    if is_dist_avail_and_initialized():
        gathered: list[list[dict] | None] = [None] * get_world_size()
        dist.all_gather_object(gathered, results)
        results = [row for rank_results in gathered for row in rank_results]
    if not is_main_process():
        return None
    by_id: dict = {}
    for row in results:
        by_id.setdefault(row[key], row)
    expected = list(dict.fromkeys(expected_ids))
    missing = [i for i in expected if i not in by_id]
    foreign = set(by_id) - set(expected)
    if missing or foreign:
        raise RuntimeError(f"evaluation results do not match the dataset: {len(missing)} {key}(s) missing "
                           f"(e.g. {missing[:3]}), {len(foreign)} unknown (e.g. {sorted(map(str, foreign))[:3]})")
    return [by_id[i] for i in expected]


def most_frequent(values, n: int = 20) -> list[tuple[str, int]]:
    return Counter(values).most_common(n)


def format_table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    """Left-aligned first column, right-aligned others, widths from the content."""
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in cells]


class EvalTaskMixin:
    """Mixed into a LAVIS task: its ``valid_step`` rows are gathered, scored by :meth:`score`, and saved.

    Subclasses set ``ID_KEY`` (the row key that identifies a question or image) and implement
    ``score(rows, split_name) -> (metrics, rows, report_lines)``. ``run.length_penalty``, when set,
    is passed to the model's generation (``extra_generate_kwargs``).
    """

    ID_KEY = "question_id"

    @classmethod
    def setup_task(cls, cfg):
        task = super().setup_task(cfg)
        length_penalty = RunOptions.from_run_cfg(cfg.run_cfg).length_penalty  # LAVIS's tasks do not pass it on
        task.extra_generate_kwargs = {} if length_penalty is None else {"length_penalty": float(length_penalty)}
        return task

    def before_evaluation(self, model, dataset, **kwargs):
        super().before_evaluation(model, dataset, **kwargs)
        self.eval_dataset = dataset

    def evaluation(self, model, data_loader, cuda_enabled=True):
        device = next(model.parameters()).device
        results = []
        for samples in tqdm(data_loader, desc="evaluation", disable=not is_main_process(), dynamic_ncols=True):
            results.extend(self.valid_step(model=model, samples=move_to(samples, device)))
        return results

    def after_evaluation(self, val_result, split_name, **kwargs):
        expected = [ann[self.ID_KEY] for ann in self.eval_dataset.annotation]
        rows = gather_unique(val_result, self.ID_KEY, expected)
        if rows is None:
            return {}
        metrics, rows, report = self.score(rows, split_name)
        self.write_outputs(split_name, metrics, rows, report)
        return metrics

    def write_outputs(self, split_name: str, metrics: dict, rows: list[dict], report: list[str]) -> None:
        output_dir = Path(registry.get_path("output_dir"))
        atomic_write_text(output_dir / f"{split_name}_metrics.json", json.dumps(metrics, indent=2) + "\n")
        atomic_write_text(output_dir / f"{split_name}_predictions.json",
                          json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
        atomic_write_text(output_dir / f"{split_name}_report.txt", "\n".join(report) + "\n")
        with open(output_dir / "evaluate.txt", "a") as f:
            f.write(json.dumps({split_name: metrics}) + "\n")
        logger.info("%s\npredictions, metrics and this report are in %s", "\n".join(report), output_dir)
