"""Caption datasets that keep the annotation's image id and fail clearly on bad data.

Replaces, for lavis-ext's builders only (stock LAVIS classes are left as they are):

- ``lavis/datasets/datasets/caption_datasets.py`` ``CaptionDataset.__getitem__``: returned
  ``image_id`` as a running int index (``self.img_ids``), not the annotation's own id.
- ``lavis/datasets/datasets/image_text_pair_datasets.py`` (used by ``vg_caption``): returned
  no ``image_id`` at all, so ``ConcatDataset.collater`` (``base_dataset.py``), which keeps
  only keys shared by all samples, dropped the key from mixed COCO+VG batches.
- ``vg_caption.json`` holds absolute upstream paths (``/export/share/.../image/1.jpg``),
  which ``os.path.join(vis_root, ...)`` turns into a FileNotFoundError (LAVIS #209, #478).

Every sample is ``{"image", "text_input", "image_id"}``, with ``image_id`` exactly as the
annotation gives it (``123``, ``"coco_391895"``, ``"vg_1"``); the collater keeps the ids as a
list, so int and string ids can share a batch. Train and eval splits use the same class
(the builder hands eval splits the eval processors).

Bad data raises :class:`~lavis_ext.datasets.base.DataError`, naming the file and the record.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from PIL import Image

from lavis_ext.datasets.base import AnnSource, DataError, ImageDatasetExt

logger = logging.getLogger(__name__)

VG_IMAGE_DIRS = ("VG_100K", "VG_100K_2")  # the layout download_vg.py produces; VG_100K wins on duplicates


def image_id_from_file(image: str) -> int | str:
    """An id for records without ``image_id`` (Karpathy val/test): ``COCO_val2014_000000391895.jpg`` -> 391895."""
    stem = Path(image).stem
    last = stem.rsplit("_", 1)[-1]
    return int(last) if last.isdigit() else stem


class CaptionDatasetExt(ImageDatasetExt):
    """Image-caption pairs from COCO-Karpathy-style annotation files.

    Records are ``{"image", "caption", ["image_id"]}``; ``caption`` may be a list (Karpathy
    val/test), whose first entry is ``text_input`` and all of which are the references
    (``captions``) for evaluation. Other arguments: :class:`ImageDatasetExt`.
    """

    REQUIRED_KEYS = ("image", "caption")
    LIST_KEYS = ("image_id",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for ann in self.annotation:
            ann.setdefault("image_id", image_id_from_file(ann["image"]))

    @classmethod
    def check_record(cls, record, source: AnnSource) -> None:
        super().check_record(record, source)
        caption = record["caption"]
        if not (isinstance(caption, str) or (isinstance(caption, list) and caption
                                             and all(isinstance(c, str) for c in caption))):
            raise DataError(f"{source}: 'caption' must be a string or a non-empty list of strings, got {caption!r}")

    def _sample(self, index: int, image: Image.Image) -> dict:
        ann = self.annotation[index]
        caption = ann["caption"] if isinstance(ann["caption"], str) else ann["caption"][0]
        return {
            "image": self.vis_processor(image),
            "text_input": self.text_processor(caption),
            "image_id": ann["image_id"],
        }


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
