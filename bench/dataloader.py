"""Does data loading keep up with lavis-ext's stage-2 step? Decode + augment rate vs step rate.

    .venv/bin/python bench/dataloader.py --size small
    .venv/bin/python bench/dataloader.py --size 1.8b --device cuda

The loader is the one ``runner_ext`` builds (``RunnerExt.create_loaders``: ``EpochSampler``,
``drop_last``, the dataset's collater, pinned memory on CUDA) with ``run.num_workers`` from the
stage-2 project yaml, over lavis-ext's ``CaptionDatasetExt`` with LAVIS's ``blip2_image_train``
processor, reading COCO-like JPEGs (640x480, photo-like noise) generated on the fly. Its
steady rate (after the first batch, i.e. without worker start-up) is compared with
lavis-ext's train-step rate, measured separately (the loader does not run during steps).
Goal: loader batches/s >= 2x steps/s.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from common import SIZES, build_lavis, captions, describe_run, images, median_seconds, parser, warm_up
from lavis.common.registry import registry
from omegaconf import OmegaConf
from PIL import Image
from train_step import train_step

from lavis_ext.datasets.caption import CaptionDatasetExt
from lavis_ext.runners.runner_ext import RunnerExt

STAGE2_YAML = Path(__file__).resolve().parents[1] / "lavis_ext/projects/blip2/train/pretrain_stage2_internlm2_1_8b.yaml"
NUM_JPEGS = 64  # distinct files; records cycle over them (each read is a fresh decode)


def write_jpegs(root: Path, n_records: int, seed: int) -> Path:
    """COCO-sized JPEGs of smooth colour fields plus noise; returns the annotation file."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    for i in range(NUM_JPEGS):
        field = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)
        pixels = np.asarray(field, dtype=np.float32) + rng.normal(0, 12, (480, 640, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / "images" / f"{i}.jpg", quality=90)
    records = [{"image": f"{i % NUM_JPEGS}.jpg", "caption": text, "image_id": i}
               for i, text in enumerate(captions(n_records))]
    ann = root / "train.json"
    ann.write_text(json.dumps(records))
    return ann


def train_loader(root: Path, ann: Path, image_size: int, batch: int, workers: int, device: torch.device):
    vis = registry.get_processor_class("blip2_image_train").from_config(OmegaConf.create({"image_size": image_size}))
    text = registry.get_processor_class("blip_caption").from_config()
    dataset = CaptionDatasetExt(vis, text, root / "images", [str(ann)], name="bench/train")
    # runner_ext's own loader construction; these are the runner attributes it reads
    runner = SimpleNamespace(seed=42, device=device, use_distributed=False, use_dist_eval_sampler=False)
    return RunnerExt.create_loaders(runner, [dataset], workers, [batch], [True], [dataset.collater])[0]


def batches_per_second(loader) -> tuple[float, float]:
    """(seconds until the first batch, steady batches/s over the rest of the epoch)."""
    start = time.perf_counter()
    batches = iter(loader)
    next(batches)
    first = time.perf_counter()
    n = sum(1 for _ in batches)
    return first - start, n / (time.perf_counter() - first)


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=OmegaConf.load(STAGE2_YAML).run.num_workers,
                   help="default: run.num_workers of the stage-2 project yaml")
    p.add_argument("--batches", type=int, default=20, help="batches read per measurement")
    args = p.parse_args()
    d = SIZES[args.size]
    args.batch = args.batch or d.batch
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        ann = write_jpegs(Path(tmp), args.batch * (args.batches + 1), args.seed)
        loader = train_loader(Path(tmp), ann, d.image_size, args.batch, args.workers, device)
        startup, loader_rate = batches_per_second(loader)

    torch.manual_seed(args.seed)
    model = build_lavis(args.size, device).train()
    pixels, texts = images(args.size, args.batch, device), captions(args.batch)
    step = {"lavis-ext": train_step(model, lambda: model({"image": pixels, "text_input": texts})["loss"], device)}
    warm_up(step, {"lavis-ext": model}, args.warmup, device)
    step_rate = 1 / median_seconds(step, args.reps, device)["lavis-ext"]

    print(describe_run(args))
    print(f"loader: {args.workers} workers, first batch after {startup:.2f} s, then {loader_rate:.2f} batches/s "
          f"({loader_rate * args.batch:.1f} images/s)")
    print(f"lavis-ext train step: {step_rate:.2f} steps/s (median of {args.reps})")
    print(f"ratio loader batches/s / train steps/s: {loader_rate / step_rate:.2f} (goal >= 2)")


if __name__ == "__main__":
    main()
