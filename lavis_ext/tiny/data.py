"""Tiny image-caption and VQA files in the real sets' layouts, generated on the fly for tests.

Small JPEGs with one coloured shape, and annotation files that LAVIS's builders read exactly as
they read the real sets; each writer's docstring names where its layout comes from:
COCO Karpathy train/val/test (``make_coco_karpathy``), Visual Genome with upstream absolute
paths (``make_vg_caption_data``), VQAv2 (``make_vqav2_data``), OK-VQA (``make_okvqa_data``)
and GQA testdev (``make_gqa_testdev``). ``make_caption_data`` is a shortcut: Karpathy-train
records with short generated file names, for training runs that need nothing more.
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


UPSTREAM_VG_ROOT = "/export/share/datasets/vision/visual-genome/image"


def make_vg_caption_data(root: str | Path, num_images: int = 6, size: int = 32, seed: int = 1,
                         name: str = "vg_caption.json") -> Path:
    """Visual Genome captions as LAVIS ships them; returns the json path (``<root>/<name>``).

    Layout of ``vg_caption.json`` (``lavis/configs/datasets/vg/defaults_caption.yaml``; see
    ``../shared/notes/lavis-1.0.2-facts.md`` section 7): records ``{"image":
    "/export/share/datasets/vision/visual-genome/image/<id>.jpg", "caption", "image_id":
    "vg_<id>"}`` with Salesforce's absolute paths, while the images are where LAVIS's
    ``download_vg.py`` puts them: ``<root>/images/VG_100K/<id>.jpg`` (odd ids here) and
    ``<root>/images/VG_100K_2/<id>.jpg`` (even ids). Ids count from 1.
    """
    rng = random.Random(seed)
    root = Path(root)
    annotations = []
    for n in range(1, num_images + 1):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        folder = root / "images" / ("VG_100K" if n % 2 else "VG_100K_2")
        folder.mkdir(parents=True, exist_ok=True)
        draw_shape(colour, shape, size).save(folder / f"{n}.jpg")
        annotations.append({"image": f"{UPSTREAM_VG_ROOT}/{n}.jpg", "caption": f"a {colour} {shape}",
                            "image_id": f"vg_{n}"})
    ann_path = root / name
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
    """A shortcut for training runs: Karpathy-train records (``{"image", "caption", "image_id"}``,
    one caption each) with short file names, ``<root>/images/<split>/N.jpg``; ids ``<id_prefix>N``.
    Writes ``<root>/<split>.json`` and returns its path. The real layout: :func:`make_coco_karpathy`."""
    root = Path(root)
    annotations = []
    for n, (name, colour, shape) in enumerate(_shape_images(root, split, num_images, size, seed)):
        for template in ("a {c} {s}", "a picture of a {c} {s}")[:captions_per_image]:
            annotations.append({"image": name, "caption": template.format(c=colour, s=shape),
                                "image_id": f"{id_prefix}{n}"})
    ann_path = root / f"{split}.json"
    ann_path.write_text(json.dumps(annotations))
    return ann_path


# --------------------------------------------------------------------------- the real sets' layouts

COCO_FIRST_ID = 391895  # a real COCO val2014 image id; the generated ones count up from it


def coco_image_name(folder: str, image_id: int) -> str:
    """COCO 2014's file naming, e.g. ``val2014/COCO_val2014_000000391895.jpg``."""
    return f"{folder}/COCO_{folder}_{image_id:012d}.jpg"


def _coco_images(root: Path, folder: str, first_id: int, num_images: int, size: int,
                 seed: int) -> list[tuple[int, str, str, str]]:
    """Draw images under ``<root>/images/<folder>/`` in COCO's naming; return (id, name, colour, shape)."""
    rng = random.Random(seed)
    (root / "images" / folder).mkdir(parents=True, exist_ok=True)
    drawn = []
    for n in range(num_images):
        image_id = first_id + 7 * n
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        name = coco_image_name(folder, image_id)
        draw_shape(colour, shape, size).save(root / "images" / name)
        drawn.append((image_id, name, colour, shape))
    return drawn


KARPATHY_CAPTIONS = ("a {c} {s}", "a picture of a {c} {s}", "a {c} {s} on a white background",
                     "one {c} {s} in the middle", "a single {c} {s}")


