"""Offline builders with checked paths: ``coco_caption_ext``, ``vg_caption_ext`` (captions),
``coco_vqa_ext``, ``ok_vqa_ext`` and ``gqa_ext`` (zero-shot VQA evaluation).

Registered under new names next to LAVIS's ``coco_caption``/``vg_caption``/``coco_vqa``/
``ok_vqa``/``gqa``, which stay as they are. Same YAML conventions as LAVIS (``build_info.annotations.<split>.storage``,
``build_info.images.storage``; relative paths are joined to ``registry.get_path("cache_root")``),
and same processors. What differs from ``lavis/datasets/builders/base_dataset_builder.py``:

- ``_download_ann`` (``:92-150``) downloaded annotations from ``url``; here nothing is
  downloaded (a ``url`` is ignored with a warning) and a missing file is a
  :class:`~lavis_ext.local_paths.LocalPathError` naming the config key and the path.
- ``_download_vis`` (``:152-163``) only warned about a missing image directory; here it raises.
- ``build_datasets`` (``:43-56``) checked on rank 0 only; here every rank checks its own disk.
- ``build`` (``:220``) called ``eval_dataset_cls(...)`` even when it was ``None`` (``vg_caption``
  val: TypeError). Here caption eval splits (val/test) use the same dataset class as train,
  with the eval processors, so a configured VG val split works; the VQA builders are for
  evaluation only, and a ``train`` split is refused by name.
- The project block is merged onto the builder's default yaml, so a builder made from a bare
  ``datasets.<name>`` block behaves as one built through ``lavis.common.config.Config``.

Dataset config keys beyond LAVIS's: ``max_bad_image_fraction`` (both builders) and
``max_missing_fraction`` (VG); their defaults live in the dataset classes. Unknown keys raise.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from lavis.common import utils
from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder, load_dataset_config
from omegaconf import ListConfig, OmegaConf

from lavis_ext.datasets.caption import CaptionDatasetExt, VGCaptionDatasetExt
from lavis_ext.datasets.vqa import GQAEvalDatasetExt, VQAEvalDatasetExt
from lavis_ext.local_paths import require_dir, require_file

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "datasets"
SPLITS = ("train", "val", "test")
# Top-level keys of a LAVIS dataset block (builders, Config and the dataset cards read them).
LAVIS_KEYS = frozenset({"data_type", "build_info", "vis_processor", "text_processor", "type", "dataset_card", "data_dir"})


class OfflineBuilderExt(BaseDatasetBuilder):
    """Offline builder; subclasses set ``NAME`` (via :func:`register_builder_ext`) and the dataset classes."""

    NAME = ""
    train_dataset_cls = eval_dataset_cls = CaptionDatasetExt
    DATASET_KEYS: tuple[str, ...] = ("max_bad_image_fraction",)  # dataset config key -> dataset kwarg
    DATASET_CONFIG_DICT: dict[str, str] = {}

    def __init__(self, cfg=None):
        if cfg is not None and not isinstance(cfg, str):
            default = load_dataset_config(self.default_config_path(cfg.get("type", "default")))
            cfg = OmegaConf.merge(default, cfg)
        super().__init__(cfg)
        unknown = set(self.config) - LAVIS_KEYS - set(self.DATASET_KEYS)
        if unknown:
            raise ValueError(f"{self.key()}: unknown key(s) {sorted(unknown)}; "
                             f"known: {sorted(LAVIS_KEYS | set(self.DATASET_KEYS))}")

    def key(self, *parts: str) -> str:
        """The dotted config key, e.g. ``datasets.vg_caption_ext.build_info.images.storage``."""
        return ".".join(("datasets", self.NAME, *parts))

    @staticmethod
    def _resolve(path: str) -> str:
        return path if os.path.isabs(path) else utils.get_cache_path(path)

    def annotation_paths(self) -> dict[str, list[Path]]:
        """Split -> existing annotation files; raises naming the key of the first missing one."""
        annotations = self.config.build_info.get("annotations")
        if not annotations:
            raise ValueError(f"{self.key('build_info.annotations')} is not set")
        for split in annotations:  # refuse splits that cannot be built before looking at any file
            key = self.key("build_info.annotations", split)
            if split not in SPLITS:
                raise ValueError(f"{key}: unknown split {split!r}; expected one of {list(SPLITS)}")
            if (self.train_dataset_cls if split == "train" else self.eval_dataset_cls) is None:
                raise ValueError(f"{key}: {self.NAME} has no {'train' if split == 'train' else 'eval'} dataset "
                                 f"(it is for {'evaluation' if split == 'train' else 'training'} only)")
        paths = {}
        for split, info in annotations.items():
            key = self.key("build_info.annotations", split)
            if info.get("url"):
                logger.warning("%s.url is ignored: lavis-ext never downloads; the file must be at storage", key)
            storage = info.get("storage")
            if not storage:
                raise ValueError(f"{key}.storage is not set")
            if isinstance(storage, (list, ListConfig)):
                keyed = [(f"{key}.storage[{i}]", s) for i, s in enumerate(storage)]
            else:
                keyed = [(f"{key}.storage", storage)]
            paths[split] = [require_file(self._resolve(str(s)), k) for k, s in keyed]
        return paths

    def image_root(self) -> Path:
        storage = (self.config.build_info.get(self.data_type) or {}).get("storage")
        return require_dir(self._resolve(str(storage)) if storage else "",
                           self.key("build_info", self.data_type, "storage"))

    def _download_ann(self):
        self.annotation_paths()

    def _download_vis(self):
        self.image_root()

    def build_datasets(self):
        # Nothing is downloaded, so there is nothing for rank 0 to do first: every rank
        # checks the paths it will read.
        self._download_data()
        return self.build()

    def dataset_kwargs(self) -> dict:
        kwargs = {}
        for name in self.DATASET_KEYS:
            value = self.config.get(name)
            if value is None:
                continue  # the dataset class's default
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{self.key(name)} = {value!r}: expected a fraction between 0 and 1")
            kwargs[name] = float(value)
        return kwargs

    def build(self):
        self.build_processors()
        vis_root = self.image_root()
        kwargs = self.dataset_kwargs()
        datasets = {}
        for split, ann_paths in self.annotation_paths().items():
            mode = "train" if split == "train" else "eval"
            dataset_cls = self.train_dataset_cls if mode == "train" else self.eval_dataset_cls
            for kind, processors in (("vis_processor", self.vis_processors), ("text_processor", self.text_processors)):
                if processors[mode] is None:  # the block names processors, but not for this mode
                    raise ValueError(f"{self.key(kind, mode)} is not set, but split {split!r} needs it")
            datasets[split] = dataset_cls(
                vis_processor=self.vis_processors[mode],
                text_processor=self.text_processors[mode],
                vis_root=str(vis_root),
                ann_paths=[str(p) for p in ann_paths],
                name=f"{self.NAME}/{split}",
                **kwargs,
            )
        return datasets


def register_builder_ext(name: str, config: str, **typed_configs: str):
    """Register under ``name``; ``config`` is the default yaml, ``typed_configs`` those a block's ``type:`` selects."""
    def wrap(cls):
        cls.NAME = name
        cls.DATASET_CONFIG_DICT = {t: str(CONFIG_DIR / c) for t, c in dict(typed_configs, default=config).items()}
        return registry.register_builder(name)(cls)

    return wrap


