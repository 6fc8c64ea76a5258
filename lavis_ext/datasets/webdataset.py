"""Image-caption pretraining from webdataset tar shards, in the layout img2dataset writes.

The layout (img2dataset ``--output_format webdataset``: rom1504/img2dataset ``img2dataset/writer.py``
``WebDatasetSampleWriter.write`` and ``img2dataset/downloader.py`` ``compute_key``):

- shards ``<shard id, 5 digits>.tar`` in one directory, each beside ``<shard>_stats.json``
  (``count``, ``successes``, ``failed_to_download``, ...) and ``<shard>.parquet``;
- per sample three members with the same key: ``<key>.jpg`` (the image), ``<key>.txt`` (the
  caption) and ``<key>.json`` (the input columns, e.g. ``url`` and ``caption``, plus ``key``,
  ``status``, ``error_message``, ``width``, ``height``, ``original_width``, ``original_height``);
- keys are the shard id followed by the sample's index in the shard, zero-padded to 5 + 4
  digits: ``000010005`` is sample 5 of shard 1. Only downloaded samples are in the tar.

:class:`WebDatasetCaptions` streams them for training (``wds_caption`` builder):

- **Split.** Every epoch all ranks draw the same permutation of the shards (``seed``, epoch);
  loader worker ``w`` of rank ``r`` reads every ``(R*W)``-th shard from slot ``r*W + w``.
  With equally full shards and ``samples_per_epoch`` their total, every sample is seen once
  per epoch over all ranks and workers.
- **Length.** Each rank yields ``samples_per_epoch // world_size`` samples, rounded down to
  whole batches, so that all ranks take the same number of steps. A slot whose shards run
  out before its share starts over on a new permutation (samples then repeat within the epoch).
- **Shuffling.** Shard order per epoch, and within a slot a ``shuffle_buffer``-sample buffer,
  both reproducible from ``(seed, epoch)``.
- **Bad samples** (undecodable or too large image, no image or caption member) are skipped
  and named in a warning with the running count; more than ``max_bad_sample_fraction`` of a
  worker's share raises :class:`DataError`. A truncated tar ends that shard with a warning.
- **Resume.** :meth:`set_epoch` takes the rank's samples already trained (the interface of
  ``runner_ext``'s ``EpochSampler``); the skipped batches are read but not processed, and the
  remaining ones arrive in the order the uninterrupted epoch had (same ``num_workers``).

The loader's batch size must be given to the dataset (``batch_size``), since its workers
fill whole batches: ``DataLoader(dataset, batch_size=dataset.batch_size, drop_last=True)``.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import webdataset as wds
from lavis.common.dist_utils import get_rank, get_world_size
from omegaconf import ListConfig
from PIL import Image
from torch.utils.data import get_worker_info

from lavis_ext.datasets.base import (DEFAULT_MAX_IMAGE_PIXELS, MAX_IMAGE_PIXELS_KEY, DataError, ImageDatasetExt,
                                     pixel_limit, to_rgb)
from lavis_ext.datasets.builders import OfflineBuilderExt, register_builder_ext
from lavis_ext.local_paths import LocalPathError, require_file

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # img2dataset's --encode_format choices
STATS_SUFFIX = "_stats.json"


def shard_key(shard_id: int, index: int) -> str:
    """img2dataset's sample key: ``compute_key`` with its defaults (5-digit shards, 4-digit indices)."""
    return f"{shard_id * 10_000 + index:09d}"


