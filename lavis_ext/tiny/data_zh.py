"""Tiny Chinese caption sets written in their official file layouts, for tests.

Each writer draws small single-shape JPEGs (:func:`lavis_ext.tiny.data.draw_shape`) with Chinese
sentences about them, and lays the files out as the set ships them, so that the builders of
:mod:`lavis_ext.datasets.caption_zh` read them exactly as they read the real files. Each returns
:class:`TinySet`: the ``storage`` of every split's annotations and of the images.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from lavis_ext.tiny.data import COLOURS, SHAPES, draw_shape

COLOURS_ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色"}
SHAPES_ZH = {"circle": "圆形", "square": "方形"}
# two sentences an image, word-segmented (as Flickr30k-CN ships them); the other sets' are unsegmented
TEMPLATES = ("一个 {c} 的 {s} 。", "白色 背景 上 有 一个 {c} 的 {s}")


@dataclass
class TinySet:
    annotations: dict[str, list[Path]]  # split -> build_info.annotations.<split>.storage
    images: Path  # build_info.images.storage

    def options(self, builder: str, split: str) -> list[str]:
        """``--options`` that point ``builder``'s ``split`` and images at these files."""
        storage = "[" + ",".join(str(p) for p in self.annotations[split]) + "]"
        return [f"datasets.{builder}.build_info.annotations.{split}.storage={storage}",
                f"datasets.{builder}.build_info.images.storage={self.images}"]


def _sentences(colour: str, shape: str) -> list[str]:
    """Segmented sentences; ``.replace(" ", "")`` gives them as written."""
    return [t.format(c=COLOURS_ZH[colour], s=SHAPES_ZH[shape]) for t in TEMPLATES]


def _draw(path: Path, rng: random.Random, size: int) -> list[str]:
    colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_shape(colour, shape, size).save(path)
    return _sentences(colour, shape)


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def write_coco_cn(root: str | Path, sizes: dict[str, int], size: int = 32, seed: int = 0) -> TinySet:
    """COCO-CN v201805 (li-xirong/coco-cn; the archive ``coco-cn-version1805v1.1`` as its users read it):
    ``coco-cn_<split>.txt`` lists ``COCO_<train2014|val2014>_<12 digits>``, one a line;
    ``imageid.human-written-caption.txt`` holds ``<image>#<n>\\t<sentence>`` for every split, and
    ``imageid.manually-translated-caption.txt`` the test split's human translations. Images in COCO's
    own folders, ``<root>/images/{train2014,val2014}/<image>.jpg``."""
    root, rng = Path(root), random.Random(seed)
    folder = root / "coco-cn-version1805v1.1"
    written, translated, annotations = [], [], {}
    for s, (split, count) in enumerate(sizes.items()):
        names = [f"COCO_{'train2014' if n % 2 else 'val2014'}_{s * 1000 + n:012d}" for n in range(count)]
        for name in names:
            sentences = _draw(root / "images" / name.split("_")[1] / f"{name}.jpg", rng, size)
            written.append(f"{name}#0\t{sentences[0].replace(' ', '')}")
            if split == "test":
                translated.append(f"{name}#0\t{sentences[1].replace(' ', '')}")
        list_file = _write_lines(folder / f"coco-cn_{split}.txt", names)
        annotations[split] = [folder / "imageid.human-written-caption.txt", list_file]
    _write_lines(folder / "imageid.human-written-caption.txt", written)
    if translated:
        _write_lines(folder / "imageid.manually-translated-caption.txt", translated)
        annotations["test"].insert(1, folder / "imageid.manually-translated-caption.txt")
    return TinySet(annotations, root / "images")


