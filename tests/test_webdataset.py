"""webdataset shards: split over ranks and loader workers, epoch length, shuffling, bad samples, resume,
the ``wds_caption`` builder and ``lavis_ext.tools.make_shards``."""
from __future__ import annotations

import json
import logging
import os
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from conftest import torchrun
from lavis.common.registry import registry
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

from lavis_ext.datasets.base import DataError
from lavis_ext.datasets.webdataset import WebDatasetCaptions
from lavis_ext.local_paths import LocalPathError
from lavis_ext.tiny.data import make_caption_data
from lavis_ext.tiny.shards import make_tiny_shards
from lavis_ext.tools import make_shards

NUM_SHARDS, PER_SHARD = 8, 4
ALL_KEYS = {f"{shard * 10_000 + i:09d}" for shard in range(NUM_SHARDS) for i in range(PER_SHARD)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return [str(p) for p in make_tiny_shards(tmp_path_factory.mktemp("shards"), NUM_SHARDS, PER_SHARD)]


def processors():
    vis = registry.get_processor_class("blip_image_eval").from_config(OmegaConf.create({"image_size": 16}))
    return vis, registry.get_processor_class("blip_caption").from_config()


def dataset(shards, rank=0, world_size=1, batch_size=2, **kwargs) -> WebDatasetCaptions:
    options = dict(samples_per_epoch=NUM_SHARDS * PER_SHARD, shuffle_buffer=4, seed=0)
    ds = WebDatasetCaptions(*processors(), shards, rank=rank, world_size=world_size, name="test", **{**options, **kwargs})
    ds.batch_size = batch_size
    ds.set_epoch(0)
    return ds


def keys_of(ds: WebDatasetCaptions, num_workers: int) -> list[str]:
    """This rank's keys in the order its loader delivers them; checks that ``len(loader)`` is exact."""
    loader = DataLoader(ds, batch_size=ds.batch_size, num_workers=num_workers, collate_fn=ds.collater, drop_last=True)
    batches = [batch["key"] for batch in loader]
    assert len(batches) == len(loader)
    assert all(len(b) == ds.batch_size for b in batches)
    return [key for batch in batches for key in batch]


def test_img2dataset_layout(shards):
    with tarfile.open(shards[1]) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("000010002.json").read())
    assert set(names[:3]) == {"000010000.jpg", "000010000.txt", "000010000.json"} and len(names) == 3 * PER_SHARD
    assert {"url", "caption", "key", "status", "error_message", "width", "height"} <= set(meta)
    assert meta["key"] == "000010002" and meta["status"] == "success"
    stats = json.loads(Path(shards[1]).with_name("00001_stats.json").read_text())
    assert stats["successes"] == PER_SHARD


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_sample_once_per_epoch_across_ranks_and_workers(shards, num_workers):
    for epoch in (0, 1):
        per_rank = []
        for rank in (0, 1):
            ds = dataset(shards, rank=rank, world_size=2)
            ds.set_epoch(epoch)
            per_rank.append(keys_of(ds, num_workers))
        counts = Counter(per_rank[0] + per_rank[1])
        assert set(counts) == ALL_KEYS and set(counts.values()) == {1}, f"epoch {epoch}: {counts}"
        assert len(per_rank[0]) == len(per_rank[1]) == len(ALL_KEYS) // 2
        if epoch == 0:
            first = per_rank
    assert first != per_rank  # another shard order and shuffle in epoch 1


def test_same_order_every_time_and_shuffled(shards):
    a, b = keys_of(dataset(shards), 0), keys_of(dataset(shards), 0)
    assert a == b and sorted(a) == sorted(ALL_KEYS) and a != sorted(a)


def test_configured_epoch_length(shards):
    keys = keys_of(dataset(shards, rank=1, world_size=2, samples_per_epoch=12), 2)
    assert len(keys) == 6 and len(set(keys)) == 6


def test_more_samples_per_epoch_than_shards_hold_reads_them_again(shards):
    keys = keys_of(dataset(shards, samples_per_epoch=40), 0)
    assert len(keys) == 40 and set(keys) == ALL_KEYS


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("start", [2, 6])
def test_resume_mid_epoch_continues_the_epoch(shards, num_workers, start):
    whole = keys_of(dataset(shards), num_workers)
    resumed = dataset(shards)
    resumed.set_epoch(0, start=start)
    assert len(resumed) == len(whole) - start
    assert keys_of(resumed, num_workers) == whole[start:]


def test_too_few_shards_for_the_workers_is_refused(shards):
    with pytest.raises(DataError, match=r"2 shard\(s\) cannot feed 2 rank\(s\) x 2 loader worker\(s\)"):
        keys_of(dataset(shards[:2], world_size=2, samples_per_epoch=8), 2)


def test_corrupt_sample_is_skipped_counted_and_named(tmp_path, caplog):
    shards = [str(p) for p in make_tiny_shards(tmp_path, 2, 4, corrupt=(5,))]
    ds = dataset(shards, samples_per_epoch=6, max_bad_sample_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="lavis_ext.datasets.webdataset"):
        keys = keys_of(ds, 0)
    assert len(keys) == 6 and "000010001" not in keys
    assert ds.bad_samples == 1
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "skipping bad sample 1 " in warning and "00001.tar: sample 000010001: cannot decode image" in warning


def test_too_many_bad_samples_raise(tmp_path):
    shards = [str(p) for p in make_tiny_shards(tmp_path, 2, 4, corrupt=(1, 5))]
    with pytest.raises(DataError, match=r"2 bad samples among 6 .* exceed max_bad_sample_fraction = 0.2"):
        keys_of(dataset(shards, samples_per_epoch=6, max_bad_sample_fraction=0.2), 0)