def make_coco_karpathy(root: str | Path, num_images: dict[str, int] | None = None, size: int = 32,
                       seed: int = 0) -> dict[str, Path]:
    """COCO Karpathy splits in the layout of LAVIS's ``coco_karpathy_{train,val,test}.json``.

    Layout from ``lavis/configs/datasets/coco/defaults_cap.yaml`` (the files at
    ``storage.googleapis.com/sfr-vision-language-research/datasets/``) and their readers
    ``lavis/datasets/datasets/caption_datasets.py`` (train: ``ann["image_id"]``, one caption)
    and ``coco_caption_datasets.py`` ``COCOCapEvalDataset`` (val/test: no id, so it is cut from
    the file name). Train: one record per caption, ``{"caption", "image":
    "val2014/COCO_val2014_000000328757.jpg", "image_id": "coco_328757"}`` (Karpathy's train
    split draws on both COCO folders). Val/test: one record per image, ``{"image":
    "val2014/COCO_val2014_<12-digit id>.jpg", "caption": [5 captions]}``.

    Images are ``<root>/images/{train2014,val2014}/``; ``num_images``: the splits to write and
    their sizes (default train 4, val 2, test 5). Returns ``{split: <root>/annotations/coco_karpathy_<split>.json}``.
    """
    root = Path(root)
    counts = num_images or {"train": 4, "val": 2, "test": 5}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    first_id = COCO_FIRST_ID
    paths = {}
    for k, (split, count) in enumerate(counts.items()):
        folder = "train2014" if split == "train" and k % 2 == 0 else "val2014"
        images = _coco_images(root, folder, first_id, count, size, seed + k)
        first_id += 7 * count
        if split == "train":
            records = [{"caption": t.format(c=colour, s=shape), "image": name, "image_id": f"coco_{image_id}"}
                       for image_id, name, colour, shape in images for t in KARPATHY_CAPTIONS]
        else:
            records = [{"image": name, "caption": [t.format(c=colour, s=shape) for t in KARPATHY_CAPTIONS]}
                       for _, name, colour, shape in images]
        paths[split] = root / "annotations" / f"coco_karpathy_{split}.json"
        paths[split].write_text(json.dumps(records))
    return paths


OFFICIAL_HEADER = {"info": {"description": "lavis-ext generated", "version": "1.0"},
                   "license": {"name": "none", "url": ""}, "data_type": "mscoco", "data_subtype": "val2014"}


def _ten_answers(answer: str, others: tuple[str, ...]) -> list[str]:
    """Ten human answers: mostly ``answer``, some disagreeing, as real annotators do."""
    return [answer] * 7 + list(others[:3]) + [answer] * (3 - len(others[:3]))


def _write_vqa_layout(root: Path, names: tuple[str, str, str, str], records: list[dict], answer_list: list[str],
                      annotations: list[dict]) -> list[Path]:
    """LAVIS's eval list, the answer list, and the official questions/annotations files, in builder order."""
    root.mkdir(parents=True, exist_ok=True)
    questions = dict(OFFICIAL_HEADER, task_type="Open-Ended", questions=[
        {"image_id": a["image_id"], "question": r["question"], "question_id": r["question_id"]}
        for r, a in zip(records, annotations)])
    contents = (records, answer_list, questions, dict(OFFICIAL_HEADER, annotations=annotations))
    paths = [root / name for name in names]
    for path, content in zip(paths, contents):
        path.write_text(json.dumps(content))
    return paths


def make_vqav2_data(root: str | Path, num_images: int = 5, size: int = 32, seed: int = 0) -> list[Path]:
    """VQAv2 val in the four files of LAVIS's ``coco_vqa`` val split, with their real names.

    Layout from ``lavis/configs/datasets/coco/defaults_vqa.yaml`` (val: ``vqa_val_eval.json``,
    ``answer_list.json``, ``v2_OpenEnded_mscoco_val2014_questions.json``,
    ``v2_mscoco_val2014_annotations.json``), the eval list's reader
    ``coco_vqa_datasets.py`` ``COCOVQAEvalDataset`` (``question_id``, ``question``, ``image``;
    ``answer``: the 10 human answers) and the official VQAv2 formats that
    ``lavis/common/vqa_tools/vqa.py`` reads (questions with ``info``/``task_type``/
    ``data_type``/``data_subtype``/``license``; annotations with ``question_type``,
    ``answer_type`` in yes/no, number, other, ``multiple_choice_answer`` and 10 ``answers``).
    Question ids are ``image_id * 1000 + k`` as in VQAv2. Images: ``<root>/images/val2014/``.
    """
    root = Path(root)
    records, annotations = [], []
    for image_id, name, colour, shape in _coco_images(root, "val2014", COCO_FIRST_ID, num_images, size, seed):
        asked = [("What color is the shape?", colour, "other", "what color", ("white", colour)),
                 ("Is it a circle?", "yes" if shape == "circle" else "no", "yes/no", "is it", ()),
                 ("How many shapes are there?", "1", "number", "how many", ("2",))]
        for k, (question, answer, answer_type, question_type, others) in enumerate(asked):
            answers = _ten_answers(answer, others)
            question_id = image_id * 1000 + k
            records.append({"question_id": question_id, "question": question, "answer": answers, "image": name,
                            "dataset": "vqa"})
            annotations.append({"question_type": question_type, "multiple_choice_answer": answer,
                                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                            for i, a in enumerate(answers)],
                                "image_id": image_id, "answer_type": answer_type, "question_id": question_id})
    names = ("vqa_val_eval.json", "answer_list.json", "v2_OpenEnded_mscoco_val2014_questions.json",
             "v2_mscoco_val2014_annotations.json")
    return _write_vqa_layout(root / "annotations", names, records, sorted({a for r in records for a in r["answer"]}),
                             annotations)


