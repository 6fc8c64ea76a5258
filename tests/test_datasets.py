"""coco_caption_ext / vg_caption_ext: built through LAVIS's registry from project-style config blocks."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import lavis_ext  # noqa: F401  (patches)
import lavis_ext.datasets  # noqa: F401  (registers the builders)
from lavis.common.registry import registry
from lavis.datasets.data_utils import concat_datasets
from lavis_ext.datasets import CaptionDatasetExt, DataError, VGCaptionDatasetExt
from lavis_ext.local_paths import LocalPathError
from lavis_ext.tiny.data import UPSTREAM_VG_ROOT as UPSTREAM_VG, make_caption_data, make_coco_karpathy, make_vg_caption_data

SIZE = 32
PROCESSORS = {
    "vis_processor": {"train": {"name": "blip2_image_train", "image_size": SIZE},
                      "eval": {"name": "blip_image_eval", "image_size": SIZE}},
    "text_processor": {"train": {"name": "blip_caption"}, "eval": {"name": "blip_caption"}},
}


def block(train_ann=None, images=None, **extra) -> dict:
    """A project yaml's ``datasets.<name>`` block."""
    cfg = dict(copy.deepcopy(PROCESSORS), **extra)
    build_info = {}
    if train_ann is not None:
        build_info["annotations"] = {"train": {"storage": str(train_ann)}}
    if images is not None:
        build_info["images"] = {"storage": str(images)}
    if build_info:
        cfg["build_info"] = build_info
    return cfg


def build(name: str, cfg: dict) -> dict:
    return registry.get_builder_class(name)(OmegaConf.create(cfg)).build_datasets()


def make_coco(root: Path, num_images: int = 8, int_ids: bool = False, captions_per_image: int = 1) -> Path:
    ann = make_caption_data(root, num_images=num_images, captions_per_image=captions_per_image, size=SIZE)
    if int_ids:
        records = json.loads(ann.read_text())
        for r in records:
            r["image_id"] = 100 + int(r["image_id"].removeprefix("coco_"))
        ann.write_text(json.dumps(records))
    return ann


def make_vg(root: Path, num_images: int = 6, split: str = "train") -> tuple[Path, Path]:
    """Upstream layout (lavis_ext.tiny.data.make_vg_caption_data): ids vg_1.., odd in VG_100K, even in VG_100K_2."""
    return make_vg_caption_data(root, num_images, size=SIZE, name=f"vg_caption_{split}.json"), root / "images"


def coco_root(ann: Path) -> Path:
    return ann.parent / "images"


# --------------------------------------------------------------------------- COCO


@pytest.mark.parametrize("int_ids", [False, True])
def test_coco_sample_keeps_the_annotation_image_id(tmp_path, int_ids):
    ann = make_coco(tmp_path, num_images=3, int_ids=int_ids, captions_per_image=2)
    records = json.loads(ann.read_text())
    train = build("coco_caption_ext", block(ann, coco_root(ann)))["train"]

    assert isinstance(train, CaptionDatasetExt) and len(train) == 6
    for i in (0, 3, 5):
        sample = train[i]
        assert set(sample) == {"image", "text_input", "image_id"}
        assert sample["image"].shape == (3, SIZE, SIZE) and sample["image"].dtype == torch.float32
        assert sample["text_input"] == records[i]["caption"]
        assert sample["image_id"] == records[i]["image_id"]  # as given, not an index
    assert train[2]["image_id"] == (101 if int_ids else "coco_1")


def test_karpathy_splits_in_the_real_layout(tmp_path):
    """Train records carry "coco_<id>"; val/test records have none: the id is the file name's number."""
    paths = make_coco_karpathy(tmp_path, size=SIZE)
    cfg = block(paths["train"], tmp_path / "images")
    cfg["build_info"]["annotations"].update({s: {"storage": str(paths[s])} for s in ("val", "test")})
    datasets = build("coco_caption_ext", cfg)
    train = datasets["train"]
    assert len(train) == 4 * 5 and train[0]["image_id"] == "coco_391895" and train[5]["image_id"] == "coco_391902"
    for split in ("val", "test"):
        records = json.loads(paths[split].read_text())
        for i, record in enumerate(records):
            sample = datasets[split][i]
            assert sample["image_id"] == int(record["image"][-16:-4])  # val2014/COCO_val2014_000000391923.jpg
            assert sample["text_input"] == record["caption"][0]
            assert datasets[split].annotation[i]["caption"] == record["caption"]  # all 5: the references


def test_relative_storage_is_joined_to_cache_root_with_default_yaml(tmp_path, monkeypatch):
    # The default yaml's paths (coco/annotations/coco_karpathy_train.json, coco/images/)
    # under a cache_root; the project block only adds processors.
    ann = make_coco(tmp_path / "coco", num_images=2)
    (tmp_path / "coco" / "annotations").mkdir()
    ann.rename(tmp_path / "coco" / "annotations" / "coco_karpathy_train.json")
    monkeypatch.setitem(registry.mapping["paths"], "cache_root", str(tmp_path))

    builder = registry.get_builder_class("coco_caption_ext")(OmegaConf.create(block()))
    assert builder.config.data_type == "images"
    train = builder.build_datasets()["train"]
    assert Path(train.vis_root) == tmp_path / "coco" / "images"
    assert train[1]["image_id"] == "coco_1"


