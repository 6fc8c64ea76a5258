"""VQA evaluation datasets (VQAv2/OK-VQA in LAVIS's ``coco_vqa`` format, GQA) with checked files,
and :func:`write_vqa_files`, which writes that format (for generated data).

Same annotation formats as LAVIS 1.0.2, read with the checks of
:class:`~lavis_ext.datasets.base.ImageDatasetExt`:

- ``coco_vqa`` eval (``lavis/datasets/datasets/coco_vqa_datasets.py`` ``COCOVQAEvalDataset``):
  four files, in order: the eval list ``[{"question_id", "question", "image", ["answer"]}]``,
  the answer list, and the official questions and annotations files that VQAEval scores
  against. Upstream silently set ``answer_list = None`` when its file was missing and
  skipped the official files when fewer were given; here each configured file must exist.
- GQA (``gqa_datasets.py`` ``GQAEvalDataset``): ``[{"question_id", "question", "image", "answer"}]``
  and optionally an answer list.

Question ids stay as the annotation gives them (GQA's are strings such as ``"20968379"``;
upstream's ``VQATask.valid_step`` called ``.item()`` on them).
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from PIL import Image

from lavis_ext.datasets.base import AnnSource, DataError, ImageDatasetExt, read_json

logger = logging.getLogger(__name__)


class VQAEvalDatasetExt(ImageDatasetExt):
    """``ann_paths = [eval list, answer list, official questions, official annotations]``."""

    REQUIRED_KEYS = ("image", "question", "question_id")
    LIST_KEYS = ("question_id",)
    NUM_RECORD_FILES = 1

    def __init__(self, vis_processor, text_processor, vis_root, ann_paths, **kwargs):
        super().__init__(vis_processor, text_processor, vis_root, ann_paths, **kwargs)
        extra = list(ann_paths)[1:]
        self.answer_list = read_json(extra[0], "answer list") if extra else None
        # VQATask.build_datasets reads these two to score with the official VQA evaluation
        self.coco_fmt_qust_file = str(extra[1]) if len(extra) > 1 else None
        self.coco_fmt_anno_file = str(extra[2]) if len(extra) > 2 else None
        self.questions = {ann["question_id"]: ann["question"] for ann in self.annotation}

    @classmethod
    def check_record(cls, record, source: AnnSource) -> None:
        super().check_record(record, source)
        if not isinstance(record["question"], str):
            raise DataError(f"{source}: 'question' must be a string, got {record['question']!r}")
        if not isinstance(record["question_id"], (int, str)):
            raise DataError(f"{source}: 'question_id' must be an int or a string, got {record['question_id']!r}")

    def _select(self, annotations: list[dict], sources: list[AnnSource]):
        """One record per ``question_id``: an exact repeat is dropped; a different record under the
        same id is refused, naming both (one would be scored against the other's answers)."""
        first: dict = {}
        kept, kept_sources = [], []
        for record, source in zip(annotations, sources):
            qid = record["question_id"]
            if qid not in first:
                first[qid] = (record, source)
                kept.append(record)
                kept_sources.append(source)
                continue
            earlier, earlier_source = first[qid]
            if record != earlier:
                raise DataError(f"question_id {qid!r} is used by two different records: {earlier_source} and {source}")
            logger.warning("%s repeats %s (question_id %r): dropped", source, earlier_source, qid)
        return kept, kept_sources

    def _sample(self, index: int, image: Image.Image) -> dict:
        ann = self.annotation[index]
        return {
            "image": self.vis_processor(image),
            "text_input": self.text_processor(ann["question"]),
            "question_id": ann["question_id"],
        }


class GQAEvalDatasetExt(VQAEvalDatasetExt):
    """``ann_paths = [questions with answers, (answer list)]``; samples carry the true ``answer``."""

    REQUIRED_KEYS = ("image", "question", "question_id", "answer")
    LIST_KEYS = ("question_id", "answer")

    @classmethod
    def check_record(cls, record, source: AnnSource) -> None:
        super().check_record(record, source)
        if not isinstance(record["answer"], str):
            raise DataError(f"{source}: 'answer' must be a string, got {record['answer']!r}")

    def _sample(self, index: int, image: Image.Image) -> dict:
        return {**super()._sample(index, image), "answer": self.annotation[index]["answer"]}


def most_common_answer(answers: list[str]) -> str:
    """The answer most humans gave; on a tie, the first given (VQAv2's ``multiple_choice_answer``)."""
    return Counter(answers).most_common(1)[0][0]


def write_vqa_files(root: str | Path, split: str, questions: list[dict]) -> list[Path]:
    """Write LAVIS ``coco_vqa`` eval files for ``questions`` and return their paths in builder order.

    Each question is ``{"question_id", "image_id", "image", "question", "answers": [10 str],
    "answer_type", "question_type"}``. Files: ``vqa_<split>.json`` (LAVIS's list), the split's
    ``answer_list.json`` (``answer_list_<split>.json``), and the official ``<split>_questions.json`` /
    ``<split>_annotations.json`` that VQAEval reads (with the header keys its ``loadRes`` copies).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    header = {"info": {"description": "lavis-ext generated VQA"}, "license": {"name": "none"},
              "data_type": "mscoco", "data_subtype": split}
    eval_list = [{"question_id": q["question_id"], "question": q["question"], "image": q["image"],
                  "image_id": q["image_id"], "answer": q["answers"]} for q in questions]
    official_questions = dict(header, task_type="Open-Ended", questions=[
        {"image_id": q["image_id"], "question": q["question"], "question_id": q["question_id"]} for q in questions])
    annotations = dict(header, annotations=[
        {"question_id": q["question_id"], "image_id": q["image_id"], "question_type": q["question_type"],
         "answer_type": q["answer_type"], "multiple_choice_answer": most_common_answer(q["answers"]),
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(q["answers"])]}
        for q in questions])
    files = {f"vqa_{split}.json": eval_list,
             f"answer_list_{split}.json": sorted({a for q in questions for a in q["answers"]}),
             f"{split}_questions.json": official_questions, f"{split}_annotations.json": annotations}
    for name, content in files.items():
        (root / name).write_text(json.dumps(content))
    return [root / name for name in files]
