"""``captioning_ext``: LAVIS's captioning task, offline, with the references taken from the eval split.

What differs from ``lavis/tasks/captioning.py``:

- ``coco_caption_eval`` (``:110-130``) downloaded ``coco_karpathy_<split>_gt.json`` into
  ``<cache_root>/coco_gt`` and accepted only ``val``/``test``. Here the references are the
  eval split's own captions (a Karpathy ``val``/``test`` file holds all of them per image),
  so any caption set scores offline.
- ``COCOEvalCap.evaluate`` always ran SPICE, which downloads Stanford CoreNLP models on first
  use. Here BLEU-1..4, METEOR, ROUGE-L and CIDEr (pycocoevalcap, the official COCO caption
  metrics; tokenised by its PTB tokenizer) are computed and SPICE is skipped with a notice.
  The PTB tokenizer and METEOR are Java programs: without ``java`` the error says so.
- ``valid_step`` passes ``run.length_penalty`` when it is set; results are gathered, checked
  and written as :mod:`lavis_ext.tasks.common` describes (per image: caption, references, CIDEr).
- ``run.segmenter`` (``jieba`` or ``char``) scores Chinese captions: both sides are segmented by
  :func:`lavis_ext.text_zh.tokenize_for_metrics` instead of the PTB tokenizer, METEOR is left
  out (English-only), and the metrics name the segmenter. Without it, English as above.
- A sample's own ``prompt`` (the Chinese caption sets supply one) is handed to the model, which
  wraps it in the chat format for chat models.
"""
from __future__ import annotations

import logging
import shutil

from lavis.common.registry import registry
from lavis.tasks.captioning import CaptionTask
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from lavis_ext.tasks.common import EvalTaskMixin, format_table, most_frequent
from lavis_ext.text_zh import tokenize_for_metrics
from lavis_ext.run_options import RunOptions

logger = logging.getLogger(__name__)

SPICE_NOTICE = ("SPICE skipped: it needs Stanford CoreNLP models that pycocoevalcap downloads on first use; "
                "BLEU, METEOR, ROUGE-L and CIDEr are computed offline")
ZH_NOTICE = ("METEOR and SPICE skipped: both are English-only (METEOR's stemmer and paraphrases, SPICE's parser); "
             "BLEU, ROUGE-L and CIDEr are computed on segmented text")
BLEU_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")


def score_captions(predictions: dict, references: dict[object, list[str]],
                   segmenter: str | None = None) -> tuple[dict, dict]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr of ``{image_id: caption}`` against ``{image_id: [captions]}``.

    ``segmenter`` None: English, tokenised by the PTB tokenizer. ``"jieba"`` or ``"char"``: Chinese,
    both sides segmented by :func:`~lavis_ext.text_zh.tokenize_for_metrics`, without METEOR.
    Returns the corpus metrics and per-image CIDEr.
    """
    if segmenter is None:
        if shutil.which("java") is None:
            raise RuntimeError("caption metrics need Java on PATH (the PTB tokenizer and METEOR are Java programs); "
                               "install a JRE, e.g. `apt-get install default-jre-headless`")
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in predictions})
        res = tokenizer.tokenize({i: [{"caption": c}] for i, c in predictions.items()})
        scorers = ((Bleu(4), BLEU_NAMES), (Meteor(), ("METEOR",)), (Rouge(), ("ROUGE_L",)), (Cider(), ("CIDEr",)))
    else:
        gts = {i: [tokenize_for_metrics(c, segmenter) for c in references[i]] for i in predictions}
        res = {i: [tokenize_for_metrics(c, segmenter)] for i, c in predictions.items()}
        scorers = ((Bleu(4), BLEU_NAMES), (Rouge(), ("ROUGE_L",)), (Cider(), ("CIDEr",)))
    metrics, cider = {}, {}
    for scorer, names in scorers:
        score, scores = scorer.compute_score(gts, res)
        metrics.update(zip(names, map(float, score if len(names) > 1 else [score])))
        if names == ("CIDEr",):
            cider = dict(zip(gts, map(float, scores)))  # Cider scores images in gts order
    logger.info(SPICE_NOTICE if segmenter is None else ZH_NOTICE)
    return metrics, cider


@registry.register_task("captioning_ext")
class CaptionTaskExt(EvalTaskMixin, CaptionTask):
    """Run keys as LAVIS's ``captioning`` task, plus an optional ``length_penalty``."""

    ID_KEY = "image_id"

    @classmethod
    def setup_task(cls, cfg):
        task = super().setup_task(cfg)
        task.segmenter = RunOptions.from_run_cfg(cfg.run_cfg).segmenter or None  # None: English captions
        return task

    def valid_step(self, model, samples):
        captions = model.generate(samples, use_nucleus_sampling=False, num_beams=self.num_beams,
                                  max_length=self.max_len, min_length=self.min_len, **self.extra_generate_kwargs)
        return [{"image_id": i, "caption": c} for i, c in zip(samples["image_id"], captions)]

    def score(self, rows: list[dict], split_name: str):
        references: dict[object, list[str]] = {}
        for ann in self.eval_dataset.annotation:
            captions = [ann["caption"]] if isinstance(ann["caption"], str) else ann["caption"]
            references.setdefault(ann["image_id"], []).extend(captions)
        predictions = {row["image_id"]: row["caption"] for row in rows}
        metrics, cider = score_captions(predictions, references, self.segmenter)
        metrics["agg_metrics"] = metrics["CIDEr"] + metrics["Bleu_4"]  # LAVIS's choice
        if self.segmenter is not None:
            metrics["segmenter"] = self.segmenter  # Chinese scores differ a lot between segmenters
        rows = [{"image_id": i, "caption": c, "references": references[i], "CIDEr": cider[i]}
                for i, c in predictions.items()]
        report = [f"captions {split_name}: {len(rows)} images", ""]
        report += format_table(("metric", "score"), [(k, f"{v:.4f}") for k, v in metrics.items() if k != "segmenter"])
        report += ["", SPICE_NOTICE if self.segmenter is None else f"segmenter: {self.segmenter}; {ZH_NOTICE}", "",
                   "the most frequent captions (many repeats mean the image is ignored):"]
        report += format_table(("caption", "images"), [(repr(c), n) for c, n in most_frequent(predictions.values())])
        return metrics, rows, report
