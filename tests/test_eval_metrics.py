"""Metric exactness: injected predictions scored by vqa_ext / gqa_ext / captioning_ext against hand-computed values."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from lavis_ext.datasets.vqa import most_common_answer, write_vqa_files
from lavis_ext.tasks.captioning import score_captions
from lavis_ext.tasks.common import gather_unique
from lavis_ext.tasks.vqa import GQATaskExt, normalize_answer, score_vqa
from lavis_ext.text import clean_answer


def soft_accuracy(matching: int) -> float:
    """Official VQA accuracy by hand: min(#matching humans / 3, 1), averaged over the 10 leave-one-out subsets."""
    held_out_match = matching * min((matching - 1) / 3, 1)  # the left-out human is one of the matching ones
    held_out_other = (10 - matching) * min(matching / 3, 1)
    return 100 * (held_out_match + held_out_other) / 10


# (prediction, human answers, answer type, expected accuracy in percent)
VQA_CASES = [
    ("2", ["2"] * 10, "number", 100.0),
    ("two", ["2"] * 10, "number", 100.0),                          # number word -> digit
    ("ten", ["10"] * 10, "number", 100.0),
    ("yes", ["yes"] * 3 + ["no"] * 7, "yes/no", 90.0),             # 3 humans: (3*2/3 + 7*1) / 10
    ("Yes", ["yes"] * 2 + ["no"] * 8, "yes/no", 60.0),             # case; 2 humans: (2*1/3 + 8*2/3) / 10
    ("yes", ["yes"] + ["no"] * 9, "yes/no", 30.0),                 # 1 human: (0 + 9*1/3) / 10
    ("a dog", ["dog"] * 10, "other", 100.0),                       # article
    ("dog.", ["dog"] * 10, "other", 100.0),                        # final period
    ("cat", ["dog"] * 10, "other", 0.0),
    ("dont know", ["don't know"] * 10, "other", 100.0),            # contraction
    ("red", ["red"] * 4 + ["dark red"] * 6, "other", 100.0),       # >= 3 matching in every subset: capped at 1
]


@pytest.fixture
def vqa_fixture(tmp_path):
    questions = [{"question_id": 100 + i, "image_id": i, "image": f"{i}.jpg", "question": f"question {i}?",
                  "answers": answers, "answer_type": answer_type, "question_type": "what"}
                 for i, (_, answers, answer_type, _) in enumerate(VQA_CASES)]
    _, _, ques_file, anno_file = write_vqa_files(tmp_path, "val", questions)
    predictions = {100 + i: case[0] for i, case in enumerate(VQA_CASES)}
    return predictions, ques_file, anno_file


def test_hand_formula_matches_the_cases():
    assert [soft_accuracy(n) for n in (3, 2, 1, 0, 10, 4)] == pytest.approx([90, 60, 30, 0, 100, 100])


def test_vqa_accuracy_per_question_type_and_overall(vqa_fixture, tmp_path):
    predictions, ques_file, anno_file = vqa_fixture
    result = score_vqa(predictions, ques_file, anno_file, tmp_path / "result.json")
    for i, (prediction, _, _, expected) in enumerate(VQA_CASES):
        assert result.accuracy[100 + i] == pytest.approx(expected), prediction
    by_type = {}
    for _, _, answer_type, expected in VQA_CASES:
        by_type.setdefault(answer_type, []).append(expected)
    assert result.metrics["agg_metrics"] == pytest.approx(sum(c[3] for c in VQA_CASES) / len(VQA_CASES), abs=0.01)
    for answer_type, values in by_type.items():
        assert result.metrics[answer_type] == pytest.approx(sum(values) / len(values), abs=0.01)
    assert result.metrics == pytest.approx({"agg_metrics": 80.0, "number": 100.0, "yes/no": 60.0, "other": 80.0})
    assert result.answers[103] == ["yes"] * 3 + ["no"] * 7  # the truth as annotated, not as normalised


def test_vqa_missing_prediction_names_the_files(vqa_fixture, tmp_path):
    predictions, ques_file, anno_file = vqa_fixture
    del predictions[100]
    with pytest.raises(ValueError, match=r"val_questions\.json .*val_annotations\.json: 1 missing \(e\.g\. \[100\]\)"):
        score_vqa(predictions, ques_file, anno_file, tmp_path / "result.json")


def test_normalize_answer_is_the_official_processing():
    assert normalize_answer(" The Two dogs!\n") == "2 dogs"
    assert normalize_answer("3.5") == "3.5"  # a decimal point is not a final period
    assert normalize_answer("isnt it") == "isn't it"


def test_gqa_exact_match_of_normalised_prediction():
    # (prediction, truth, correct): LAVIS normalises the prediction only (lavis/tasks/vqa.py:212-214)
    cases = [("yes", "yes", True), ("Yes.", "yes", True), ("the table", "table", True), ("left", "left", True),
             ("left side", "left", False), ("red", "blue", False)]
    annotation = [{"question_id": f"q{i}", "question": f"q {i}?", "answer": truth} for i, (_, truth, _) in enumerate(cases)]
    task = GQATaskExt.__new__(GQATaskExt)
    task.eval_dataset = SimpleNamespace(annotation=annotation, questions={a["question_id"]: a["question"]
                                                                          for a in annotation})
    rows = [{"question_id": f"q{i}", "answer": prediction} for i, (prediction, _, _) in enumerate(cases)]
    metrics, scored, report = task.score(rows, "val")
    assert metrics["agg_metrics"] == pytest.approx(100 * 4 / 6)
    assert [r["accuracy"] == 100 for r in scored] == [c[2] for c in cases]
    assert {r["answer_type"] for r in scored} == {"yes/no", "other"}
    assert any("'left side'" in line for line in report)  # the wrong answers are listed


def test_caption_bleu4_by_hand():
    references = {1: ["a red circle on the left"], 2: ["a red circle on the right"]}
    predictions = {1: "a red circle on the left", 2: "a red circle on the left"}
    metrics, _ = score_captions(predictions, references)
    # corpus n-gram precisions: image 1 matches 6/5/4/3 of its n-grams, image 2 matches 5/4/3/2 of 6/5/4/3
    expected = (11 / 12 * 9 / 10 * 7 / 8 * 5 / 6) ** 0.25  # brevity penalty 1: same lengths
    assert metrics["Bleu_4"] == pytest.approx(expected, rel=1e-6)
    assert metrics["Bleu_1"] == pytest.approx(11 / 12, rel=1e-6)
    assert 0 < metrics["METEOR"] < 1 and 0 < metrics["ROUGE_L"] < 1


def test_caption_cider_by_hand():
    # Image 1 is captioned exactly; image 2's caption shares no n-gram with anything. With two images
    # every reference n-gram has df 1 and idf log 2, so image 1's tf-idf vectors equal its reference's
    # (cosine 1 for each n = 1..4, no length penalty): 10 * mean(1, 1, 1, 1); image 2 scores 0.
    # A 3-word caption has no 4-grams, so the same exact match scores 10 * mean(1, 1, 1, 0).
    references = {1: ["a big red circle"], 2: ["two blue squares"], 3: ["one green cross"]}
    predictions = {1: "a big red circle", 2: "green triangle here", 3: "one green cross"}
    metrics, per_image = score_captions(predictions, references)
    assert per_image == pytest.approx({1: 10.0, 2: 0.0, 3: 7.5})
    assert metrics["CIDEr"] == pytest.approx((10.0 + 0.0 + 7.5) / 3)
    assert math.isclose(metrics["Bleu_1"], (4 + 0 + 3) / (4 + 3 + 3), rel_tol=1e-6)  # matches count per image


def test_gather_unique_drops_sampler_padding_and_checks_ids():
    rows = [{"question_id": 1, "answer": "a"}, {"question_id": 2, "answer": "b"}, {"question_id": 1, "answer": "a"}]
    assert gather_unique(rows, "question_id", [2, 1]) == [rows[1], rows[0]]
    with pytest.raises(RuntimeError, match="1 question_id.s. missing"):
        gather_unique(rows, "question_id", [1, 2, 3])
    with pytest.raises(RuntimeError, match="1 unknown"):
        gather_unique(rows, "question_id", [1])


def test_vqa_task_passes_generation_settings_from_the_run_config():
    from lavis_ext.tasks.vqa import VQATaskExt

    cfg = SimpleNamespace(run_cfg=OmegaConf.create({"num_beams": 3, "max_len": 7, "min_len": 2, "length_penalty": -1,
                                                    "inference_method": "generate", "prompt": "Q: {} A:"}))
    task = VQATaskExt.setup_task(cfg)

    class Recorder:
        def predict_answers(self, samples, **kwargs):
            self.kwargs = kwargs
            return ["yes"] * len(samples["text_input"])

    model = Recorder()
    rows = task.valid_step(model, {"text_input": ["is it?", "is it not?"], "question_id": ["a", "b"]})
    assert rows == [{"question_id": "a", "answer": "yes"}, {"question_id": "b", "answer": "yes"}]
    assert {k: model.kwargs[k] for k in ("num_beams", "max_len", "min_len", "length_penalty", "prompt")} == \
        {"num_beams": 3, "max_len": 7, "min_len": 2, "length_penalty": -1.0, "prompt": "Q: {} A:"}


@pytest.mark.parametrize("raw,stops,expected", [
    (" Two apples.<|im_end|>", ["<|im_end|>"], "Two apples"),  # the stop string, then the final period
    ("yes\nQuestion: is it red?", [], "yes"),  # a newline always ends the answer
    ("  blue \t", [], "blue"),
    ("St. Louis", [], "St. Louis"),  # only a final period goes
    ("3.5.", [], "3.5"),
    ("wait ...", [], "wait .."),  # one period, then the whitespace before it
    ("red</s>blue<|im_end|>", ["<|im_end|>", "", "</s>"], "red"),  # empty stop strings are ignored
    ("", ["</s>"], ""),
])
def test_clean_answer(raw, stops, expected):
    assert clean_answer(raw, stops) == expected


@pytest.mark.parametrize("answers,expected", [
    (["two", "2", "2", "two", "3"], "two"),  # a tie: the first given, as VQAv2's multiple_choice_answer
    (["no", "yes", "yes"], "yes"),
    (["red"], "red"),
])
def test_most_common_answer(answers, expected):
    assert most_common_answer(answers) == expected
