"""A procedural world of coloured shapes, written in COCO-caption and VQAv2 formats.

    python -m lavis_ext.demo.world ROOT [--seed 0] [--train 4000 --val 200 --test 300]

Each image is ``IMAGE_SIZE`` pixels square, cut into a ``GRID`` x ``GRID`` grid of cells; 1-4
objects sit in distinct cells, one object per cell, jittered by a pixel or two. An object has one
of :data:`COLOURS` and one of :data:`SHAPES`; objects of the same colour and shape form a group,
and the caption names the groups in a fixed order: ``"two red circles and a blue square"``.
Cells are :data:`CELL` pixels wide, the patch size of the demo's ViT, so each object fills one
patch.

Files under ``ROOT`` (everything is a pure function of the seed):

- ``images/<split>/<image_id>.png``
- ``<split>.json``: COCO Karpathy captions; ``train`` has one record per caption
  (``{"image", "caption", "image_id"}``), ``val``/``test`` one record per image with a caption list.
- ``<split>_zh.json``: the same in Chinese (``"两个红色圆形和一个蓝色方形"``), for the
  ``synthetic_caption_zh`` builder (prompt ``一张图片的描述：``).
- ``objects_<split>.json``: ``{image_id: [{"colour", "shape", "row", "col", "x", "y"}]}`` (ground truth).
- ``conversations_<split>.json``: LLaVA-format multi-turn conversations about each image (its
  questions of all three answer types in random order, ``<image>`` in the first human turn; one in
  :data:`CHINESE_FRACTION` in Chinese), for the ``llava_conversation`` builder (instruction tuning).
- VQA in LAVIS's ``coco_vqa`` eval format (:func:`~lavis_ext.datasets.vqa.write_vqa_files`):
  ``vqa_<split>.json`` (``question_id``, ``question``, ``answer`` x 10, ``image``, ``image_id``),
  ``answer_list_<split>.json``, and the official ``<split>_questions.json`` and
  ``<split>_annotations.json``.

Answer types: ``yes/no`` (is there anything <colour>? are there any <shape>s?), ``number``
(how many objects / <shape>s / <colour> objects) and ``other`` (what colour is the <shape>? what
shape is the <colour> object?, asked only where the answer is unique). Answers are already in
VQA-normalised form (lowercase, digits).

Scoring: :func:`attribute_scores` parses generated captions (:func:`parse_caption`, or
:func:`parse_caption_zh` for Chinese ones) and compares colours (F1), shapes (F1) and the object
count (accuracy) with the truth;
:func:`majority_baseline` is the VQA accuracy of always giving the train split's most common
answer of each answer type, :func:`chance_baseline` that of a uniformly random answer of the type.

Registers the ``synthetic_caption``, ``synthetic_caption_zh`` and ``synthetic_vqa`` builders (default
configs in ``configs/datasets/synthetic/``); the caption builders take a ``prompt`` (see
:mod:`lavis_ext.datasets.caption_zh`), so one run trains on both languages.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from lavis_ext.datasets.base import read_json
from lavis_ext.datasets.builders import COCOVQABuilderExt, register_builder_ext
from lavis_ext.datasets.caption_zh import PromptedBuilderExt
from lavis_ext.datasets.vqa import write_vqa_files

COLOURS = {"red": (220, 30, 30), "green": (20, 160, 40), "blue": (30, 60, 230), "yellow": (235, 200, 0),
           "purple": (140, 30, 180), "orange": (255, 130, 0)}
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
# Chinese captions (the blog's goal): "两个红色圆形和一个蓝色方形"
COLOURS_ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色", "purple": "紫色", "orange": "橙色"}
SHAPES_ZH = {"circle": "圆形", "square": "方形", "triangle": "三角形", "cross": "十字"}
NUMBER_WORDS_ZH = {1: "一个", 2: "两个", 3: "三个", 4: "四个"}
CELL = 16  # pixels per grid cell = the demo ViT's patch size
GRID = 4
IMAGE_SIZE = CELL * GRID
MAX_OBJECTS = 4
BACKGROUND = (255, 255, 255)
SPLITS = ("train", "val", "test")
ID_OFFSET = {"train": 0, "val": 1_000_000, "test": 2_000_000}  # image ids are unique across splits
ANSWERS_PER_QUESTION = 10
ANSWER_TYPES = ("yes/no", "number", "other")
DEFAULT_SIZES = {"train": 4000, "val": 200, "test": 300}  # images per split
CHINESE_FRACTION = 0.25  # of the conversations
# The English question templates of questions(), in Chinese; answers: yes/no, digits, colours and shapes.
QUESTIONS_ZH = {
    r"is there anything (\w+)\?": "图片里有{colour}的东西吗？",
    r"are there any (\w+)\?": "图片里有{shape}吗？",
    r"how many objects are there\?": "图片里有几个物体？",
    r"how many (\w+) objects are there\?": "图片里有几个{colour}的物体？",
    r"how many (\w+) are there\?": "图片里有几个{shape}？",
    r"what colour is the (\w+)\?": "{shape}是什么颜色？",
    r"what shape is the (\w+) object\?": "{colour}的物体是什么形状？",
}
YES_NO_ZH = {"yes": "是", "no": "否"}


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    row: int
    col: int
    x: int  # centre, pixels
    y: int


# --------------------------------------------------------------------------- scenes and images


def sample_scene(rng: random.Random) -> list[Obj]:
    """1-4 objects in distinct cells, grouped into 1-3 distinct (colour, shape) kinds."""
    count = rng.randint(1, MAX_OBJECTS)
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], rng.randint(1, min(count, 3)))
    labels = kinds + [rng.choice(kinds) for _ in range(count - len(kinds))]
    cells = rng.sample(range(GRID * GRID), count)
    objects = []
    for (colour, shape), cell in zip(labels, cells):
        row, col = divmod(cell, GRID)
        x = col * CELL + CELL // 2 + rng.randint(-1, 1)
        y = row * CELL + CELL // 2 + rng.randint(-1, 1)
        objects.append(Obj(colour, shape, row, col, x, y))
    return objects


def draw_scene(objects: list[Obj]) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    r = CELL // 2 - 2  # half-size: objects never leave their cell
    for o in objects:
        fill = COLOURS[o.colour]
        box = (o.x - r, o.y - r, o.x + r, o.y + r)
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle((o.x - r + 1, o.y - r + 1, o.x + r - 1, o.y + r - 1), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(o.x, o.y - r), (o.x - r, o.y + r), (o.x + r, o.y + r)], fill=fill)
        else:  # cross
            arm = r // 2
            draw.rectangle((o.x - arm, o.y - r, o.x + arm, o.y + r), fill=fill)
            draw.rectangle((o.x - r, o.y - arm, o.x + r, o.y + arm), fill=fill)
    return image


# --------------------------------------------------------------------------- captions


def groups(objects: list[Obj]) -> list[tuple[int, str, str]]:
    """``(count, colour, shape)`` per kind, in caption order (shape, then colour, as listed above)."""
    counts = Counter((o.shape, o.colour) for o in objects)
    order = sorted(counts, key=lambda k: (SHAPES.index(k[0]), list(COLOURS).index(k[1])))
    return [(counts[k], k[1], k[0]) for k in order]


def caption(objects: list[Obj]) -> str:
    """``"two red circles and a blue square"``."""
    parts = []
    for count, colour, shape in groups(objects):
        if count == 1:
            parts.append(f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}")
        else:
            parts.append(f"{NUMBER_WORDS[count]} {colour} {PLURALS[shape]}")
    return " and ".join(parts)


def caption_zh(objects: list[Obj]) -> str:
    """The Chinese caption, same groups in the same order: ``"两个红色圆形和一个蓝色方形"``."""
    return "和".join(f"{NUMBER_WORDS_ZH[n]}{COLOURS_ZH[c]}{SHAPES_ZH[s]}" for n, c, s in groups(objects))


def eval_captions(objects: list[Obj]) -> list[str]:
    """Reference captions of a val/test image."""
    text = caption(objects)
    return [text, f"a picture of {text}"]


# --------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    answer_type: str
    question_type: str


def questions(objects: list[Obj], rng: random.Random) -> list[QA]:
    """One yes/no (half of them "yes"), one number and, where the answer is unique, one other question."""
    colours = {o.colour for o in objects}
    shapes = {o.shape for o in objects}
    if rng.random() < 0.5:
        colour = rng.choice(sorted(colours) if rng.random() < 0.5 else sorted(set(COLOURS) - colours))
        yes_no = QA(f"is there anything {colour}?", "yes" if colour in colours else "no", "yes/no", "is there")
    else:
        shape = rng.choice(sorted(shapes) if rng.random() < 0.5 else sorted(set(SHAPES) - shapes))
        yes_no = QA(f"are there any {PLURALS[shape]}?", "yes" if shape in shapes else "no", "yes/no", "are there")
    kind = rng.choice(("objects", "shape", "colour"))
    if kind == "objects":
        number = QA("how many objects are there?", str(len(objects)), "number", "how many")
    elif kind == "shape":
        shape = rng.choice(sorted(shapes))
        number = QA(f"how many {PLURALS[shape]} are there?", str(sum(o.shape == shape for o in objects)),
                    "number", "how many")
    else:
        colour = rng.choice(sorted(colours))
        number = QA(f"how many {colour} objects are there?", str(sum(o.colour == colour for o in objects)),
                    "number", "how many")
    result = [yes_no, number]
    colour_of = {s: {o.colour for o in objects if o.shape == s} for s in shapes}
    shape_of = {c: {o.shape for o in objects if o.colour == c} for c in colours}
    other = [QA(f"what colour is the {s}?", next(iter(c)), "other", "what colour is the")
             for s, c in sorted(colour_of.items()) if len(c) == 1]
    other += [QA(f"what shape is the {c} object?", next(iter(s)), "other", "what shape is the")
              for c, s in sorted(shape_of.items()) if len(s) == 1]
    if other:
        result.append(rng.choice(other))
    return result


def word_zh(word: str) -> str:
    """A colour, shape (singular or plural), yes/no or digit answer in Chinese; digits stay."""
    shape = _singular(word)
    return COLOURS_ZH.get(word) or (SHAPES_ZH[shape] if shape else None) or YES_NO_ZH.get(word) or word


def question_zh(question: str) -> str:
    """One of :func:`questions`' English questions in Chinese."""
    for pattern, template in QUESTIONS_ZH.items():
        match = re.fullmatch(pattern, question)
        if match:
            word = word_zh(match.group(1)) if match.groups() else ""
            return template.format(colour=word, shape=word)
    raise ValueError(f"no Chinese template for the question {question!r}")


