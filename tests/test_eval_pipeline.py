"""The four eval yamls through evaluate.py under torchrun (2 gloo processes), on files in the real sets'
layouts and a tiny model whose every answer is known in advance, so each score is checked exactly.

The model is "blind": its ``llm_proj`` is zero, so the LLM sees no image and its greedy answer depends
only on the prompt. The test computes each answer in-process first, then writes human answers that
match it 10, 3, 2, 1 or 0 times, and checks the official scores against hand-computed values.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import torchrun
from omegaconf import OmegaConf

from lavis.common.registry import registry
from lavis.common.vqa_tools.vqa_eval import VQAEval
from lavis.models import load_model
from lavis.processors.blip_processors import BlipQuestionProcessor
from lavis_ext.datasets import DataError
from lavis_ext.local_paths import LocalPathError
from lavis_ext.tiny.data import make_coco_karpathy, make_gqa_testdev, make_okvqa_data, make_vqav2_data

EVAL_DIR = Path("lavis_ext/projects/blip2/eval")
GENERATION = {"num_beams": 1, "max_len": 4, "min_len": 1}
TINY_MODEL = ["model.image_size=32", "model.vit_precision=fp32", "model.num_query_token=4", "model.llm_dtype=fp32",
              "run.batch_size_eval=2", "run.num_workers=0", *(f"run.{k}={v}" for k, v in GENERATION.items())]
NUM_IMAGES = 5  # 15 VQAv2 / 10 OK-VQA / 10 GQA questions, 5 images: batches of 2 on 2 ranks pad with duplicates
# Official soft accuracy of an answer that k of 10 humans gave: the mean over the 10 leave-one-out
# subsets of min(1, matches / 3). k=3: 3 subsets keep 2 matches (2/3), 7 keep 3 (1): 0.9.
# k=2: 2 x 1/3 + 8 x 2/3 over 10: 0.6. k=1: 9 x 1/3 over 10: 0.3.
MATCHES = (10, 3, 2, 1, 0)
SOFT_ACCURACY = {10: 100.0, 3: 90.0, 2: 60.0, 1: 30.0, 0: 0.0}
FILLERS = ("zebra", "giraffe", "umbrella", "skateboard", "broccoli", "kite", "surfboard", "toaster", "elephant", "banana")
_OFFICIAL = VQAEval()  # LAVIS's scorer: its normalisation needs no data


def official_normalisation(answer: str) -> str:
    """What LAVIS's VQAEval.evaluate compares: a prediction after punctuation and digit/article processing."""
    return _OFFICIAL.processDigitArticle(_OFFICIAL.processPunctuation(answer.strip()))


@pytest.fixture(scope="module")
def blind_model(tiny_parts, tiny_llm, tmp_path_factory):
    """The tiny model with ``llm_proj`` zeroed, and its stage-2 checkpoint for ``model.finetuned``."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LAVIS_EXT_BERT", str(tiny_parts["bert"]))
        env.setenv("LAVIS_EXT_VIT", str(tiny_parts["vit"]))
        env.setenv("LAVIS_EXT_TINY_LLM", str(tiny_llm))
        env.delenv("LAVIS_EXT_STAGE1_CKPT", raising=False)
        torch.manual_seed(0)
        model = load_model("blip2_internlm", "tiny", is_eval=True)
    with torch.no_grad():
        model.llm_proj.weight.zero_()
        model.llm_proj.bias.zero_()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    path = tmp_path_factory.mktemp("blind") / "stage2.pth"
    torch.save({"model": {k: v for k, v in model.state_dict().items() if k in trainable}}, path)
    return model, path


def known_answer(model, yaml: str, question: str) -> str:
    """The blind model's answer, asked as evaluate.py asks it (the yaml's prompt where it sets one, else the
    model's ``qa_prompt``; the processed question)."""
    run = OmegaConf.load(EVAL_DIR / yaml).run
    answer = model.predict_answers({"image": torch.zeros(1, 3, 32, 32), "text_input": [BlipQuestionProcessor()(question)]},
                                   prompt=run.get("prompt", ""), length_penalty=run.length_penalty, **GENERATION)[0]
    normalised = official_normalisation(answer)
    assert normalised and normalised not in FILLERS, f"pick other fillers: the blind answer is {answer!r}"
    return normalised


def dataset_options(builder: str, split: str, ann_paths: list[Path], images: Path) -> list[str]:
    storage = "[" + ",".join(str(p) for p in ann_paths) + "]"
    return [f"datasets.{builder}.build_info.annotations.{split}.storage={storage}",
            f"datasets.{builder}.build_info.images.storage={images}",
            f"datasets.{builder}.vis_processor.eval.image_size=32"]