def test_builders_point_at_packaged_default_yamls():
    for name in ("coco_caption_ext", "vg_caption_ext"):
        path = Path(registry.get_builder_class(name).default_config_path())
        assert path.is_absolute() and path.is_file()
        assert path.relative_to(Path(lavis_ext.__file__).parent).as_posix().startswith("configs/datasets/")
        cfg = OmegaConf.load(path).datasets[name]
        assert "url" not in OmegaConf.to_yaml(cfg)  # offline


def test_missing_annotation_file_names_key_and_path_and_never_downloads(tmp_path):
    missing = tmp_path / "vg_caption.json"
    cfg = block(images=tmp_path)
    cfg["build_info"]["annotations"] = {"train": {"url": "https://example.invalid/vg_caption.json",
                                                  "storage": str(missing)}}
    with pytest.raises(LocalPathError) as err:
        build("vg_caption_ext", cfg)
    assert "datasets.vg_caption_ext.build_info.annotations.train.storage" in str(err.value)
    assert str(missing) in str(err.value)
    assert not missing.exists()


def test_missing_image_dir_names_key_and_path(tmp_path):
    ann = make_coco(tmp_path, num_images=1)
    with pytest.raises(LocalPathError) as err:
        build("coco_caption_ext", block(ann, tmp_path / "nowhere"))
    assert "datasets.coco_caption_ext.build_info.images.storage" in str(err.value)
    assert str(tmp_path / "nowhere") in str(err.value)


@pytest.mark.parametrize("extra, match", [
    ({"max_bad_image_fractoin": 0.1}, r"datasets\.coco_caption_ext: unknown key\(s\) \['max_bad_image_fractoin'\]"),
    ({"max_missing_fraction": 0.1}, r"unknown key\(s\) \['max_missing_fraction'\]"),  # VG only
    ({"max_bad_image_fraction": 1.5}, r"datasets\.coco_caption_ext\.max_bad_image_fraction = 1\.5"),
])
def test_bad_config_values_raise(tmp_path, extra, match):
    ann = make_coco(tmp_path, num_images=1)
    with pytest.raises(ValueError, match=match):
        build("coco_caption_ext", block(ann, coco_root(ann), **extra))


# --------------------------------------------------------------------------- VG


def test_vg_upstream_paths_load_from_both_image_dirs(tmp_path):
    ann, images = make_vg(tmp_path, num_images=6)
    train = build("vg_caption_ext", block(ann, images))["train"]

    assert isinstance(train, VGCaptionDatasetExt) and len(train) == 6
    assert {a["image"].split("/")[0] for a in train.annotation} == {"VG_100K", "VG_100K_2"}
    for i in range(len(train)):
        sample = train[i]
        assert sample["image"].shape == (3, SIZE, SIZE)
        assert sample["image_id"] == f"vg_{i + 1}"
    assert train.bad_images == 0


def test_vg_missing_beyond_fraction_fails_with_counts(tmp_path):
    ann, images = make_vg(tmp_path, num_images=6)
    (images / "VG_100K" / "1.jpg").unlink()
    (images / "VG_100K_2" / "4.jpg").unlink()

    with pytest.raises(DataError) as err:
        build("vg_caption_ext", block(ann, images))  # default max_missing_fraction: 0.0
    message = str(err.value)
    assert "2 of 6 records" in message and "found 4" in message
    assert "max_missing_fraction = 0.0" in message and f"{UPSTREAM_VG}/1.jpg" in message

    with pytest.raises(DataError, match="2 of 6 records"):
        build("vg_caption_ext", block(ann, images, max_missing_fraction=0.3))

    train = build("vg_caption_ext", block(ann, images, max_missing_fraction=0.5))["train"]
    assert [train[i]["image_id"] for i in range(len(train))] == ["vg_2", "vg_3", "vg_5", "vg_6"]


def test_vg_none_found_fails(tmp_path):
    ann, images = make_vg(tmp_path, num_images=4)
    shutil.rmtree(images / "VG_100K")
    shutil.rmtree(images / "VG_100K_2")
    with pytest.raises(DataError, match=r"none of the 4 records .* has its image in .*VG_100K"):
        build("vg_caption_ext", block(ann, images, max_missing_fraction=1.0))


def test_vg_val_split_is_the_same_dataset_with_eval_processors(tmp_path):
    train_ann, images = make_vg(tmp_path, num_images=4)
    val_ann, _ = make_vg(tmp_path, num_images=2, split="val")
    cfg = block(train_ann, images)
    cfg["build_info"]["annotations"]["val"] = {"storage": str(val_ann)}
    datasets = build("vg_caption_ext", cfg)

    assert set(datasets) == {"train", "val"}
    val = datasets["val"]
    assert type(val) is VGCaptionDatasetExt and len(val) == 2
    assert type(val.vis_processor).__name__ == "BlipImageEvalProcessor"
    assert type(datasets["train"].vis_processor).__name__ == "Blip2ImageTrainProcessor"
    sample = val[1]
    assert set(sample) == {"image", "text_input", "image_id"} and sample["image_id"] == "vg_2"
    assert torch.equal(sample["image"], val[1]["image"])  # eval transform is deterministic