def write_flickr8k_cn(root: str | Path, sizes: dict[str, int], size: int = 32, seed: int = 0) -> TinySet:
    """Flickr8k-CN (li-xirong/flickr8kcn ``data/``): ``flickr8kzhc.caption.txt`` holds
    ``<image>.jpg#zhc#<n> <sentence>`` for all splits; ``flickr8k<split>.txt`` lists the split's image
    names without ``.jpg``. Images are ``<root>/Flicker8k_Dataset/<image>.jpg`` (Flickr8k's zip)."""
    root, rng = Path(root), random.Random(seed)
    lines, annotations = [], {}
    caption_file = root / "data" / "flickr8kzhc.caption.txt"
    for s, (split, count) in enumerate(sizes.items()):
        names = [f"{1000 + s * 100 + n}_{n:010x}" for n in range(count)]
        for name in names:
            sentences = _draw(root / "Flicker8k_Dataset" / f"{name}.jpg", rng, size)
            lines += [f"{name}.jpg#zhc#{k} {sentence.replace(' ', '')}" for k, sentence in enumerate(sentences)]
        annotations[split] = [caption_file, _write_lines(root / "data" / f"flickr8k{split}.txt", names)]
    _write_lines(caption_file, lines)
    return TinySet(annotations, root / "Flicker8k_Dataset")


FLICKR30K_CN_FOLDERS = {"train": "flickr30kzhbbosontrain", "val": "flickr30kzhbbosonval", "test": "flickr30kzhmbosontest"}


def write_flickr30k_cn(root: str | Path, sizes: dict[str, int], size: int = 32, seed: int = 0) -> TinySet:
    """Flickr30k-CN (weiyuk/fluent-cap's ``flickr30k-cn.tar.gz``, the VisualSearch layout): a folder per
    split (:data:`FLICKR30K_CN_FOLDERS`) with ``ImageSets/<folder>.txt`` (image ids) and
    ``TextData/seg.<folder>.caption.txt``, lines ``<id>.jpg#<zhb|zhm>#<n> <words separated by spaces>``.
    Images are ``<root>/flickr30k-images/<id>.jpg``."""
    root, rng = Path(root), random.Random(seed)
    annotations = {}
    for s, (split, count) in enumerate(sizes.items()):
        folder = FLICKR30K_CN_FOLDERS[split]
        tag = "zhm" if split == "test" else "zhb"
        ids = [str(100000 + s * 1000 + n) for n in range(count)]
        lines = []
        for image_id in ids:
            sentences = _draw(root / "flickr30k-images" / f"{image_id}.jpg", rng, size)
            lines += [f"{image_id}.jpg#{tag}#{k} {sentence}" for k, sentence in enumerate(sentences)]
        annotations[split] = [_write_lines(root / folder / "TextData" / f"seg.{folder}.caption.txt", lines),
                              _write_lines(root / folder / "ImageSets" / f"{folder}.txt", ids)]
    return TinySet(annotations, root / "flickr30k-images")


AIC_ARCHIVES = {"train": ("train", "20170902"), "val": ("validation", "20170910")}


def write_aic_icc(root: str | Path, sizes: dict[str, int], size: int = 32, seed: int = 0) -> TinySet:
    """AI Challenger 2017 captioning, as its archives extract: ``ai_challenger_caption_<split>_<date>/``
    holding ``caption_<split>_annotations_<date>.json`` (a JSON list of ``{"url", "image_id":
    "<sha1>.jpg", "caption": [5 sentences]}``) and ``caption_<split>_images_<date>/<sha1>.jpg``."""
    root, rng = Path(root), random.Random(seed)
    annotations = {}
    for split, count in sizes.items():
        name, date = AIC_ARCHIVES[split]
        archive = root / f"ai_challenger_caption_{name}_{date}"
        records = []
        for n in range(count):
            image_id = f"{rng.getrandbits(160):040x}.jpg"
            sentences = _draw(archive / f"caption_{name}_images_{date}" / image_id, rng, size)
            five = [sentences[k % 2].replace(" ", "") for k in range(5)]
            records.append({"url": f"http://img.example/{image_id}", "image_id": image_id, "caption": five})
        ann = archive / f"caption_{name}_annotations_{date}.json"
        ann.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        annotations[split] = [ann]
    return TinySet(annotations, root)