def evaluate(yaml: str, options: list[str], env: dict, tiny_llm: Path, checkpoint: Path, output: Path):
    result = torchrun(["evaluate.py", "--cfg-path", str(EVAL_DIR / yaml), "--options", *TINY_MODEL, *options,
                       f"model.finetuned={checkpoint}", f"run.output_dir={output}"],
                      dict(env, LAVIS_EXT_INTERNLM2_1_8B=str(tiny_llm)))
    assert result.returncode == 0, result.stderr[-5000:]
    (job,) = output.iterdir()
    return job


def read(job: Path, name: str):
    return json.loads((job / name).read_text())


def rewrite_json(path: Path, edit) -> None:
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


def set_human_answers(ann_paths: list[Path], answers: dict) -> None:
    """Give each question its 10 human answers, in LAVIS's eval list and in the official annotations."""
    def eval_list(records):
        for record in records:
            record["answer"] = answers[record["question_id"]]

    def official(content):
        for ann in content["annotations"]:
            ann["answers"] = [{**a, "answer": new, **({"raw_answer": new} if "raw_answer" in a else {})}
                              for a, new in zip(ann["answers"], answers[ann["question_id"]])]
            if "multiple_choice_answer" in ann:
                ann["multiple_choice_answer"] = answers[ann["question_id"]][0]

    rewrite_json(ann_paths[0], eval_list)
    rewrite_json(ann_paths[3], official)


@pytest.mark.parametrize("yaml,builder,split,writer,answer_types,task_options", [
    ("vqav2_zeroshot_internlm2_eval.yaml", "coco_vqa_ext", "val", make_vqav2_data, {"yes/no", "number", "other"}, []),
    # OK-VQA: every answer is of type "other"; spaCy is not installed (the lemmatizer: test_blip2_internlm.py)
    ("okvqa_zeroshot_internlm2_eval.yaml", "ok_vqa_ext", "test", make_okvqa_data, {"other"},
     ["model.apply_lemmatizer=False"]),
])
def test_vqa_yaml_scores_every_question_once_and_exactly(yaml, builder, split, writer, answer_types, task_options,
                                                         blind_model, tiny_env, tiny_llm, tmp_path):
    model, checkpoint = blind_model
    ann_paths = writer(tmp_path / "data", num_images=NUM_IMAGES)
    questions = json.loads(ann_paths[0].read_text())
    official = {a["question_id"]: a for a in json.loads(ann_paths[3].read_text())["annotations"]}
    assert {a["answer_type"] for a in official.values()} == answer_types  # the writer's layout
    predicted, expected = {}, {}
    human = {}
    for n, q in enumerate(questions):
        qid, matches = q["question_id"], MATCHES[n % len(MATCHES)]
        predicted[qid] = known_answer(model, yaml, q["question"])
        human[qid] = [predicted[qid]] * matches + [FILLERS[i] for i in range(10 - matches)]
        expected[qid] = SOFT_ACCURACY[matches]
    set_human_answers(ann_paths, human)

    job = evaluate(yaml, [*dataset_options(builder, split, ann_paths, tmp_path / "data" / "images"), *task_options],
                   tiny_env, tiny_llm, checkpoint, tmp_path / "out")
    rows = read(job, f"{split}_predictions.json")
    assert sorted(r["question_id"] for r in rows) == sorted(predicted)  # none lost, none twice
    for row in rows:
        qid = row["question_id"]
        assert row["question"] == next(q["question"] for q in questions if q["question_id"] == qid)
        assert official_normalisation(row["prediction"]) == predicted[qid]
        assert row["answers"] == human[qid] and row["answer_type"] == official[qid]["answer_type"]
        assert row["accuracy"] == expected[qid], row
    metrics = read(job, f"{split}_metrics.json")
    by_type = {t: [expected[q] for q in expected if official[q]["answer_type"] == t] for t in answer_types}
    assert metrics == pytest.approx({"agg_metrics": sum(expected.values()) / len(expected),
                                     **{t: sum(v) / len(v) for t, v in by_type.items()}}, abs=0.005)
    report = (job / f"{split}_report.txt").read_text()
    zero = sum(1 for v in expected.values() if v == 0)
    assert f"{zero} answers scored 0" in report and f"{repr(predicted[questions[4]['question_id']])}" in report
    assert json.loads((job / "evaluate.txt").read_text().splitlines()[-1]) == {split: metrics}


def test_gqa_yaml_scores_exact_match(blind_model, tiny_env, tiny_llm, tmp_path):
    model, checkpoint = blind_model
    ann = make_gqa_testdev(tmp_path / "data", num_images=NUM_IMAGES)
    records = json.loads(ann.read_text())
    for n, record in enumerate(records):  # every other question's truth is the blind answer
        answer = known_answer(model, "gqa_zeroshot_internlm2_eval.yaml", record["question"])
        record["answer"] = answer if n % 2 == 0 else FILLERS[0]
    ann.write_text(json.dumps(records))
    job = evaluate("gqa_zeroshot_internlm2_eval.yaml", dataset_options("gqa_ext", "val", [ann], tmp_path / "data" / "images"),
                   tiny_env, tiny_llm, checkpoint, tmp_path / "out")
    rows = {r["question_id"]: r for r in read(job, "val_predictions.json")}
    assert sorted(rows) == sorted(r["question_id"] for r in records)  # GQA's string ids, each once
    assert [rows[r["question_id"]]["accuracy"] for r in records] == [100.0, 0.0] * NUM_IMAGES
    assert read(job, "val_metrics.json") == {"agg_metrics": 50.0, "acc": 50.0}