def test_eval_split_without_eval_processor_names_key(tmp_path):
    ann, images = make_vg(tmp_path, num_images=1)
    cfg = block(ann, images)
    cfg["build_info"]["annotations"]["val"] = {"storage": str(ann)}
    del cfg["vis_processor"]["eval"]
    with pytest.raises(ValueError, match=r"datasets\.vg_caption_ext\.vis_processor\.eval is not set, but split 'val'"):
        build("vg_caption_ext", cfg)


def test_unknown_split_raises(tmp_path):
    ann, images = make_vg(tmp_path, num_images=1)
    cfg = block(ann, images)
    cfg["build_info"]["annotations"]["validation"] = {"storage": str(ann)}
    with pytest.raises(ValueError, match=r"datasets\.vg_caption_ext\.build_info\.annotations\.validation: unknown split"):
        build("vg_caption_ext", cfg)


# --------------------------------------------------------------------------- mixed batches


def test_concat_collater_keeps_image_id_for_coco_and_vg(tmp_path):
    coco_ann = make_coco(tmp_path / "coco", num_images=3, int_ids=True)
    vg_ann, vg_images = make_vg(tmp_path / "vgroot", num_images=3)
    coco = build("coco_caption_ext", block(coco_ann, coco_root(coco_ann)))["train"]
    vg = build("vg_caption_ext", block(vg_ann, vg_images))["train"]

    mixed = concat_datasets({"train": [coco, vg]})["train"]
    expected = [100, 101, 102, "vg_1", "vg_2", "vg_3"]
    batch = mixed.collater([mixed[i] for i in range(len(mixed))])
    assert batch["image_id"] == expected
    assert batch["image"].shape == (6, 3, SIZE, SIZE) and len(batch["text_input"]) == 6

    loader = torch.utils.data.DataLoader(mixed, batch_size=6, collate_fn=mixed.collater)
    assert next(iter(loader))["image_id"] == expected


# --------------------------------------------------------------------------- bad data


@pytest.fixture
def coco(tmp_path):
    ann = make_coco(tmp_path, num_images=8)
    return ann, coco_root(ann)


def test_missing_image_names_path_and_record(coco):
    ann, images = coco
    (images / "train" / "2.jpg").unlink()
    train = build("coco_caption_ext", block(ann, images))["train"]
    with pytest.raises(DataError) as err:
        train[2]
    assert f"image file not found: {images / 'train' / '2.jpg'}" in str(err.value)
    assert f"{ann} record 2" in str(err.value)


def test_corrupt_image_names_path(coco):
    ann, images = coco
    (images / "train" / "4.jpg").write_bytes(b"not a jpeg")
    train = build("coco_caption_ext", block(ann, images))["train"]
    with pytest.raises(DataError, match=r"cannot decode image .*/train/4\.jpg.*record 4"):
        train[4]


def test_malformed_json_names_file_and_position(coco):
    ann, images = coco
    bad = '[{"image": "train/0.jpg", "caption": "a red circle"},\n {"image": "train/1.jpg",}]'
    ann.write_text(bad)
    with pytest.raises(DataError) as err:
        build("coco_caption_ext", block(ann, images))
    column = bad.splitlines()[1].index("}") + 1  # the trailing comma's error points at the brace
    assert f"{ann}: malformed JSON at line 2 column {column}" in str(err.value)


@pytest.mark.parametrize("key", ["image", "caption"])
def test_record_missing_key_names_file_record_and_key(coco, key):
    ann, images = coco
    records = json.loads(ann.read_text())
    del records[5][key]
    ann.write_text(json.dumps(records))
    with pytest.raises(DataError) as err:
        build("coco_caption_ext", block(ann, images))  # at load time, before any sample is read
    assert f"{ann} record 5: missing required key {key!r}" in str(err.value)


def test_bad_images_within_fraction_are_skipped_and_counted(coco):
    ann, images = coco
    for n in (1, 2, 5):
        (images / "train" / f"{n}.jpg").write_bytes(b"\x00broken")
    train = build("coco_caption_ext", block(ann, images, max_bad_image_fraction=0.25))["train"]  # 2 of 8

    assert train[0]["image_id"] == "coco_0" and train.bad_images == 0
    assert train[1]["image_id"] == "coco_3"  # 1 and 2 are bad: the next valid sample
    assert train.bad_images == 2
    assert train[2]["image_id"] == "coco_3" and train.bad_images == 2  # known bad: not counted twice
    with pytest.raises(DataError) as err:
        train[5]
    message = str(err.value)
    assert "cannot decode image" in message and "train/5.jpg" in message
    assert "3 bad image(s) among 8 samples" in message and "max_bad_image_fraction = 0.25" in message