def conversation(image_id: int, image: str, qas: list[QA], rng: random.Random) -> dict:
    """A LLaVA-format record: the image's questions as turns, in random order, English or Chinese."""
    qas = rng.sample(qas, len(qas))
    chinese = rng.random() < CHINESE_FRACTION
    turns = []
    for k, qa in enumerate(qas):
        question, answer = (question_zh(qa.question), word_zh(qa.answer)) if chinese else (qa.question, qa.answer)
        turns += [{"from": "human", "value": f"<image>\n{question}" if k == 0 else question},
                  {"from": "gpt", "value": answer}]
    return {"id": str(image_id), "image": image, "conversations": turns}


# --------------------------------------------------------------------------- writing a world


def _write_json(path: Path, content) -> None:
    path.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")


def make_world(root: str | Path, seed: int = 0, sizes: dict[str, int] | None = None) -> Path:
    """Write images, captions, objects and VQA files of every split under ``root``; return ``root``."""
    root = Path(root)
    unknown = sorted(set(sizes or {}) - set(SPLITS))
    if unknown:
        raise ValueError(f"make_world: unknown split(s) {unknown} in sizes; expected {list(SPLITS)}")
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    for split in SPLITS:
        rng = random.Random(f"{seed}-{split}")
        conversation_rng = random.Random(f"{seed}-{split}-conversations")  # leaves the other files as they were
        image_dir = root / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        captions, captions_zh, objects_by_id, vqa, conversations = [], [], {}, [], []
        for n in range(sizes[split]):
            image_id = ID_OFFSET[split] + n
            image = f"{split}/{image_id}.png"
            objects = sample_scene(rng)
            draw_scene(objects).save(root / "images" / image)
            objects_by_id[image_id] = [asdict(o) for o in objects]
            if split == "train":
                captions.append({"image": image, "caption": caption(objects), "image_id": image_id})
                captions_zh.append({"image": image, "caption": caption_zh(objects), "image_id": image_id})
            else:
                captions.append({"image": image, "caption": eval_captions(objects), "image_id": image_id})
                captions_zh.append({"image": image, "caption": [caption_zh(objects)], "image_id": image_id})
            qas = questions(objects, rng)
            conversations.append(conversation(image_id, image, qas, conversation_rng))
            for k, qa in enumerate(qas):
                vqa.append({"question_id": image_id * 10 + k, "question": qa.question,
                            "answers": [qa.answer] * ANSWERS_PER_QUESTION, "image": image, "image_id": image_id,
                            "answer_type": qa.answer_type, "question_type": qa.question_type})
        _write_json(root / f"{split}.json", captions)
        _write_json(root / f"{split}_zh.json", captions_zh)
        _write_json(root / f"objects_{split}.json", objects_by_id)
        _write_json(root / f"conversations_{split}.json", conversations)
        write_vqa_files(root, split, vqa)
    return root


