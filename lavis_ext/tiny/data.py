"""Tiny image-caption and VQA files in LAVIS's formats, generated on the fly for tests.

Small JPEGs with one coloured shape, and annotations that LAVIS's builders read exactly as they
read the real sets: COCO-Karpathy captions (``make_caption_data``), Visual Genome with upstream
absolute paths (``make_vg_caption_data``), VQAv2 in the ``coco_vqa`` eval format with the official
question/annotation files (``make_vqa_data``) and GQA (``make_gqa_data``).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from lavis_ext.datasets.vqa import write_vqa_files

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


def _shape_images(root: Path, split: str, num_images: int, size: int, seed: int) -> list[tuple[str, str, str]]:
    """Draw ``num_images`` single-shape images under ``<root>/images/<split>/``; return (path, colour, shape)."""
    rng = random.Random(seed)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    drawn = []
    for n in range(num_images):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        name = f"{split}/{n}.jpg"
        draw_shape(colour, shape, size).save(root / "images" / name)
        drawn.append((name, colour, shape))
    return drawn


def make_caption_data(root: str | Path, num_images: int = 8, captions_per_image: int = 2, size: int = 32,
                      seed: int = 0, split: str = "train", id_prefix: str = "coco_") -> Path:
    """Write ``<root>/images/<split>/N.jpg`` and ``<root>/<split>.json``; return the json path."""
    root = Path(root)
    annotations = []
    for n, (name, colour, shape) in enumerate(_shape_images(root, split, num_images, size, seed)):
        for template in ("a {c} {s}", "a picture of a {c} {s}")[:captions_per_image]:
            annotations.append({"image": name, "caption": template.format(c=colour, s=shape),
                                "image_id": f"{id_prefix}{n}"})
    ann_path = root / f"{split}.json"
    ann_path.write_text(json.dumps(annotations))
    return ann_path


def make_vqa_data(root: str | Path, num_images: int = 4, size: int = 32, seed: int = 0, split: str = "val") -> list[Path]:
    """Images plus three questions each (other / yes/no / number) in ``coco_vqa`` eval format."""
    root = Path(root)
    questions = []
    for n, (image, colour, shape) in enumerate(_shape_images(root, split, num_images, size, seed)):
        asked = [("what color is the shape?", colour, "other", "what color"),
                 ("is it a circle?", "yes" if shape == "circle" else "no", "yes/no", "is it"),
                 ("how many shapes are there?", "1", "number", "how many")]
        for k, (question, answer, answer_type, question_type) in enumerate(asked):
            questions.append({"question_id": 10 * n + k, "image_id": n, "image": image, "question": question,
                              "answers": [answer] * 10, "answer_type": answer_type, "question_type": question_type})
    return write_vqa_files(root, split, questions)


def make_gqa_data(root: str | Path, num_images: int = 4, size: int = 32, seed: int = 0, split: str = "val") -> Path:
    """Images and GQA-style questions (string ids, one answer each) as LAVIS's GQA json; return its path."""
    root = Path(root)
    records = []
    for n, (image, colour, shape) in enumerate(_shape_images(root, split, num_images, size, seed)):
        records += [{"question_id": f"{n}0", "image": image, "question": "What color is the shape?", "answer": colour},
                    {"question_id": f"{n}1", "image": image, "question": "Is it a square?",
                     "answer": "yes" if shape == "square" else "no"}]
    path = root / f"{split}_balanced_questions.json"
    path.write_text(json.dumps(records))
    return path