def test_karpathy_test_file_scores_ids_from_file_names_against_five_references(blind_model, tiny_env, tiny_llm,
                                                                                tmp_path):
    """The real coco_karpathy_test.json: no image_id (taken from the file name), 5 captions per image."""
    model, checkpoint = blind_model
    ann = make_coco_karpathy(tmp_path / "data", {"test": NUM_IMAGES})["test"]
    caption = model.generate({"image": torch.zeros(1, 3, 32, 32)}, num_beams=1, max_length=4, min_length=1)[0]
    words = set(caption.lower().split())
    fillers = [w for w in FILLERS if w not in words]
    records = json.loads(ann.read_text())
    assert all("image_id" not in r and len(r["caption"]) == 5 for r in records)  # the real layout
    for n, record in enumerate(records):  # only image 0 has the blind caption, and as its 5th reference
        record["caption"] = [f"a {fillers[(n + i) % len(fillers)]} and a {fillers[(n + i + 1) % len(fillers)]}"
                             for i in range(4)] + [caption if n == 0 else f"one {fillers[n]}"]
    ann.write_text(json.dumps(records))
    job = evaluate("caption_coco_internlm2_eval.yaml",
                   [*dataset_options("coco_caption_ext", "test", [ann], tmp_path / "data" / "images"),
                    "run.length_penalty=1.0"],  # a key the caption yaml does not carry
                   tiny_env, tiny_llm, checkpoint, tmp_path / "out")
    rows = read(job, "test_predictions.json")
    ids = [int(re.fullmatch(r"val2014/COCO_val2014_(\d{12})\.jpg", r["image"]).group(1)) for r in records]
    assert [r["image_id"] for r in rows] == ids  # ints from the file names, each image once
    assert [r["references"] for r in rows] == [r["caption"] for r in records]
    assert all(r["caption"] == caption for r in rows)
    cider = [r["CIDEr"] for r in rows]
    assert cider[0] > 0 and cider[1:] == [0.0] * (NUM_IMAGES - 1)  # the 5th reference counts
    metrics = read(job, "test_metrics.json")
    assert metrics["CIDEr"] == pytest.approx(sum(cider) / NUM_IMAGES)
    assert metrics["agg_metrics"] == pytest.approx(metrics["CIDEr"] + metrics["Bleu_4"])
    assert {"Bleu_1", "METEOR", "ROUGE_L"} <= set(metrics)
    assert "SPICE skipped" in (job / "test_report.txt").read_text()


def build(builder: str, split: str, ann_paths, images) -> dict:
    cfg = OmegaConf.create({"vis_processor": {"eval": {"name": "blip_image_eval", "image_size": 32}},
                            "text_processor": {"eval": {"name": "blip_question"}},
                            "build_info": {"annotations": {split: {"storage": [str(p) for p in ann_paths]}},
                                           "images": {"storage": str(images)}}})
    return registry.get_builder_class(builder)(cfg).build_datasets()


def test_missing_official_file_names_key_and_path(tmp_path):
    ann_paths = make_vqav2_data(tmp_path, num_images=2)
    ann_paths[3].unlink()
    with pytest.raises(LocalPathError,
                       match=r"coco_vqa_ext\.build_info\.annotations\.val\.storage\[3\].*v2_mscoco_val2014_annotations"):
        build("coco_vqa_ext", "val", ann_paths, tmp_path / "images")


def test_missing_image_names_path(tmp_path):
    ann_paths = make_vqav2_data(tmp_path, num_images=2)
    image = json.loads(ann_paths[0].read_text())[3]["image"]  # the second image's first question
    (tmp_path / "images" / image).unlink()
    dataset = build("coco_vqa_ext", "val", ann_paths, tmp_path / "images")["val"]
    with pytest.raises(DataError, match=rf"image file not found: .*{re.escape(image)}"):
        dataset[3]


def test_vqa_builders_refuse_a_train_split(tmp_path):
    ann = make_gqa_testdev(tmp_path, num_images=1)
    with pytest.raises(ValueError, match=r"gqa_ext\.build_info\.annotations\.train: gqa_ext has no train dataset"):
        build("gqa_ext", "train", [ann], tmp_path / "images")


def test_record_without_question_names_file_and_record(tmp_path):
    ann_paths = make_vqav2_data(tmp_path, num_images=1)
    rewrite_json(ann_paths[0], lambda records: records[1].pop("question"))
    with pytest.raises(DataError, match=r"vqa_val_eval\.json record 1: missing required key 'question'"):
        build("coco_vqa_ext", "val", ann_paths, tmp_path / "images")
