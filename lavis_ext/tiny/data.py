"""Tiny image-caption files in LAVIS's formats, generated on the fly for tests.

``make_caption_data`` writes COCO-Karpathy-style annotations (``image``, ``caption``,
``image_id``) and small JPEGs with coloured shapes, so LAVIS's builders read them exactly
as they read COCO.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")


def draw_shape(colour: str, shape: str, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    box = (size // 5, size // 5, size - size // 5, size - size // 5)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return image


def make_vg_caption_data(root: str | Path, num_images: int = 6, size: int = 32, seed: int = 1) -> Path:
    """Visual Genome as upstream ships it: absolute ``/export/...`` paths in ``vg_caption.json``,
    images split over ``<root>/images/VG_100K`` and ``VG_100K_2``. Returns the json path."""
    rng = random.Random(seed)
    root = Path(root)
    annotations = []
    for n in range(1, num_images + 1):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        folder = root / "images" / ("VG_100K" if n % 2 else "VG_100K_2")
        folder.mkdir(parents=True, exist_ok=True)
        draw_shape(colour, shape, size).save(folder / f"{n}.jpg")
        annotations.append({"image": f"/export/share/datasets/vision/visual-genome/image/{n}.jpg",
                            "caption": f"a {colour} {shape}", "image_id": f"vg_{n}"})
    ann_path = root / "vg_caption.json"
    ann_path.write_text(json.dumps(annotations))
    return ann_path


def make_caption_data(root: str | Path, num_images: int = 8, captions_per_image: int = 2, size: int = 32,
                      seed: int = 0, split: str = "train", id_prefix: str = "coco_") -> Path:
    """Write ``<root>/images/<split>/N.jpg`` and ``<root>/<split>.json``; return the json path."""
    rng = random.Random(seed)
    root = Path(root)
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    annotations = []
    for n in range(num_images):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        name = f"{split}/{n}.jpg"
        draw_shape(colour, shape, size).save(root / "images" / name)
        for template in ("a {c} {s}", "a picture of a {c} {s}")[:captions_per_image]:
            annotations.append({"image": name, "caption": template.format(c=colour, s=shape),
                                "image_id": f"{id_prefix}{n}"})
    ann_path = root / f"{split}.json"
    ann_path.write_text(json.dumps(annotations))
    return ann_path
