"""Caption datasets that keep the annotation's image id and fail clearly on bad data.

Replaces, for lavis-ext's builders only (stock LAVIS classes are left as they are):

- ``lavis/datasets/datasets/caption_datasets.py`` ``CaptionDataset.__getitem__``: returned
  ``image_id`` as a running int index (``self.img_ids``), not the annotation's own id.
- ``lavis/datasets/datasets/image_text_pair_datasets.py`` (used by ``vg_caption``): returned
  no ``image_id`` at all, so ``ConcatDataset.collater`` (``base_dataset.py``), which keeps
  only keys shared by all samples, dropped the key from mixed COCO+VG batches.
- ``vg_caption.json`` holds absolute upstream paths (``/export/share/.../image/1.jpg``),
  which ``os.path.join(vis_root, ...)`` turns into a FileNotFoundError (LAVIS #209, #478).
- ``BaseDataset.__init__`` (``base_dataset.py``) read the json with a bare ``json.load``, and
  a missing key or image surfaced as a KeyError/FileNotFoundError deep in a worker.

Every sample is ``{"image", "text_input", "image_id"}``, with ``image_id`` exactly as the
annotation gives it (``123``, ``"coco_391895"``, ``"vg_1"``); the collater keeps the ids as a
list, so int and string ids can share a batch. Train and eval splits use the same class
(the builder hands eval splits the eval processors).

Bad data raises :class:`DataError`, naming the file and the record.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from lavis.datasets.datasets.base_dataset import BaseDataset
from PIL import Image
from torch.utils.data.dataloader import default_collate

from lavis_ext.offline import require_file

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("image", "caption")
VG_IMAGE_DIRS = ("VG_100K", "VG_100K_2")  # the layout download_vg.py produces; VG_100K wins on duplicates


class DataError(ValueError):
    """Bad dataset content; the message names the file, and the record where there is one."""


@dataclass(frozen=True)
class AnnSource:
    """Where an annotation record came from."""

    file: str
    index: int

    def __str__(self) -> str:
        return f"{self.file} record {self.index}"


def _check_record(record, source: AnnSource) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{source}: expected an object with keys {list(REQUIRED_KEYS)}, got {type(record).__name__}")
    for key in REQUIRED_KEYS:
        if key not in record:
            raise DataError(f"{source}: missing required key {key!r} (has {sorted(record)})")
    if not isinstance(record["image"], str):
        raise DataError(f"{source}: 'image' must be a path string, got {record['image']!r}")
    caption = record["caption"]
    if not (isinstance(caption, str) or (isinstance(caption, list) and caption
                                         and all(isinstance(c, str) for c in caption))):
        raise DataError(f"{source}: 'caption' must be a string or a non-empty list of strings, got {caption!r}")


def load_annotations(ann_paths) -> tuple[list[dict], list[AnnSource]]:
    """Read and check every record of every annotation file (a JSON list of objects)."""
    annotations, sources = [], []
    for ann_path in ann_paths:
        path = require_file(str(ann_path), "annotation file")
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno} "
                            f"(char {exc.pos}): {exc.msg}") from exc
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text (byte {exc.start}): {exc.reason}") from exc
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        for index, record in enumerate(records):
            source = AnnSource(str(path), index)
            _check_record(record, source)
            annotations.append(record)
            sources.append(source)
    if not annotations:
        raise DataError(f"no annotation records in {[str(p) for p in ann_paths]}")
    return annotations, sources


def image_id_from_file(image: str) -> int | str:
    """An id for records without ``image_id`` (Karpathy val/test): ``COCO_val2014_000000391895.jpg`` -> 391895."""
    stem = Path(image).stem
    last = stem.rsplit("_", 1)[-1]
    return int(last) if last.isdigit() else stem


class CaptionDatasetExt(BaseDataset):
    """Image-caption pairs from COCO-Karpathy-style annotation files.

    Args:
        vis_processor, text_processor: LAVIS processors (train or eval ones, by split).
        vis_root (str): images are opened at ``join(vis_root, record["image"])``.
        ann_paths (list[str]): JSON lists of ``{"image", "caption", ["image_id"]}`` records;
            ``caption`` may be a list (Karpathy val/test), whose first entry is ``text_input``.
        max_bad_image_fraction (float, default 0.0): how many undecodable/missing images
            (distinct files, as a fraction of ``len(self)``) are skipped, each replaced by
            the next valid sample, before one raises. Counted per process (per worker).
        name (str): used in logs, e.g. ``"coco_caption_ext/train"``.
    """

    def __init__(self, vis_processor, text_processor, vis_root, ann_paths, *,
                 max_bad_image_fraction: float = 0.0, name: str = ""):
        # BaseDataset.__init__ is not called: it reads the json without any checks.
        self.name = name or type(self).__name__
        self.vis_root = str(vis_root)
        self.vis_processor = vis_processor
        self.text_processor = text_processor
        self.max_bad_image_fraction = float(max_bad_image_fraction)
        self._bad_images: dict[str, str] = {}  # image path -> why it was skipped

        annotations, sources = load_annotations(ann_paths)
        self.annotation, self.sources = self._select(annotations, sources)
        for ann in self.annotation:
            ann.setdefault("image_id", image_id_from_file(ann["image"]))
        self._add_instance_ids()

    def _select(self, annotations: list[dict], sources: list[AnnSource]):
        """Hook for subclasses: rewrite or drop records at load time."""
        return annotations, sources

    @property
    def bad_images(self) -> int:
        """How many distinct bad image files this process has skipped."""
        return len(self._bad_images)

    def image_path(self, index: int) -> str:
        return os.path.join(self.vis_root, self.annotation[index]["image"])

    def load_image(self, index: int) -> Image.Image:
        path = self.image_path(index)
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except FileNotFoundError as exc:
            raise DataError(f"image file not found: {path} (from {self.sources[index]})") from exc
        except (OSError, SyntaxError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            raise DataError(f"cannot decode image {path}: {exc} (from {self.sources[index]})") from exc

    def __getitem__(self, index: int) -> dict:
        # A bad image is replaced by the next valid sample (deterministic), within the budget.
        n = len(self)
        for step in range(n):
            i = (index + step) % n
            path = self.image_path(i)
            if path in self._bad_images:
                continue
            try:
                image = self.load_image(i)
            except DataError as err:
                self._count_bad_image(path, err)
                continue
            return self._sample(i, image)
        raise DataError(f"{self.name}: none of the {n} samples has a usable image under {self.vis_root}")

    def _count_bad_image(self, path: str, err: DataError) -> None:
        allowed = self.max_bad_image_fraction * len(self)
        count = len(self._bad_images) + 1
        if count > allowed:
            raise DataError(f"{err}; {count} bad image(s) among {len(self)} samples of {self.name} exceed "
                            f"max_bad_image_fraction = {self.max_bad_image_fraction}") from err
        self._bad_images[path] = str(err)
        logger.warning("%s: skipping bad image %d (at most %d allowed): %s", self.name, count, int(allowed), err)

    def _sample(self, index: int, image: Image.Image) -> dict:
        ann = self.annotation[index]
        caption = ann["caption"] if isinstance(ann["caption"], str) else ann["caption"][0]
        return {
            "image": self.vis_processor(image),
            "text_input": self.text_processor(caption),
            "image_id": ann["image_id"],
        }

    def collater(self, samples: list[dict]) -> dict:
        """``default_collate``, except ``image_id`` stays a list of the ids as given."""
        if not samples or "image_id" not in samples[0]:
            return default_collate(samples)
        ids = [s["image_id"] for s in samples]
        batch = default_collate([{k: v for k, v in s.items() if k != "image_id"} for s in samples])
        batch["image_id"] = ids
        return batch


def index_vg_images(vis_root: str) -> dict[str, str]:
    """File name -> ``VG_100K/<name>`` or ``VG_100K_2/<name>``, from one scan of each directory."""
    index: dict[str, str] = {}
    for sub in VG_IMAGE_DIRS:
        directory = os.path.join(vis_root, sub)
        if not os.path.isdir(directory):
            logger.warning("Visual Genome image directory %s does not exist", directory)
            continue
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_file():
                    index.setdefault(entry.name, f"{sub}/{entry.name}")
    return index


class VGCaptionDatasetExt(CaptionDatasetExt):
    """Visual Genome captions, with each record's image found by file name.

    Upstream ``vg_caption.json`` points at ``/export/share/datasets/vision/visual-genome/image/<file>``;
    the images are at ``<vis_root>/VG_100K/<file>`` or ``<vis_root>/VG_100K_2/<file>``. Records
    whose file is in neither are dropped with a warning, as long as they are at most
    ``max_missing_fraction`` (float, default 0.0) of the records; beyond that, or when none
    is found, :class:`DataError`.
    """

    def __init__(self, vis_processor, text_processor, vis_root, ann_paths, *,
                 max_missing_fraction: float = 0.0, **kwargs):
        self.max_missing_fraction = float(max_missing_fraction)
        super().__init__(vis_processor, text_processor, vis_root, ann_paths, **kwargs)

    def _select(self, annotations, sources):
        index = index_vg_images(self.vis_root)
        kept, kept_sources, missing = [], [], []
        for ann, source in zip(annotations, sources):
            rel = index.get(os.path.basename(ann["image"]))
            if rel is None:
                missing.append(ann["image"])
                continue
            kept.append(dict(ann, image=rel, image_source=ann["image"]))
            kept_sources.append(source)
        total = len(annotations)
        where = f"{self.vis_root}/{{{','.join(VG_IMAGE_DIRS)}}}"
        logger.info("%s: %d of %d records have their image in %s (%d image files indexed); %d missing",
                    self.name, len(kept), total, where, len(index), len(missing))
        examples = ", ".join(missing[:3])
        if not kept:
            raise DataError(f"{self.name}: none of the {total} records in {sorted({s.file for s in sources})} "
                            f"has its image in {where} ({len(index)} image files found there); "
                            f"looked up by file name, e.g. {examples}")
        fraction = len(missing) / total
        if fraction > self.max_missing_fraction:
            raise DataError(f"{self.name}: {len(missing)} of {total} records ({fraction:.1%}) have no image in "
                            f"{where}, found {len(kept)}; max_missing_fraction = {self.max_missing_fraction}. "
                            f"Missing e.g.: {examples}")
        if missing:
            logger.warning("%s: dropping %d of %d records whose image is not in %s (max_missing_fraction = %s), "
                           "e.g. %s", self.name, len(missing), total, where, self.max_missing_fraction, examples)
        return kept, kept_sources