def write_shards(out_dir: str | Path, samples, samples_per_shard: int) -> list[Path]:
    """Write ``samples`` (an iterable of ``(jpeg bytes, caption, metadata dict)``) as img2dataset
    does: ``<out_dir>/00000.tar``, ... with ``<key>.jpg/.txt/.json`` members, and beside each
    shard its ``_stats.json``. Returns the shard paths."""
    if samples_per_shard < 1 or samples_per_shard > 10_000:
        raise ValueError(f"samples_per_shard = {samples_per_shard}: expected 1..10000 (4-digit sample indices)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    writer = None
    for n, (jpeg, caption, meta) in enumerate(samples):
        shard_id, index = divmod(n, samples_per_shard)
        if index == 0:
            if writer is not None:
                _close_shard(writer, paths[-1], samples_per_shard)
            paths.append(out_dir / f"{shard_id:05d}.tar")
            writer = wds.TarWriter(str(paths[-1]))
        key = shard_key(shard_id, index)
        meta = {**meta, "caption": caption, "key": key, "status": "success", "error_message": None}
        writer.write({"__key__": key, "jpg": jpeg, "txt": caption, "json": json.dumps(meta, indent=4)})
    if writer is None:
        raise ValueError(f"no samples to write to {out_dir}")
    _close_shard(writer, paths[-1], n % samples_per_shard + 1)
    return paths


def _close_shard(writer, path: Path, count: int) -> None:
    writer.close()
    stats = {"count": count, "successes": count, "failed_to_download": 0, "failed_to_resize": 0}
    path.with_name(path.stem + STATS_SUFFIX).write_text(json.dumps(stats, indent=4))


def count_shard_samples(shards: list[Path], key: str) -> int:
    """Samples in ``shards`` by their ``_stats.json`` (``successes``: the samples in the tar)."""
    total = 0
    for shard in shards:
        stats = shard.with_name(shard.stem + STATS_SUFFIX)
        if not stats.is_file():
            raise DataError(f"{key} is 0 and {stats} does not exist: give the number of samples per epoch")
        try:
            total += int(json.loads(stats.read_text())["successes"])
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{stats}: expected img2dataset's stats with an int 'successes' ({exc})") from exc
    return total


def _warn_and_continue(exn: Exception) -> bool:
    """webdataset handler: a truncated or unreadable tar ends its shard with a warning."""
    logger.warning("skipping the rest of a shard: %r", exn)
    return True


class WebDatasetCaptions(wds.DataPipeline):
    """Image-caption samples ``{"image", "text_input", "image_id", "key"}`` from img2dataset shards.

    A ``wds.DataPipeline`` (an ``IterableDataset``), so that LAVIS's ``concat_datasets``
    (``lavis/datasets/data_utils.py:144``) chains it as a webdataset instead of refusing it as
    a generic iterable dataset (``:151``).

    Args:
        vis_processor, text_processor: LAVIS processors.
        shards (list[str]): the tar files.
        samples_per_epoch (int): samples per epoch over all ranks.
        shuffle_buffer (int, default 1000): samples in each worker's shuffle buffer (1: no shuffling within shards).
        seed (int, default 0): shard order and buffer shuffling follow ``(seed, epoch)``.
        max_bad_sample_fraction (float, default 0.01): bad samples a worker skips, as a fraction of its share.
        name (str): used in logs, e.g. ``"wds_caption/train"``.
        rank, world_size (int, optional): default: the process group's.

    ``image_id`` is the ``image_id`` of the sample's json when it has one (shards made by
    ``lavis_ext.tools.make_shards`` keep the source annotation's), else the key; captions
    come from ``.txt``, else the json's ``caption``.
    """

    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    LIST_KEYS = ("image_id", "key")
    collater = ImageDatasetExt.collater  # default_collate, with ids and keys kept as lists

    def __init__(self, vis_processor, text_processor, shards: list[str], *, samples_per_epoch: int,
                 shuffle_buffer: int = 1000, seed: int = 0, max_bad_sample_fraction: float = 0.01,
                 name: str = "", rank: int | None = None, world_size: int | None = None):
        if not shards:
            raise DataError(f"{name or type(self).__name__}: no shards")
        if samples_per_epoch < 1 or shuffle_buffer < 1:
            raise ValueError(f"{name}: samples_per_epoch ({samples_per_epoch}) and shuffle_buffer ({shuffle_buffer}) "
                             f"must be positive")
        super().__init__()
        self.vis_processor, self.text_processor = vis_processor, text_processor
        self.shards = [str(s) for s in shards]
        self.samples_per_epoch, self.shuffle_buffer, self.seed = samples_per_epoch, shuffle_buffer, seed
        self.max_bad_sample_fraction = float(max_bad_sample_fraction)
        self.name = name or type(self).__name__
        self._fixed_rank = (rank, world_size)
        self.batch_size = 1
        self.bad_samples = 0  # skipped by this process in its last epoch (with workers: see the log)
        self.set_epoch(0)

    # ------------------------------------------------------------------ epoch plan

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch`` from this rank's sample ``start`` on (a whole number of batches)."""
        rank, world_size = self._fixed_rank
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        if start % self.batch_size:
            raise ValueError(f"{self.name}: resume position {start} is not a whole number of batches of {self.batch_size}")
        self.epoch, self.start = epoch, start

    @property
    def batches_per_rank(self) -> int:
        return self.samples_per_epoch // self.world_size // self.batch_size

    def __len__(self) -> int:
        return self.batches_per_rank * self.batch_size - self.start

    def _roles(self, worker: int, num_workers: int) -> tuple[int, int, int]:
        """``(role, batches to skip, batches to yield)`` of loader worker ``worker``.

        The loader takes batch ``k`` from worker ``k % num_workers``. In the whole epoch, batch
        ``j`` belongs to role ``j % num_workers``; resumed after ``s`` batches, worker ``w``
        delivers batches ``s + w, s + w + W, ...``, so it plays role ``(s + w) % W``.
        """
        done = self.start // self.batch_size
        role = (done + worker) % num_workers
        total = len(range(role, self.batches_per_rank, num_workers))
        skipped = len(range(role, done, num_workers))
        return role, skipped, total - skipped

    def _slot_shards(self, slot: int, slots: int, round_: int) -> list[str]:
        """Every ``slots``-th shard of the permutation all ranks draw for ``(seed, epoch, round_)``."""
        order = random.Random(f"{self.seed}/{self.epoch}/{round_}").sample(self.shards, len(self.shards))
        return order[slot::slots]

    def _raw_samples(self, slot: int, slots: int) -> Iterator[dict]:
        """The slot's shards, shuffled; when they run out, the next round's (a new permutation)."""
        for round_ in itertools.count():
            shards = self._slot_shards(slot, slots, round_)
            if round_ == 1:
                logger.info("%s: rank %d slot %d ran out of samples in epoch %d; reading shards again "
                            "(samples repeat: samples_per_epoch exceeds what this slot holds)",
                            self.name, self.rank, slot, self.epoch)
            rng = random.Random(f"{self.seed}/{self.epoch}/{round_}/{slot}")
            stream = wds.tarfile_samples(({"url": s} for s in shards), handler=_warn_and_continue)
            n = 0
            for sample in wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(stream):
                n += 1
                yield sample
            if n == 0:
                raise DataError(f"{self.name}: no samples in shards {shards}")

    # ------------------------------------------------------------------ samples

    def load(self, raw: dict) -> tuple[Image.Image, str, object]:
        """``(image, caption, image_id)`` of a raw webdataset sample; :class:`DataError` names what is wrong."""
        where = f"{raw.get('__url__')}: sample {raw.get('__key__')}"
        meta = {}
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
            except (ValueError, UnicodeDecodeError) as exc:
                raise DataError(f"{where}: malformed .json: {exc}") from exc
        if "txt" in raw:
            caption = raw["txt"].decode("utf-8", errors="replace")
        elif isinstance(meta.get("caption"), str):
            caption = meta["caption"]
        else:
            raise DataError(f"{where}: no caption (.txt member or 'caption' in .json)")
        data = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if data is None:
            raise DataError(f"{where}: no image member ({', '.join('.' + e for e in IMAGE_EXTENSIONS)}); has {sorted(raw)}")
        try:
            with pixel_limit(self.max_image_pixels), Image.open(io.BytesIO(data)) as image:
                image = to_rgb(image)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise DataError(f"{where}: image larger than {MAX_IMAGE_PIXELS_KEY} = {self.max_image_pixels}: {exc}") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"{where}: cannot decode image: {exc}") from exc
        return image, caption, meta.get("image_id", raw["__key__"])

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        slots = self.world_size * num_workers
        if len(self.shards) < slots:
            raise DataError(f"{self.name}: {len(self.shards)} shard(s) cannot feed {self.world_size} rank(s) x "
                            f"{num_workers} loader worker(s): every worker needs a shard of its own")
        role, skip, count = self._roles(worker, num_workers)
        share = (skip + count) * self.batch_size
        allowed = int(self.max_bad_sample_fraction * share)
        self.bad_samples = 0
        seen: set[str] = set()
        yielded, stop = -skip * self.batch_size, count * self.batch_size
        for raw in self._raw_samples(self.rank * num_workers + role, slots) if stop else ():
            try:
                image, caption, image_id = self.load(raw)
            except DataError as err:
                self.bad_samples += 1
                logger.warning("%s: skipping bad sample %d of rank %d worker %d in epoch %d (at most %d allowed): %s",
                               self.name, self.bad_samples, self.rank, worker, self.epoch, allowed, err)
                if self.bad_samples > allowed:
                    raise DataError(f"{err}; {self.bad_samples} bad samples among {share} of rank {self.rank} "
                                    f"worker {worker} exceed max_bad_sample_fraction = "
                                    f"{self.max_bad_sample_fraction}") from err
                continue
            seen.add(raw["__url__"])
            yielded += 1
            if yielded > 0:
                yield {"image": self.vis_processor(image), "text_input": self.text_processor(caption),
                       "image_id": image_id, "key": raw["__key__"]}
            if yielded == stop:
                break
        logger.info("%s: rank %d worker %d epoch %d: %d samples from %d shard(s) [%s], %d bad sample(s) skipped",
                    self.name, self.rank, worker, self.epoch, count * self.batch_size, len(seen),
                    ", ".join(sorted(Path(s).name for s in seen)), self.bad_samples)


