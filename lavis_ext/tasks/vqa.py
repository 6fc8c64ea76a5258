"""``vqa_ext`` (VQAv2, OK-VQA) and ``gqa_ext``: LAVIS's VQA tasks, exact and explained.

Scoring is LAVIS's own: the official VQA accuracy (``lavis/common/vqa_tools/vqa_eval.py``:
answer normalisation of punctuation, articles, number words and contractions; soft accuracy
``min(#matching humans / 3, 1)`` averaged over the ten leave-one-out subsets), and for GQA
exact match of the normalised prediction (``lavis/tasks/vqa.py:197-220``). What differs from
``lavis/tasks/vqa.py``:

- ``valid_step`` (``:97-115``) did not pass ``length_penalty`` (set it as ``run.length_penalty``)
  and called ``.item()`` on question ids, which GQA gives as strings.
- Results are gathered, checked and written as :mod:`lavis_ext.tasks.common` describes, with a
  predictions file holding each question, the prediction, the human answers and its score,
  and a report of accuracy by answer type and the 20 most frequent wrong answers.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from lavis.common.registry import registry
from lavis.common.vqa_tools.vqa import VQA
from lavis.common.vqa_tools.vqa_eval import VQAEval
from lavis.tasks.vqa import VQATask

from lavis_ext.checkpoint import atomic_write_text
from lavis_ext.datasets.vqa import most_common_answer
from lavis_ext.tasks.common import EvalTaskMixin, format_table, most_frequent

YES_NO = ("yes", "no")
_NORMALIZER = VQAEval()  # its text processing needs no data


def normalize_answer(text: str) -> str:
    """The official VQA normalisation, exactly as ``VQAEval.evaluate`` applies it to a prediction."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _NORMALIZER.processDigitArticle(_NORMALIZER.processPunctuation(text))


@dataclass
class VQAScore:
    metrics: dict          # agg_metrics (overall) and one entry per answer type, in percent
    accuracy: dict         # question id -> accuracy in percent
    answers: dict          # question id -> the human answers, as annotated
    answer_type: dict      # question id -> answer type


def score_vqa(predictions: dict, ques_file: str, anno_file: str, result_file: Path) -> VQAScore:
    """Score ``{question_id: answer}`` with the official VQA evaluation against the two official files.

    ``result_file`` receives the predictions in the official results format, which VQAEval reads.
    """
    vqa = VQA(str(anno_file), str(ques_file))
    expected = set(vqa.getQuesIds())
    if set(predictions) != expected:
        missing, extra = expected - set(predictions), set(predictions) - expected
        raise ValueError(f"predictions do not cover the questions of {ques_file} / {anno_file}: "
                         f"{len(missing)} missing (e.g. {sorted(missing)[:3]}), {len(extra)} not in them "
                         f"(e.g. {sorted(extra)[:3]}); the eval list must hold the same questions")
    answers = {q: [a["answer"] for a in vqa.qa[q]["answers"]] for q in expected}
    atomic_write_text(result_file, json.dumps([{"question_id": q, "answer": a} for q, a in predictions.items()]))
    scorer = VQAEval(vqa, vqa.loadRes(resFile=str(result_file), quesFile=str(ques_file)), n=2)
    scorer.evaluate()
    metrics = {"agg_metrics": scorer.accuracy["overall"], **scorer.accuracy["perAnswerType"]}
    return VQAScore(metrics, scorer.evalQA, answers, {q: vqa.qa[q]["answer_type"] for q in expected})


def answer_report(title: str, metrics: dict, rows: list[dict]) -> list[str]:
    """Accuracy by answer type, then the 20 most frequent wrong answers (scored 0) with their usual truth.

    ``rows`` hold ``prediction``, ``answers`` (the truth), ``answer_type`` and ``accuracy`` (percent).
    """
    by_type: dict[str, list[float]] = {}
    for row in rows:
        by_type.setdefault(row["answer_type"], []).append(row["accuracy"])
    lines = [f"{title}: {len(rows)} questions, accuracy {metrics['agg_metrics']:.2f}", ""]
    lines += format_table(("answer type", "questions", "accuracy"),
                          [(t, len(a), f"{sum(a) / len(a):.2f}") for t, a in sorted(by_type.items())])
    wrong = [(normalize_answer(row["prediction"]), row["answers"]) for row in rows if row["accuracy"] == 0]
    truths: dict[str, Counter] = {}
    for prediction, answers in wrong:
        truths.setdefault(prediction, Counter())[most_common_answer(answers)] += 1
    top = most_frequent(prediction for prediction, _ in wrong)
    lines += ["", f"{len(wrong)} answers scored 0; the most frequent (normalised as scored):"]
    lines += format_table(("prediction", "count", "usual truth"),
                          [(repr(p), n, truths[p].most_common(1)[0][0]) for p, n in top])
    return lines


def question_ids(samples: dict) -> list:
    ids = samples["question_id"]
    return ids.tolist() if torch.is_tensor(ids) else list(ids)


@registry.register_task("vqa_ext")
class VQATaskExt(EvalTaskMixin, VQATask):
    """Run keys as LAVIS's ``vqa`` task, plus an optional ``length_penalty``."""

    ID_KEY = "question_id"

    def predict(self, model, samples: dict) -> list[str]:
        return model.predict_answers(
            samples=samples, answer_list=self.answer_list, inference_method=self.inference_method,
            num_beams=self.num_beams, max_len=self.max_len, min_len=self.min_len,
            num_ans_candidates=self.num_ans_candidates, prompt=self.prompt, **self.extra_generate_kwargs)

    def valid_step(self, model, samples):
        return [{"question_id": q, "answer": a} for q, a in zip(question_ids(samples), self.predict(model, samples))]

    def score(self, rows: list[dict], split_name: str):
        if split_name not in self.ques_files:
            raise ValueError(f"split {split_name!r} has no official questions/annotations files: list them as the "
                             f"3rd and 4th build_info.annotations.{split_name}.storage entries")
        predictions = {row["question_id"]: row["answer"] for row in rows}
        result_file = Path(registry.get_path("result_dir")) / f"{split_name}_vqa_result.json"
        result = score_vqa(predictions, self.ques_files[split_name], self.anno_files[split_name], result_file)
        rows = [{"question_id": q, "question": self.eval_dataset.questions[q], "prediction": a,
                 "answers": result.answers[q], "answer_type": result.answer_type[q], "accuracy": result.accuracy[q]}
                for q, a in predictions.items()]
        return result.metrics, rows, answer_report(f"VQA {split_name}", result.metrics, rows)


@registry.register_task("gqa_ext")
class GQATaskExt(VQATaskExt):
    """GQA: exact match of the normalised prediction with the answer; answer types are yes/no and other."""

    def score(self, rows: list[dict], split_name: str):
        truth = {ann["question_id"]: ann["answer"] for ann in self.eval_dataset.annotation}
        rows = [{"question_id": r["question_id"], "question": self.eval_dataset.questions[r["question_id"]],
                 "prediction": r["answer"], "answers": [truth[r["question_id"]]],
                 "answer_type": "yes/no" if truth[r["question_id"]] in YES_NO else "other",
                 "accuracy": 100.0 * (normalize_answer(r["answer"]) == truth[r["question_id"]])} for r in rows]
        accuracy = sum(r["accuracy"] for r in rows) / len(rows)
        metrics = {"agg_metrics": accuracy, "acc": accuracy}
        return metrics, rows, answer_report(f"GQA {split_name}", metrics, rows)