# --------------------------------------------------------------------------- scoring


def _singular(word: str) -> str | None:
    if word in SHAPES:
        return word
    return next((s for s, p in PLURALS.items() if p == word), None)


def parse_caption(text: str) -> list[tuple[int, str | None, str]]:
    """``(count, colour or None, shape)`` per shape word; a count word or "a"/"an" before it sets the count."""
    counts = {"a": 1, "an": 1, **{w: n for n, w in NUMBER_WORDS.items()}, **{str(n): n for n in NUMBER_WORDS}}
    found, count, colour = [], 1, None
    for word in text.lower().replace(",", " ").replace(".", " ").split():
        if word in counts:
            count, colour = counts[word], None
        elif word in COLOURS:
            colour = word
        elif shape := _singular(word):
            found.append((count, colour, shape))
            count, colour = 1, None
    return found


def parse_caption_zh(text: str) -> list[tuple[int, str | None, str]]:
    """:func:`parse_caption` of a Chinese caption: ``"两个红色圆形和一个蓝色方形"`` ->
    ``[(2, "red", "circle"), (1, "blue", "square")]``; a shape word without a count word counts 1."""
    counts = {w: n for n, w in NUMBER_WORDS_ZH.items()}
    colours = {w: c for c, w in COLOURS_ZH.items()}
    shapes = {w: s for s, w in SHAPES_ZH.items()}
    pattern = "({})?({})?({})".format(*("|".join(map(re.escape, d)) for d in (counts, colours, shapes)))
    return [(counts.get(n, 1), colours.get(c), shapes[s]) for n, c, s in re.findall(pattern, text)]