@register_builder_ext("wds_caption", "webdataset/caption.yaml")
class WebDatasetCaptionBuilder(OfflineBuilderExt):
    """Training captions from webdataset shards (:class:`WebDatasetCaptions`); a train split only.

    ``build_info.shards.storage``: a directory (its ``*.tar``), a brace pattern
    (``/data/laion/{00000..00099}.tar``) or a list of either; relative paths are joined to
    cache_root. ``samples_per_epoch`` (0, the default: the shards' ``_stats.json`` total),
    ``shuffle_buffer``, ``seed`` and ``max_bad_sample_fraction`` go to the dataset.
    """

    train_dataset_cls = WebDatasetCaptions
    eval_dataset_cls = None
    DATASET_KEYS = ("samples_per_epoch", "shuffle_buffer", "seed", "max_bad_sample_fraction")

    def shard_paths(self) -> list[Path]:
        key = self.key("build_info.shards.storage")
        storage = (self.config.build_info.get("shards") or {}).get("storage")
        if not storage:
            raise ValueError(f"{key} is not set")
        entries = list(storage) if isinstance(storage, (list, ListConfig)) else [storage]
        paths: list[Path] = []
        for entry in entries:
            entry = self._resolve(str(entry))
            if Path(entry).is_dir():
                found = sorted(Path(entry).glob("*.tar"))
                if not found:
                    raise LocalPathError(f"{key} = {entry!r}: no .tar shards in this directory")
                paths += found
            else:
                paths += [require_file(url, key) for url in wds.shardlists.expand_urls(entry)]
        return paths

    def _download_ann(self):
        self.shard_paths()

    def _download_vis(self):
        pass  # the images are inside the shards

    def build(self):
        self.build_processors()
        if self.vis_processors["train"] is None or self.text_processors["train"] is None:
            raise ValueError(f"{self.key('vis_processor.train')} and {self.key('text_processor.train')} must be set")
        shards = self.shard_paths()
        options = {k: self.config[k] for k in self.DATASET_KEYS if self.config.get(k) is not None}
        if not options.get("samples_per_epoch"):
            options["samples_per_epoch"] = count_shard_samples(shards, self.key("samples_per_epoch"))
        dataset = WebDatasetCaptions(self.vis_processors["train"], self.text_processors["train"],
                                     [str(s) for s in shards], name=f"{self.NAME}/train", **options)
        logger.info("%s: %d shards, %d samples per epoch", dataset.name, len(shards), dataset.samples_per_epoch)
        return {"train": dataset}
