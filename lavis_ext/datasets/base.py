"""The checked image + annotation dataset that lavis-ext's caption and VQA datasets share.

Replaces, for lavis-ext's builders only, ``lavis/datasets/datasets/base_dataset.py``
``BaseDataset.__init__``, which read the annotation json with a bare ``json.load``: a missing
key or image surfaced as a KeyError/FileNotFoundError deep in a worker. Here every record is
checked at load time and bad data raises :class:`DataError`, naming the file and the record;
an undecodable image names its path. Images are decoded with :func:`to_rgb` (16-bit grayscale
scaled, not clipped) under a pixel limit (``max_image_pixels``, PIL's decompression-bomb
check); a bad image is skipped and counted within ``max_bad_image_fraction``.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from lavis.datasets.datasets.base_dataset import BaseDataset
from PIL import Image
from torch.utils.data.dataloader import default_collate

from lavis_ext.errors import ConfigError, LavisExtError
from lavis_ext.local_paths import require_file
from lavis_ext.run_options import DEFAULT_MAX_IMAGE_PIXELS

logger = logging.getLogger(__name__)

MAX_IMAGE_PIXELS_KEY = "run.max_image_pixels"
# integer grayscale modes whose values span 0..65535 (16-bit PNG and TIFF); "RGB" conversion clips them at 255
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class DataError(LavisExtError, ValueError):
    """Bad dataset content; the message names the file, and the record where there is one."""


def to_rgb(image: Image.Image) -> Image.Image:
    """``image.convert("RGB")``, except that 16-bit grayscale is scaled to 8 bits (``v / 257``):
    PIL's conversion clips every value above 255, so such images arrive almost white."""
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257.0
        image = Image.fromarray(np.rint(values).astype(np.uint8), mode="L")
    return image.convert("RGB")


def open_rgb_image(path: str, max_pixels: int, limit_name: str = MAX_IMAGE_PIXELS_KEY, source: str = "") -> Image.Image:
    """Decode ``path`` as RGB (:func:`to_rgb`) if it has at most ``max_pixels`` pixels (the setting
    ``limit_name``). A missing, too large or undecodable file raises :class:`DataError` naming it,
    and ``source`` (where it was listed) when given."""
    where = f" (from {source})" if source else ""
    try:
        with pixel_limit(max_pixels), Image.open(path) as image:
            return to_rgb(image)
    except FileNotFoundError as exc:
        raise DataError(f"image file not found: {path}{where}") from exc
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise DataError(f"image {path} is larger than {limit_name} = {max_pixels}: {exc}{where}") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"cannot decode image {path}: {exc}{where}") from exc


@contextmanager
def pixel_limit(max_pixels: int):
    """Within the block, opening an image of more than ``max_pixels`` pixels raises PIL's
    ``DecompressionBombWarning`` (PIL itself raises only above twice its limit)."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


@dataclass(frozen=True)
class AnnSource:
    """Where an annotation record came from."""

    file: str
    index: int

    def __str__(self) -> str:
        return f"{self.file} record {self.index}"


def read_json(path, what: str = "annotation file"):
    """Parse a JSON file; a missing file or bad JSON raises naming the file (and the position)."""
    path = require_file(str(path), what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno} "
                        f"(char {exc.pos}): {exc.msg}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}): {exc.reason}") from exc


class ImageDatasetExt(BaseDataset):
    """Records ``{"image", ...}`` from JSON-list annotation files, each with one image.

    Subclasses set ``REQUIRED_KEYS``, may extend :meth:`check_record`, and build a sample
    from a record and its decoded image in :meth:`_sample`.

    Args:
        vis_processor, text_processor: LAVIS processors (train or eval ones, by split).
        vis_root (str): images are opened at ``join(vis_root, record["image"])``.
        ann_paths (list[str]): the annotation files (only the first ``NUM_RECORD_FILES`` hold records).
        max_bad_image_fraction (float, default 0.0): how many undecodable, missing or too
            large images (distinct files, as a fraction of ``len(self)``) are skipped, each
            replaced by the next valid sample, before one raises. Counted per process (per worker).
        name (str): used in logs, e.g. ``"coco_caption_ext/train"``.

    ``max_image_pixels`` (default PIL's 89,478,485) is the largest image decoded; the CLI sets
    it from ``run.max_image_pixels`` (:func:`set_max_image_pixels`).
    """

    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    REQUIRED_KEYS: tuple[str, ...] = ("image",)
    LIST_KEYS: tuple[str, ...] = ()  # sample keys the collater keeps as plain lists (ids, answers)
    NUM_RECORD_FILES: int | None = None  # None: every annotation file holds records

    def __init__(self, vis_processor, text_processor, vis_root, ann_paths, *,
                 max_bad_image_fraction: float = 0.0, name: str = ""):
        # BaseDataset.__init__ is not called: it reads the json without any checks.
        self.name = name or type(self).__name__
        self.vis_root = str(vis_root)
        self.vis_processor = vis_processor
        self.text_processor = text_processor
        self.max_bad_image_fraction = float(max_bad_image_fraction)
        self._bad_images: dict[str, str] = {}  # image path -> why it was skipped

        annotations, sources = self.load_annotations(list(ann_paths)[:self.NUM_RECORD_FILES])
        self.annotation, self.sources = self._select(annotations, sources)
        self._add_instance_ids()

    @classmethod
    def check_record(cls, record, source: AnnSource) -> None:
        if not isinstance(record, dict):
            raise DataError(f"{source}: expected an object with keys {list(cls.REQUIRED_KEYS)}, "
                            f"got {type(record).__name__}")
        for key in cls.REQUIRED_KEYS:
            if key not in record:
                raise DataError(f"{source}: missing required key {key!r} (has {sorted(record)})")
        if not isinstance(record["image"], str):
            raise DataError(f"{source}: 'image' must be a path string, got {record['image']!r}")

    @classmethod
    def load_annotations(cls, ann_paths) -> tuple[list[dict], list[AnnSource]]:
        """Read and check every record of every annotation file (a JSON list of objects)."""
        annotations, sources = [], []
        for ann_path in ann_paths:
            records = read_json(ann_path)
            if not isinstance(records, list):
                raise DataError(f"{ann_path}: expected a JSON list of records, got {type(records).__name__}")
            for index, record in enumerate(records):
                source = AnnSource(str(ann_path), index)
                cls.check_record(record, source)
                annotations.append(record)
                sources.append(source)
        if not annotations:
            raise DataError(f"no annotation records in {[str(p) for p in ann_paths]}")
        return annotations, sources

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
        return open_rgb_image(self.image_path(index), self.max_image_pixels, source=str(self.sources[index]))

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
        raise NotImplementedError

    def collater(self, samples: list[dict]) -> dict:
        """``default_collate``, except ``LIST_KEYS`` stay lists of the values as given."""
        keep = [k for k in self.LIST_KEYS if samples and k in samples[0]]
        batch = default_collate([{k: v for k, v in s.items() if k not in keep} for s in samples])
        for key in keep:
            batch[key] = [s[key] for s in samples]
        return batch


def set_max_image_pixels(datasets: dict, max_pixels) -> None:
    """Set the pixel limit of every lavis-ext dataset in ``datasets`` (``{name: {split: dataset}}``,
    as tasks build them); ``max_pixels`` is ``run.max_image_pixels``."""
    if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels <= 0:
        raise ConfigError(f"{MAX_IMAGE_PIXELS_KEY} = {max_pixels!r}: expected a positive number of pixels")
    for splits in datasets.values():
        for dataset in splits.values():
            if isinstance(dataset, ImageDatasetExt):
                dataset.max_image_pixels = max_pixels