@register_builder_ext("coco_caption_ext", "coco/caption_ext.yaml", eval="coco/caption_eval_ext.yaml")
class COCOCaptionBuilderExt(OfflineBuilderExt):
    """COCO (Karpathy) captions; ``image_id`` as the annotation gives it. ``type: eval``: the test split only."""

    train_dataset_cls = eval_dataset_cls = CaptionDatasetExt


@register_builder_ext("vg_caption_ext", "vg/caption_ext.yaml")
class VGCaptionBuilderExt(OfflineBuilderExt):
    """Visual Genome captions from upstream ``vg_caption.json``, images under ``VG_100K``/``VG_100K_2``."""

    train_dataset_cls = eval_dataset_cls = VGCaptionDatasetExt
    DATASET_KEYS = ("max_bad_image_fraction", "max_missing_fraction")


@register_builder_ext("coco_vqa_ext", "coco/vqa_eval_ext.yaml")
class COCOVQABuilderExt(OfflineBuilderExt):
    """VQAv2 evaluation in LAVIS's ``coco_vqa`` format (eval list, answer list, official questions/annotations)."""

    train_dataset_cls = None
    eval_dataset_cls = VQAEvalDatasetExt


@register_builder_ext("ok_vqa_ext", "okvqa/eval_ext.yaml")
class OKVQABuilderExt(COCOVQABuilderExt):
    """OK-VQA evaluation, same format as VQAv2."""


@register_builder_ext("gqa_ext", "gqa/balanced_testdev_ext.yaml")
class GQABuilderExt(OfflineBuilderExt):
    """GQA evaluation (balanced testdev by default): questions with their answers."""

    train_dataset_cls = None
    eval_dataset_cls = GQAEvalDatasetExt
