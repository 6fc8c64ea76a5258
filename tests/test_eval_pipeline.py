"""The four eval yamls through evaluate.py under torchrun (2 gloo processes), on a tiny model and tiny files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import torchrun
from omegaconf import OmegaConf

from lavis.common.registry import registry
from lavis_ext.datasets import DataError
from lavis_ext.offline import LocalPathError
from lavis_ext.tiny.data import make_caption_data, make_gqa_data, make_vqa_data

EVAL_DIR = "lavis_ext/projects/blip2/eval"
TINY_MODEL = ["model.image_size=32", "model.vit_precision=fp32", "model.num_query_token=4", "model.llm_dtype=fp32",
              "model.finetuned=", "run.batch_size_eval=2", "run.num_workers=0", "run.num_beams=1", "run.max_len=4"]
NUM_IMAGES = 5  # 15 VQA questions / 10 GQA questions / 5 images: batches of 2 on 2 ranks pad with duplicates


def dataset_options(builder: str, split: str, ann_paths: list[Path], images: Path) -> list[str]:
    storage = "[" + ",".join(str(p) for p in ann_paths) + "]"
    return [f"datasets.{builder}.build_info.annotations.{split}.storage={storage}",
            f"datasets.{builder}.build_info.images.storage={images}",
            f"datasets.{builder}.vis_processor.eval.image_size=32"]


def evaluate(yaml: str, options: list[str], env: dict, tiny_llm: Path, output: Path):
    result = torchrun(["evaluate.py", "--cfg-path", f"{EVAL_DIR}/{yaml}", "--options", *TINY_MODEL, *options,
                       f"run.output_dir={output}"], dict(env, LAVIS_EXT_INTERNLM2_1_8B=str(tiny_llm)))
    assert result.returncode == 0, result.stderr[-5000:]
    (job,) = output.iterdir()
    return job


def read(job: Path, name: str):
    return json.loads((job / name).read_text())


@pytest.mark.parametrize("yaml,builder,split,task_options", [
    ("vqav2_zeroshot_internlm2_eval.yaml", "coco_vqa_ext", "val", []),
    ("okvqa_zeroshot_internlm2_eval.yaml", "ok_vqa_ext", "test", ["model.apply_lemmatizer=False"]),
])
def test_vqa_yaml_predicts_every_question_once(yaml, builder, split, task_options, tiny_env, tiny_llm, tmp_path):
    ann_paths = make_vqa_data(tmp_path / "data", num_images=NUM_IMAGES, split=split)
    job = evaluate(yaml, [*dataset_options(builder, split, ann_paths, tmp_path / "data" / "images"), *task_options],
                   tiny_env, tiny_llm, tmp_path / "out")
    questions = json.loads(ann_paths[0].read_text())
    rows = read(job, f"{split}_predictions.json")
    assert sorted(r["question_id"] for r in rows) == sorted(q["question_id"] for q in questions)  # none lost, none twice
    truth = {q["question_id"]: q for q in questions}
    for row in rows:
        assert row["question"] == truth[row["question_id"]]["question"]
        assert row["answers"] == truth[row["question_id"]]["answer"]
        assert 0 <= row["accuracy"] <= 100
    metrics = read(job, f"{split}_metrics.json")
    assert set(metrics) == {"agg_metrics", "yes/no", "number", "other"}
    assert metrics["agg_metrics"] == pytest.approx(sum(r["accuracy"] for r in rows) / len(rows), abs=0.01)
    report = (job / f"{split}_report.txt").read_text()
    assert "answer type" in report and "scored 0" in report
    assert json.loads((job / "evaluate.txt").read_text().splitlines()[-1]) == {split: metrics}


def test_gqa_yaml(tiny_env, tiny_llm, tmp_path):
    ann = make_gqa_data(tmp_path / "data", num_images=NUM_IMAGES)
    job = evaluate("gqa_zeroshot_internlm2_eval.yaml", dataset_options("gqa_ext", "val", [ann], tmp_path / "data" / "images"),
                   tiny_env, tiny_llm, tmp_path / "out")
    rows = read(job, "val_predictions.json")
    assert sorted(r["question_id"] for r in rows) == sorted(q["question_id"] for q in json.loads(ann.read_text()))
    assert read(job, "val_metrics.json")["agg_metrics"] == pytest.approx(
        sum(r["accuracy"] for r in rows) / len(rows))


def test_caption_yaml(tiny_env, tiny_llm, tmp_path):
    ann = make_caption_data(tmp_path / "data", num_images=NUM_IMAGES, split="test")
    job = evaluate("caption_coco_internlm2_eval.yaml",
                   [*dataset_options("coco_caption_ext", "test", [ann], tmp_path / "data" / "images"),
                    "run.min_len=1", "run.length_penalty=1.0"],  # a key the caption yaml does not carry
                   tiny_env, tiny_llm, tmp_path / "out")
    rows = read(job, "test_predictions.json")
    assert sorted(r["image_id"] for r in rows) == [f"coco_{n}" for n in range(NUM_IMAGES)]
    assert all(len(r["references"]) == 2 for r in rows)  # both captions of each image are references
    metrics = read(job, "test_metrics.json")
    assert {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "agg_metrics"} <= set(metrics)
    assert "SPICE skipped" in (job / "test_report.txt").read_text()


def build(builder: str, split: str, ann_paths, images) -> dict:
    cfg = OmegaConf.create({"vis_processor": {"eval": {"name": "blip_image_eval", "image_size": 32}},
                            "text_processor": {"eval": {"name": "blip_question"}},
                            "build_info": {"annotations": {split: {"storage": [str(p) for p in ann_paths]}},
                                           "images": {"storage": str(images)}}})
    return registry.get_builder_class(builder)(cfg).build_datasets()


def test_missing_official_file_names_key_and_path(tmp_path):
    ann_paths = make_vqa_data(tmp_path, num_images=2)
    ann_paths[3].unlink()
    with pytest.raises(LocalPathError, match=r"coco_vqa_ext\.build_info\.annotations\.val\.storage\[3\].*val_annotations"):
        build("coco_vqa_ext", "val", ann_paths, tmp_path / "images")


def test_missing_image_names_path(tmp_path):
    ann_paths = make_vqa_data(tmp_path, num_images=2)
    (tmp_path / "images" / "val" / "1.jpg").unlink()
    dataset = build("coco_vqa_ext", "val", ann_paths, tmp_path / "images")["val"]
    with pytest.raises(DataError, match=r"image file not found: .*val/1\.jpg"):
        dataset[3]


def test_vqa_builders_refuse_a_train_split(tmp_path):
    ann = make_gqa_data(tmp_path, num_images=1, split="train")
    with pytest.raises(ValueError, match=r"gqa_ext\.build_info\.annotations\.train: gqa_ext has no train dataset"):
        build("gqa_ext", "train", [ann], tmp_path / "images")


def test_record_without_question_names_file_and_record(tmp_path):
    ann_paths = make_vqa_data(tmp_path, num_images=1)
    records = json.loads(ann_paths[0].read_text())
    del records[1]["question"]
    ann_paths[0].write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"vqa_val\.json record 1: missing required key 'question'"):
        build("coco_vqa_ext", "val", ann_paths, tmp_path / "images")


def test_lemmatizer_without_spacy_says_how_to_install(tiny_model_env):
    model_cls = registry.get_model_class("blip2_internlm")
    cfg = OmegaConf.load(model_cls.default_config_path("tiny")).model
    cfg.apply_lemmatizer = True
    with pytest.raises(ModuleNotFoundError, match="spacy download en_core_web_sm"):
        model_cls.from_config(cfg)