def _f1(predicted: set, truth: set) -> float:
    if not predicted or not truth:
        return float(predicted == truth)
    hits = len(predicted & truth)
    return 2 * hits / (len(predicted) + len(truth))


def attribute_scores(predicted: list[str], truth: list[str], parse=parse_caption) -> dict[str, float]:
    """Mean per-caption colour F1, shape F1 and object-count accuracy, and their mean ``attribute``
    (``parse``: :func:`parse_caption`, or :func:`parse_caption_zh` for Chinese captions)."""
    if len(predicted) != len(truth) or not truth:
        raise ValueError(f"attribute_scores: {len(predicted)} predicted for {len(truth)} true captions")
    colour = shape = count = 0.0
    for pred_text, true_text in zip(predicted, truth):
        pred, true = parse(pred_text), parse(true_text)
        if not true:
            raise ValueError(f"attribute_scores: no object in the true caption {true_text!r}")
        colour += _f1({c for _, c, _ in pred if c}, {c for _, c, _ in true})
        shape += _f1({s for _, _, s in pred}, {s for _, _, s in true})
        count += float(sum(n for n, _, _ in pred) == sum(n for n, _, _ in true))
    scores = {"colour_f1": colour / len(truth), "shape_f1": shape / len(truth), "count_acc": count / len(truth)}
    scores["attribute"] = sum(scores.values()) / 3
    return scores


