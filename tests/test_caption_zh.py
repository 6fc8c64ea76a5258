"""Chinese captioning: segmented metrics checked by hand, the four sets' builders on files in their
official layouts, the per-dataset prompt, and each Chinese eval yaml under torchrun."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
from conftest import torchrun
from omegaconf import OmegaConf

from lavis.common.registry import registry
from lavis.datasets.datasets.base_dataset import ConcatDataset
from lavis_ext.datasets import DataError
from lavis_ext.local_paths import LocalPathError
from lavis_ext.tasks import captioning
from lavis_ext.tasks.captioning import CaptionTaskExt, score_captions
from lavis_ext.text_zh import CAPTION_PROMPT_ZH, join_cjk, strip_punctuation, tokenize_for_metrics
from lavis_ext.tiny.data_zh import write_aic_icc, write_coco_cn, write_flickr8k_cn, write_flickr30k_cn

# --------------------------------------------------------------------------- metrics by hand

PREDICTIONS = {1: "一个男人在骑自行车", 2: "两只狗在草地上跑。", 3: "一群人在海边"}
REFERENCES = {1: ["一个男人在骑自行车。", "男人骑着一辆自行车"], 2: ["两只狗在草地上玩耍", "草地上有两只狗"],
              3: ["一群人在海边散步。"]}
# The same sentences segmented by hand: jieba's precise mode with its shipped dictionary, and characters.
JIEBA = {"一个男人在骑自行车": "一个 男人 在 骑 自行车", "一个男人在骑自行车。": "一个 男人 在 骑 自行车",
         "男人骑着一辆自行车": "男人 骑着 一辆 自行车", "两只狗在草地上跑。": "两只 狗 在 草地 上 跑",
         "两只狗在草地上玩耍": "两只 狗 在 草地 上 玩耍", "草地上有两只狗": "草地 上 有 两只 狗",
         "一群人在海边": "一群 人 在 海边", "一群人在海边散步。": "一群 人 在 海边 散步"}
CHARS = {text: " ".join(c for c in text if c != "。") for text in JIEBA}


def ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu4_by_hand(hyps: dict, refs: dict) -> float:
    """Corpus BLEU-4 as pycocoevalcap defines it: clipped n-gram precisions summed over the corpus, the
    closest reference length per caption (shorter on ties), brevity penalty; its smoothing constants."""
    tiny, small = 1e-15, 1e-9
    guess, correct, test_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for i, hyp in hyps.items():
        words, ref_words = hyp.split(), [r.split() for r in refs[i]]
        test_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
        for n in range(1, 5):
            counts = ngrams(words, n)
            best = Counter()
            for r in ref_words:
                best |= ngrams(r, n)  # max count of each n-gram over the references
            guess[n - 1] += max(len(words) - n + 1, 0)
            correct[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
    bleu = math.prod((correct[k] + tiny) / (guess[k] + small) for k in range(4)) ** 0.25
    ratio = (test_len + tiny) / (ref_len + small)
    return bleu * (math.exp(1 - 1 / ratio) if ratio < 1 else 1.0)


def cider_by_hand(hyps: dict, refs: dict, sigma: float = 6.0) -> float:
    """pycocoevalcap's CIDEr: per n (1..4) tf-idf vectors (idf = log #images - log df over the images'
    reference sets), clipped cosine with each reference, Gaussian penalty on the difference in bigram
    count (its "length"), mean over n and references, x10, mean over images."""
    df = Counter(g for i in refs for g in {g for r in refs[i] for n in range(1, 5) for g in ngrams(r.split(), n)})
    log_images = math.log(len(refs))

    def vectors(text):
        vec = [{g: c * (log_images - math.log(max(1.0, df[g]))) for g, c in ngrams(text.split(), n).items()}
               for n in range(1, 5)]
        return vec, [math.sqrt(sum(v * v for v in part.values())) for part in vec], sum(ngrams(text.split(), 2).values())

    total = 0.0
    for i, hyp in hyps.items():
        h, h_norm, h_len = vectors(hyp)
        image = 0.0
        for ref in refs[i]:
            r, r_norm, r_len = vectors(ref)
            penalty = math.exp(-((h_len - r_len) ** 2) / (2 * sigma ** 2))
            for n in range(4):
                dot = sum(min(v, r[n].get(g, 0.0)) * r[n].get(g, 0.0) for g, v in h[n].items())
                image += (dot / (h_norm[n] * r_norm[n]) if h_norm[n] and r_norm[n] else 0.0) * penalty / 4
        total += 10.0 * image / len(refs[i])
    return total / len(hyps)


@pytest.mark.parametrize("segmenter,by_hand", [("jieba", JIEBA), ("char", CHARS)])
def test_bleu4_and_cider_equal_hand_computed(segmenter, by_hand):
    for text, words in by_hand.items():
        assert tokenize_for_metrics(text, segmenter) == words
    hyps = {i: by_hand[t] for i, t in PREDICTIONS.items()}
    refs = {i: [by_hand[t] for t in ts] for i, ts in REFERENCES.items()}
    metrics, per_image = score_captions(PREDICTIONS, REFERENCES, segmenter)
    assert metrics["Bleu_4"] == pytest.approx(bleu4_by_hand(hyps, refs), abs=1e-6)
    assert metrics["CIDEr"] == pytest.approx(cider_by_hand(hyps, refs), abs=1e-6)
    assert metrics["CIDEr"] == pytest.approx(sum(per_image.values()) / 3, abs=1e-9)
    assert set(metrics) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}  # no METEOR
    assert metrics["CIDEr"] > 1.0 and metrics["Bleu_4"] > 0.3


def test_unsegmented_text_scores_differently(monkeypatch):
    """Without the segmentation step (punctuation stripped only, as PTB tokenizing leaves Chinese) each
    sentence is one word: only identical sentences match, and the scores say little about the captions."""
    segmented, _ = score_captions(PREDICTIONS, REFERENCES, "jieba")
    monkeypatch.setattr(captioning, "tokenize_for_metrics", lambda text, segmenter: " ".join(strip_punctuation(text).split()))
    unsegmented, _ = score_captions(PREDICTIONS, REFERENCES, "jieba")
    assert unsegmented["CIDEr"] < 0.5 * segmented["CIDEr"]
    assert unsegmented["Bleu_4"] < 0.01 < segmented["Bleu_4"]


def test_text_is_normalised_the_same_way_on_both_sides():
    assert join_cjk("一个 男人 在 骑 自行车 。") == "一个男人在骑自行车。"  # BosonNLP-style files
    assert tokenize_for_metrics("一个 男人 在 骑 自行车 。", "jieba") == tokenize_for_metrics("一个男人在骑自行车", "jieba")
    assert tokenize_for_metrics("穿着Ｔ恤的男人，骑225号车！", "char") == "穿 着 t 恤 的 男 人 骑 225 号 车"
    with pytest.raises(ValueError, match="unknown Chinese segmenter 'thulac'"):
        tokenize_for_metrics("一个男人", "thulac")


def test_unknown_segmenter_is_refused():
    cfg = OmegaConf.create({"run_cfg": {"segmenter": "spacy", "num_beams": 1, "max_len": 5, "min_len": 1,
                                        "evaluate": True}})
    with pytest.raises(ValueError, match=r"run.segmenter = 'spacy'"):
        CaptionTaskExt.setup_task(cfg=cfg)


# --------------------------------------------------------------------------- builders on the official layouts

PROCESSORS = {"vis_processor": {m: {"name": "blip_image_eval", "image_size": 32} for m in ("train", "eval")},
              "text_processor": {m: {"name": "blip_caption"} for m in ("train", "eval")}}


def build(builder: str, tiny, **extra) -> dict:
    cfg = OmegaConf.create({**PROCESSORS, **extra, "build_info": {
        "annotations": {s: {"storage": [str(p) for p in ps]} for s, ps in tiny.annotations.items()},
        "images": {"storage": str(tiny.images)}}})
    return registry.get_builder_class(builder)(cfg).build_datasets()


def check_splits(datasets: dict, sizes: dict[str, int], sentences_per_image: dict[str, int]):
    for split, images in sizes.items():
        dataset = datasets[split]
        per_image = sentences_per_image[split]
        assert len(dataset) == (images if split != "train" else images * per_image), split
        sample = dataset[0]
        assert sample["image"].shape == (3, 32, 32)
        assert sample["prompt"] == CAPTION_PROMPT_ZH
        assert " " not in sample["text_input"]  # stored as written, without word segmentation
        if split != "train":
            assert len(dataset.annotation[0]["caption"]) == per_image  # every sentence is a reference
        batch = dataset.collater([dataset[0], dataset[1]])
        assert batch["prompt"] == [CAPTION_PROMPT_ZH] * 2 and len(batch["image_id"]) == 2


def test_coco_cn_reads_its_sentence_files_and_split_lists(tmp_path):
    sizes = {"train": 3, "val": 2, "test": 2}
    tiny = write_coco_cn(tmp_path, sizes)
    datasets = build("coco_cn", tiny)
    check_splits(datasets, sizes, {"train": 1, "val": 1, "test": 2})  # test: human-written + human-translated
    ann = datasets["test"].annotation[0]
    assert ann["image"] == f"{ann['image_id'].split('_')[1]}/{ann['image_id']}.jpg"  # COCO's train2014/val2014


def test_flickr8k_cn_reads_zhc_lines(tmp_path):
    sizes = {"train": 3, "val": 2, "test": 2}
    datasets = build("flickr8k_cn", write_flickr8k_cn(tmp_path, sizes))
    check_splits(datasets, sizes, {s: 2 for s in sizes})
    assert datasets["test"].annotation[0]["image"] == datasets["test"].annotation[0]["image_id"] + ".jpg"


def test_flickr30k_cn_reads_segmented_visualsearch_folders(tmp_path):
    sizes = {"train": 3, "val": 2, "test": 2}
    tiny = write_flickr30k_cn(tmp_path, sizes)
    assert " " in tiny.annotations["test"][0].read_text(encoding="utf-8").splitlines()[0].split(" ", 1)[1]
    check_splits(build("flickr30k_cn", tiny), sizes, {s: 2 for s in sizes})


def test_aic_icc_reads_its_json_beside_the_image_folder(tmp_path):
    sizes = {"train": 2, "val": 3}
    datasets = build("aic_icc", write_aic_icc(tmp_path, sizes))
    check_splits(datasets, sizes, {s: 5 for s in sizes})
    assert datasets["val"].annotation[0]["image"].startswith(
        "ai_challenger_caption_validation_20170910/caption_validation_images_20170910/")


def test_missing_file_names_the_config_key(tmp_path):
    tiny = write_coco_cn(tmp_path, {"test": 1})
    tiny.annotations["test"][1].unlink()  # the manually translated sentences
    with pytest.raises(LocalPathError, match=r"coco_cn\.build_info\.annotations\.test\.storage\[1\].*manually-translated"):
        build("coco_cn", tiny, type="eval")  # the test split alone


def test_malformed_line_names_file_and_line(tmp_path):
    tiny = write_flickr8k_cn(tmp_path, {"train": 2, "val": 1, "test": 1})  # 8 lines
    captions = tiny.annotations["train"][0]
    captions.write_text(captions.read_text(encoding="utf-8") + "1000_0000000001.jpg#zhc#2\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"flickr8kzhc\.caption\.txt line 9: expected '<image>#<n> <sentence>'"):
        build("flickr8k_cn", tiny)


def test_listed_image_without_sentence_names_the_list(tmp_path):
    tiny = write_flickr30k_cn(tmp_path, {"train": 1, "val": 2, "test": 1})
    image_list = tiny.annotations["val"][1]
    image_list.write_text(image_list.read_text() + "999999\n")
    with pytest.raises(DataError, match=r"flickr30kzhbbosonval\.txt: 1 of 3 listed images have no sentence.*'999999'"):
        build("flickr30k_cn", tiny)


def test_aic_record_without_caption_names_file_and_record(tmp_path):
    tiny = write_aic_icc(tmp_path, {"train": 1, "val": 2})
    ann = tiny.annotations["val"][0]
    records = json.loads(ann.read_text(encoding="utf-8"))
    del records[1]["caption"]
    ann.write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(DataError, match=r"caption_validation_annotations_20170910\.json record 1: missing required key 'caption'"):
        build("aic_icc", tiny)


def test_prompt_must_be_text(tmp_path):
    with pytest.raises(ValueError, match=r"datasets\.aic_icc\.prompt = 3: expected a string"):
        build("aic_icc", write_aic_icc(tmp_path, {"train": 1, "val": 1}), prompt=3)


def test_english_and_chinese_sets_train_together_with_their_own_prompts(tmp_path):
    """LAVIS concatenates the train sets and keeps only the keys every sample has: both carry ``prompt``."""
    from lavis_ext.demo.world import make_world

    world = make_world(tmp_path, sizes={"train": 2, "val": 1, "test": 1})
    sets = []
    for builder, ann, prompt in (("synthetic_caption", "train.json", ""), ("synthetic_caption_zh", "train_zh.json", None)):
        cfg = OmegaConf.create({**PROCESSORS, "build_info": {"annotations": {"train": {"storage": str(world / ann)}},
                                                            "images": {"storage": str(world / "images")}}})
        if prompt is not None:
            cfg.prompt = prompt
        sets.append(registry.get_builder_class(builder)(cfg).build_datasets()["train"])
    mixed = ConcatDataset(sets)
    batch = mixed.collater([mixed[0], mixed[len(sets[0])]])
    assert batch["prompt"] == ["", CAPTION_PROMPT_ZH]
    assert batch["text_input"][1] == json.loads((world / "train_zh.json").read_text(encoding="utf-8"))[0]["caption"]


# --------------------------------------------------------------------------- the eval yamls under torchrun

EVAL_DIR = Path("lavis_ext/projects/blip2/eval")
TINY_MODEL = ["model.image_size=32", "model.vit_precision=fp32", "model.num_query_token=4", "model.llm_dtype=fp32",
              "model.finetuned=", "run.batch_size_eval=2", "run.num_workers=0", "run.num_beams=1", "run.max_len=4",
              "run.min_len=1"]


@pytest.mark.parametrize("yaml,builder,split,writer,segmenter", [
    ("caption_coco_cn_internlm2_eval.yaml", "coco_cn", "test", write_coco_cn, "jieba"),
    ("caption_flickr8k_cn_internlm2_eval.yaml", "flickr8k_cn", "test", write_flickr8k_cn, "jieba"),
    ("caption_flickr30k_cn_internlm2_eval.yaml", "flickr30k_cn", "test", write_flickr30k_cn, "char"),
    ("caption_aic_icc_internlm2_eval.yaml", "aic_icc", "val", write_aic_icc, "jieba"),
])
def test_chinese_eval_yaml_under_torchrun(yaml, builder, split, writer, segmenter, tiny_env, tiny_llm, tmp_path):
    tiny = writer(tmp_path / "data", {split: 3})  # 3 images, batches of 2 on 2 ranks: padding is dropped
    options = [*TINY_MODEL, *tiny.options(builder, split), f"datasets.{builder}.vis_processor.eval.image_size=32",
               f"run.segmenter={segmenter}", f"run.output_dir={tmp_path / 'out'}"]
    result = torchrun(["evaluate.py", "--cfg-path", str(EVAL_DIR / yaml), "--options", *options],
                      dict(tiny_env, LAVIS_EXT_INTERNLM2_1_8B=str(tiny_llm)))
    assert result.returncode == 0, result.stderr[-5000:]
    (job,) = (tmp_path / "out").iterdir()
    metrics = json.loads((job / f"{split}_metrics.json").read_text())
    assert metrics["segmenter"] == segmenter
    assert {"Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr", "agg_metrics"} <= set(metrics) and "METEOR" not in metrics
    rows = json.loads((job / f"{split}_predictions.json").read_text(encoding="utf-8"))
    assert len(rows) == 3 and len({r["image_id"] for r in rows}) == 3  # each image once
    assert all(r["references"] and " " not in r["references"][0] for r in rows)
    report = (job / f"{split}_report.txt").read_text(encoding="utf-8")
    assert f"segmenter: {segmenter}" in report and "the most frequent captions" in report