def builder(storage, **options):
    cfg = OmegaConf.create({"vis_processor": {"train": {"name": "blip_image_eval", "image_size": 16}},
                            "text_processor": {"train": {"name": "blip_caption"}},
                            "build_info": {"shards": {"storage": storage}}, **options})
    return registry.get_builder_class("wds_caption")(cfg)


def test_builder_reads_a_directory_or_a_brace_pattern(shards):
    root = Path(shards[0]).parent
    by_dir = builder(str(root)).build_datasets()["train"]
    assert by_dir.shards == shards and by_dir.samples_per_epoch == NUM_SHARDS * PER_SHARD  # from _stats.json
    by_pattern = builder(f"{root}/{{00000..00003}}.tar", samples_per_epoch=8).build_datasets()["train"]
    assert by_pattern.shards == shards[:4] and by_pattern.samples_per_epoch == 8


def test_builder_errors_name_the_key(shards, tmp_path):
    with pytest.raises(LocalPathError, match=r"datasets.wds_caption.build_info.shards.storage = '.*no such file"):
        builder(str(tmp_path / "{00000..00001}.tar")).build_datasets()
    with pytest.raises(LocalPathError, match=r"no .tar shards in this directory"):
        builder(str(tmp_path)).build_datasets()
    with pytest.raises(ValueError, match=r"wds_caption: unknown key\(s\) \['samples_per_epcoh'\]"):
        builder(str(tmp_path), samples_per_epcoh=8)


def test_make_shards_converts_a_caption_builders_data(tmp_path, capsys):
    ann = make_caption_data(tmp_path / "coco", num_images=5, captions_per_image=2)
    images = tmp_path / "coco" / "images"
    records = json.loads(ann.read_text())
    Image.open(images / records[2]["image"]).save(images / "train" / "png.png")  # a PNG, re-encoded as JPEG
    records[2]["image"] = "train/png.png"
    (images / records[4]["image"]).write_bytes(b"broken")  # skipped and counted
    broken = records[4]["image"]
    ann.write_text(json.dumps(records))

    shards = make_shards.main(["--ann", str(ann), "--images", str(images), "--out", str(tmp_path / "out"),
                               "--samples-per-shard", "3"])
    assert "wrote 8 samples in 3 shard(s)" in capsys.readouterr().out and len(shards) == 3
    kept = [r for r in records if r["image"] != broken]
    ds = dataset([str(s) for s in shards], samples_per_epoch=8, shuffle_buffer=1, batch_size=1)
    got = {}
    for raw in ds._raw_samples(0, 1):  # the samples as stored, before processing
        image, caption, image_id = ds.load(raw)
        got[raw["__key__"]] = (caption, image_id, image.size)
        if len(got) == 8:
            break
    assert sorted(got.values()) == sorted((r["caption"], r["image_id"], (32, 32)) for r in kept)


def test_make_shards_refuses_a_builder_without_captions(tmp_path):
    with pytest.raises(ValueError, match="'gqa_ext': not a caption builder"):
        make_shards.main(["--builder", "gqa_ext", "--ann", "x.json", "--images", str(tmp_path),
                          "--out", str(tmp_path / "out")])


STAGE1_WDS = "lavis_ext/projects/blip2/train/pretrain_stage1_wds.yaml"


def test_stage1_on_shards_under_two_ranks_sees_each_sample_once(tiny_parts, tmp_path):
    # 8 shards of 4: each of the 2 ranks x 2 workers reads 2 shards; 24 samples per epoch take
    # 6 of each slot's 8, so the corrupt first sample of shard 1 is always read, then skipped
    shard_dir = tmp_path / "shards"
    make_tiny_shards(shard_dir, NUM_SHARDS, PER_SHARD, corrupt=(PER_SHARD,))
    probe = tmp_path / "probe"
    probe.mkdir()
    env = dict(os.environ, LAVIS_EXT_BERT=str(tiny_parts["bert"]), LAVIS_EXT_VIT=str(tiny_parts["vit"]),
               OMP_NUM_THREADS="1", WDS_PROBE_DIR=str(probe))
    options = ["model.image_size=32", "model.vit_precision=fp32", "model.num_query_token=4",
               "datasets.wds_caption.vis_processor.train.image_size=32", "datasets.wds_caption.samples_per_epoch=24",
               "datasets.wds_caption.shuffle_buffer=1", "datasets.wds_caption.max_bad_sample_fraction=0.2",
               f"datasets.wds_caption.build_info.shards.storage={shard_dir}", "run.batch_size_train=2",
               "run.max_epoch=1", "run.warmup_steps=2", "run.num_workers=2", "run.amp=false",
               "run.save_every_iters=0", f"run.output_dir={tmp_path / 'out'}"]
    result = torchrun(["tests/wds_probe.py", "--cfg-path", STAGE1_WDS, "--options", *options], env)
    assert result.returncode == 0, result.stderr[-4000:]
    seen = {rank: [key for line in (probe / f"rank{rank}.jsonl").read_text().splitlines()
                   for key in json.loads(line)["keys"]] for rank in (0, 1)}
    assert len(seen[0]) == len(seen[1]) == 12
    counts = Counter(seen[0] + seen[1])
    assert len(counts) == 24 and set(counts.values()) == {1} and "000010000" not in counts
    assert "skipping bad sample 1 " in result.stderr and "00001.tar: sample 000010000" in result.stderr