def read_world_file(root: str | Path, name: str):
    """The JSON file ``name`` of the world under ``root``; a missing one says how to write it."""
    path = Path(root) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; write it with lavis_ext.demo.world.make_world")
    return read_json(path, "world file")


def read_annotations(root: str | Path, split: str) -> list[dict]:
    """``<split>_annotations.json``'s annotations; raises naming the file when it is missing or malformed."""
    content = read_world_file(root, f"{split}_annotations.json")
    if "annotations" not in content:
        raise ValueError(f"{Path(root) / f'{split}_annotations.json'}: missing key 'annotations'")
    return content["annotations"]


def vqa_accuracy(predicted: list[str], annotations: list[dict]) -> dict[str, float]:
    """Exact-match accuracy (= VQA accuracy, the 10 answers agree) per answer type and ``overall``."""
    if len(predicted) != len(annotations):
        raise ValueError(f"vqa_accuracy: {len(predicted)} answers for {len(annotations)} questions")
    return _mean_by_type((answer.strip().lower() == ann["multiple_choice_answer"], ann)
                         for answer, ann in zip(predicted, annotations))


def _mean_by_type(scored) -> dict[str, float]:
    """``(score, annotation)`` pairs -> the mean score per answer type and ``overall``."""
    by_type: dict[str, list[float]] = {t: [] for t in ANSWER_TYPES}
    for score, ann in scored:
        by_type[ann["answer_type"]].append(float(score))
    result = {t: sum(v) / len(v) for t, v in by_type.items() if v}
    result["overall"] = sum(map(sum, by_type.values())) / sum(map(len, by_type.values()))
    return result


def majority_baseline(train: list[dict], evaluated: list[dict]) -> dict[str, float]:
    """VQA accuracy on ``evaluated`` of answering every question with the train split's most common
    answer of its answer type (annotations as :func:`read_annotations` returns them)."""
    majority = {t: Counter(a["multiple_choice_answer"] for a in train if a["answer_type"] == t).most_common(1)[0][0]
                for t in {a["answer_type"] for a in train}}
    return vqa_accuracy([majority[a["answer_type"]] for a in evaluated], evaluated)


def chance_baseline(train: list[dict], evaluated: list[dict]) -> dict[str, float]:
    """Expected VQA accuracy on ``evaluated`` of answering uniformly at random among the train split's
    distinct answers of the question's answer type."""
    answers = {t: {a["multiple_choice_answer"] for a in train if a["answer_type"] == t} for t in ANSWER_TYPES}
    return _mean_by_type((float(ann["multiple_choice_answer"] in answers[ann["answer_type"]])
                          / len(answers[ann["answer_type"]]), ann) for ann in evaluated)


# --------------------------------------------------------------------------- LAVIS builder


@register_builder_ext("synthetic_caption", "synthetic/caption.yaml")
class SyntheticCaptionBuilder(PromptedBuilderExt):
    """Captions of the synthetic world, in COCO Karpathy format (``make_world`` writes them)."""


@register_builder_ext("synthetic_caption_zh", "synthetic/caption_zh.yaml")
class SyntheticCaptionZhBuilder(SyntheticCaptionBuilder):
    """The same captions in Chinese (``<split>_zh.json``), with the Chinese caption prompt."""


@register_builder_ext("synthetic_vqa", "synthetic/vqa.yaml")
class SyntheticVQABuilder(COCOVQABuilderExt):
    """The synthetic world's questions for zero-shot evaluation, in the ``coco_vqa`` eval format."""


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    for split in SPLITS:
        parser.add_argument(f"--{split}", type=int, help=f"number of {split} images")
    args = parser.parse_args(argv)
    sizes = {s: getattr(args, s) for s in SPLITS if getattr(args, s) is not None}
    return make_world(args.root, args.seed, sizes)


if __name__ == "__main__":
    main()
