"""The synthetic world: determinism, LAVIS/VQAv2 formats, the caption builder, and scoring."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lavis_ext.demo.world import (
    ANSWER_TYPES,
    SPLITS,
    attribute_scores,
    caption,
    majority_baseline,
    make_world,
    parse_caption,
    read_annotations,
    sample_scene,
    vqa_accuracy,
)

SIZES = {"train": 24, "val": 6, "test": 8}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory.mktemp("world"), seed=3, sizes=SIZES)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_world_other_seed_other_world(world, tmp_path):
    assert _files(make_world(tmp_path / "again", seed=3, sizes=SIZES)) == _files(world)
    other = _files(make_world(tmp_path / "other", seed=4, sizes=SIZES))
    assert other.keys() == _files(world).keys()
    assert other["train.json"] != _files(world)["train.json"]


def test_caption_files_are_coco_karpathy(world):
    train = json.loads((world / "train.json").read_text())
    assert len(train) == SIZES["train"]
    for record in train:
        assert set(record) == {"image", "caption", "image_id"} and isinstance(record["caption"], str)
        assert (world / "images" / record["image"]).is_file()
    for split in ("val", "test"):
        records = json.loads((world / f"{split}.json").read_text())
        assert len(records) == SIZES[split]
        assert all(isinstance(r["caption"], list) and r["caption"] for r in records)
    ids = [r["image_id"] for s in SPLITS for r in json.loads((world / f"{s}.json").read_text())]
    assert len(ids) == len(set(ids)), "image ids must be unique across splits"


def test_captions_count_every_object():
    import random

    rng = random.Random(0)
    for _ in range(200):
        objects = sample_scene(rng)
        parsed = parse_caption(caption(objects))
        assert sum(n for n, _, _ in parsed) == len(objects)
        assert {c for _, c, _ in parsed} == {o.colour for o in objects}
        assert {s for _, _, s in parsed} == {o.shape for o in objects}


def test_official_vqa_class_reads_question_and_annotation_files(world):
    from lavis.common.vqa_tools.vqa import VQA

    for split in SPLITS:
        answers = set(json.loads((world / f"answer_list_{split}.json").read_text()))
        vqa = VQA(str(world / f"{split}_annotations.json"), str(world / f"{split}_questions.json"))
        lavis_list = json.loads((world / f"vqa_{split}.json").read_text())
        question_ids = vqa.getQuesIds()
        assert sorted(question_ids) == sorted(r["question_id"] for r in lavis_list)
        assert {vqa.qa[q]["answer_type"] for q in question_ids} <= set(ANSWER_TYPES)
        assert vqa.questions["data_subtype"] == split and vqa.questions["task_type"] == "Open-Ended"
        for record in lavis_list:
            assert isinstance(record["question_id"], int) and isinstance(record["image_id"], int)
            assert len(record["answer"]) == 10 and set(record["answer"]) <= answers
            assert vqa.qqa[record["question_id"]]["question"] == record["question"]
            assert (world / "images" / record["image"]).is_file()
        assert all(a == a.lower() and a not in {"one", "two", "three", "four"} for a in answers)


def test_every_answer_type_is_asked(world):
    types = {a["answer_type"] for a in read_annotations(world, "train")}
    assert types == set(ANSWER_TYPES)


@pytest.mark.parametrize("captions", ["train.json", "train_zh.json"])
def test_caption_builder_builds_a_dataset_through_lavis(world, captions):
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    block = OmegaConf.create({
        "vis_processor": {"train": {"name": "blip2_image_train", "image_size": 64, "min_scale": 1.0}},
        "text_processor": {"train": {"name": "blip_caption"}},
        "build_info": {"annotations": {"train": {"storage": str(world / captions)}},
                       "images": {"storage": str(world / "images")}},
    })
    datasets = registry.get_builder_class("synthetic_caption")(block).build_datasets()
    sample = datasets["train"][0]
    assert tuple(sample["image"].shape) == (3, 64, 64)
    assert sample["text_input"] == json.loads((world / captions).read_text(encoding="utf-8"))[0]["caption"]


def test_chinese_captions_name_the_same_groups(world):
    from lavis_ext.demo.world import COLOURS_ZH, NUMBER_WORDS_ZH, SHAPES_ZH

    for split in SPLITS:
        english = json.loads((world / f"{split}.json").read_text())
        chinese = json.loads((world / f"{split}_zh.json").read_text(encoding="utf-8"))
        assert [r["image_id"] for r in chinese] == [r["image_id"] for r in english]
        for en, zh in zip(english, chinese):
            en_text = en["caption"] if split == "train" else en["caption"][0]
            zh_text = zh["caption"] if split == "train" else zh["caption"][0]
            expected = "和".join(f"{NUMBER_WORDS_ZH[n]}{COLOURS_ZH[c]}{SHAPES_ZH[s]}" for n, c, s in parse_caption(en_text))
            assert zh_text == expected


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="test_annotations.json"):
        read_annotations(tmp_path, "test")


def test_parse_caption():
    assert parse_caption("two red circles and a blue square") == [(2, "red", "circle"), (1, "blue", "square")]
    assert parse_caption("an orange cross, three crosses.") == [(1, "orange", "cross"), (3, None, "cross")]
    assert parse_caption("nothing here") == []


def test_attribute_scores_by_hand():
    truth = "two red circles and a blue square"
    # colours {red} vs {red, blue}: F1 2/3; shapes {circle} vs {circle, square}: 2/3; count 1 vs 3: wrong
    partial = attribute_scores(["a red circle"], [truth])
    assert partial == pytest.approx({"colour_f1": 2 / 3, "shape_f1": 2 / 3, "count_acc": 0.0, "attribute": 4 / 9})
    assert attribute_scores([truth], [truth])["attribute"] == 1.0
    assert attribute_scores([""], [truth]) == {"colour_f1": 0.0, "shape_f1": 0.0, "count_acc": 0.0, "attribute": 0.0}
    mean = attribute_scores(["a red circle", truth], [truth, truth])
    assert mean["attribute"] == pytest.approx((4 / 9 + 1) / 2)
    with pytest.raises(ValueError, match="2 predicted for 1"):
        attribute_scores(["a", "b"], [truth])


def test_majority_baseline_by_hand():
    def ann(answer_type, answer):
        return {"answer_type": answer_type, "multiple_choice_answer": answer}

    train = [ann("yes/no", "no"), ann("yes/no", "no"), ann("yes/no", "yes"), ann("number", "2"), ann("other", "red")]
    evaluated = [ann("yes/no", "no"), ann("yes/no", "yes"), ann("number", "2"), ann("number", "1"), ann("other", "blue")]
    assert majority_baseline(train, evaluated) == pytest.approx(
        {"yes/no": 0.5, "number": 0.5, "other": 0.0, "overall": 2 / 5})
    assert vqa_accuracy(["No ", "yes", "3", "1", "blue"], evaluated)["overall"] == pytest.approx(4 / 5)


def test_chance_baseline_by_hand():
    from lavis_ext.demo.world import chance_baseline

    def ann(answer_type, answer):
        return {"answer_type": answer_type, "multiple_choice_answer": answer}

    train = [ann("yes/no", "no"), ann("yes/no", "yes"), ann("number", "1"), ann("number", "2"), ann("number", "3"),
             ann("other", "red")]
    evaluated = [ann("yes/no", "no"), ann("number", "2"), ann("number", "4"), ann("other", "red")]
    # a uniform pick among {no, yes}: 1/2; among {1, 2, 3}: 1/3 when the truth is one of them, else 0; {red}: 1
    assert chance_baseline(train, evaluated) == pytest.approx(
        {"yes/no": 1 / 2, "number": (1 / 3 + 0) / 2, "other": 1.0, "overall": (1 / 2 + 1 / 3 + 0 + 1) / 4})