OKVQA_RAW = {"circle": "circles", "square": "squares"}  # raw answers that OK-VQA's "answer" field stems


def make_okvqa_data(root: str | Path, num_images: int = 5, size: int = 32, seed: int = 0) -> list[Path]:
    """OK-VQA val in the four files of LAVIS's ``ok_vqa`` test split, with their real names.

    Layout from ``lavis/configs/datasets/okvqa/defaults.yaml`` (test: ``vqa_val_eval.json``,
    ``answer_list.json``, ``OpenEnded_mscoco_val2014_questions.json``,
    ``mscoco_val2014_annotations.json``) and OK-VQA's official annotations: every
    ``answer_type`` is ``"other"``, ``question_type`` is a knowledge category (``"one"`` ...
    ``"ten"``), 10 answers each with ``raw_answer`` and its stemmed ``answer`` (5 annotators,
    each answer given twice), a ``confidence``, and no ``multiple_choice_answer``. Question
    ids are ``image_id * 10 + k``. Images: ``<root>/images/val2014/``.
    """
    root = Path(root)
    records, annotations = [], []
    for image_id, name, colour, shape in _coco_images(root, "val2014", COCO_FIRST_ID, num_images, size, seed):
        asked = [("What color is this shape usually called?", colour, colour, "three"),
                 ("What shape would you call this?", shape, OKVQA_RAW[shape], "eight")]
        for k, (question, answer, raw, category) in enumerate(asked):
            five = [(answer, raw)] * 4 + [("round" if shape == "circle" else "box",) * 2]
            answers = [pair for pair in five for _ in range(2)]
            question_id = image_id * 10 + k
            records.append({"question_id": question_id, "question": question, "answer": [a for a, _ in answers],
                            "image": name, "dataset": "okvqa"})
            annotations.append({"image_id": image_id, "answer_type": "other", "question_type": category,
                                "question_id": question_id, "confidence": 3,
                                "answers": [{"answer_id": i + 1, "raw_answer": r, "answer_confidence": "yes",
                                             "answer": a} for i, (a, r) in enumerate(answers)]})
    names = ("vqa_val_eval.json", "answer_list.json", "OpenEnded_mscoco_val2014_questions.json",
             "mscoco_val2014_annotations.json")
    return _write_vqa_layout(root / "annotations", names, records, sorted({a for r in records for a in r["answer"]}),
                             annotations)


def make_gqa_testdev(root: str | Path, num_images: int = 5, size: int = 32, seed: int = 0) -> Path:
    """GQA balanced testdev as LAVIS's ``testdev_balanced_questions.json``; returns its path.

    Layout from ``lavis/configs/datasets/gqa/balanced_testdev.yaml`` and its reader
    ``lavis/datasets/datasets/gqa_datasets.py`` ``GQAEvalDataset`` (``image``, ``question``,
    ``question_id``, ``answer``: one string), with GQA's own naming: string question ids of
    digits (``"20968379"``), testdev image files ``n<digits>.jpg`` directly under the image root.
    """
    root = Path(root)
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for n in range(num_images):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        image = f"n{161313 + 17 * n}.jpg"
        draw_shape(colour, shape, size).save(root / "images" / image)
        records += [{"image": image, "question": "What color is the shape?", "question_id": str(20968379 + 10 * n),
                     "answer": colour},
                    {"image": image, "question": "Is it a square?", "question_id": str(20968380 + 10 * n),
                     "answer": "yes" if shape == "square" else "no"}]
    path = root / "annotations" / "testdev_balanced_questions.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path
