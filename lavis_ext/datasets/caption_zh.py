"""Chinese caption sets in the files their authors ship, and the per-dataset caption prompt.

Builders (offline, LAVIS's builder conventions as :mod:`lavis_ext.datasets.builders`; default
configs under ``configs/datasets/<name>/``, ``type: eval`` selects the evaluation split alone):

- ``coco_cn``: COCO-CN (li-xirong/coco-cn, archive ``coco-cn-version1805v1.1``): split lists
  ``coco-cn_{train,val,test}.txt`` (one COCO image name a line, ``COCO_val2014_000000391895``) and
  sentence files ``imageid.human-written-caption.txt`` (``<image>#<n>\\t<sentence>``; the test split
  also ``imageid.manually-translated-caption.txt``). Images are COCO's (``train2014/``, ``val2014/``).
- ``flickr8k_cn``: Flickr8k-CN (li-xirong/flickr8kcn ``data/``): ``flickr8kzhc.caption.txt``
  (``<image>.jpg#zhc#<n> <sentence>``; ``zhb``/``zhg`` machine-translated, ``flickr8kzhmtest.captions.txt``
  human-translated test) and ``flickr8k{train,val,test}.txt`` (image names without ``.jpg``).
- ``flickr30k_cn``: Flickr30k-CN (weiyuk/fluent-cap's data, VisualSearch layout): one folder a split,
  ``flickr30kzhbbosontrain``/``flickr30kzhbbosonval`` (Baidu machine translation) and
  ``flickr30kzhmbosontest`` (human translation), each with ``ImageSets/<folder>.txt`` and
  ``TextData/seg.<folder>.caption.txt`` (lines as Flickr8k-CN's, words separated by spaces).
- ``aic_icc``: AI Challenger 2017 image captioning: ``caption_<split>_annotations_<date>.json``, a
  JSON list of ``{"url", "image_id": "<sha1>.jpg", "caption": [5 sentences]}``, beside its image folder
  ``caption_<split>_images_<date>/`` inside the archive's folder ``ai_challenger_caption_<split>_<date>/``.

For the text formats, ``build_info.annotations.<split>.storage`` lists the sentence file(s), then the
split's image list, last; every listed image must have a sentence. Sentences are stored without
word segmentation (:func:`~lavis_ext.text_zh.join_cjk`: the segmented files would otherwise teach
the model to write spaces); the metrics segment again (``run.segmenter``). Train splits give one
record per sentence, eval splits one per image with all its sentences as references; ``image_id``
is the image's name (``COCO_val2014_000000391895``, ``1000268201_693b08cb0e``, the AIC sha1).

Every sample also carries the dataset's ``prompt`` (config key ``prompt``, default
``一张图片的描述：``), which ``blip2_internlm`` puts before the caption instead of ``model.prompt``:
that is what lets one run train on English and Chinese sets together (each with its own prompt;
LAVIS's concatenated dataset keeps only the keys all samples share, so every set of such a
run needs a ``prompt``, ``""`` for English). Bad data raises :class:`~lavis_ext.datasets.base.DataError`
naming the file and the line or record.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from lavis_ext.datasets.base import AnnSource, DataError, read_json
from lavis_ext.datasets.builders import OfflineBuilderExt, register_builder_ext
from lavis_ext.datasets.caption import CaptionDatasetExt
from lavis_ext.local_paths import require_file
from lavis_ext.text_zh import join_cjk


class PromptedCaptionDataset(CaptionDatasetExt):
    """:class:`CaptionDatasetExt` whose samples carry ``prompt`` when one is given (``None``: no key,
    the model's own ``prompt`` applies)."""

    LIST_KEYS = ("image_id", "prompt")

    def __init__(self, *args, prompt: str | None = None, **kwargs):
        self.prompt = prompt
        super().__init__(*args, **kwargs)

    def _sample(self, index: int, image: Image.Image) -> dict:
        sample = super()._sample(index, image)
        if self.prompt is not None:
            sample["prompt"] = self.prompt
        return sample


class PromptedBuilderExt(OfflineBuilderExt):
    """An offline caption builder with the dataset config key ``prompt`` (a string)."""

    train_dataset_cls = eval_dataset_cls = PromptedCaptionDataset
    DATASET_KEYS = ("max_bad_image_fraction", "prompt")

    def dataset_kwargs(self) -> dict:
        # OfflineBuilderExt checks its keys as fractions; the prompt is text.
        prompt = self.config.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"{self.key('prompt')} = {prompt!r}: expected a string")
        fraction = self.config.get("max_bad_image_fraction")
        if fraction is not None and not (isinstance(fraction, (int, float)) and 0.0 <= fraction <= 1.0):
            raise ValueError(f"{self.key('max_bad_image_fraction')} = {fraction!r}: expected a fraction between 0 and 1")
        kwargs = {} if prompt is None else {"prompt": prompt}
        return kwargs if fraction is None else {**kwargs, "max_bad_image_fraction": float(fraction)}


# --------------------------------------------------------------------------- reading the official files


@dataclass(frozen=True)
class LineSource(AnnSource):
    """A line of a text annotation file (``index`` counts from 1)."""

    def __str__(self) -> str:
        return f"{self.file} line {self.index}"


def clean_caption(text: str) -> str:
    """One line, single spaces, no word segmentation between Chinese characters."""
    return join_cjk(" ".join(text.split()))


def read_text_lines(path: str) -> Iterator[tuple[str, LineSource]]:
    """The non-empty lines of a UTF-8 text file, stripped, with where they are."""
    path = require_file(path, "annotation file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}): {exc.reason}") from exc
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield line.strip(), LineSource(str(path), number)


def read_sentence_file(path: str) -> Iterator[tuple[str, str, LineSource]]:
    """``(image name, sentence, source)`` per line ``<image>#<n> <sentence>`` (COCO-CN: a tab, Flickr-CN:
    ``<image>.jpg#zhc#<n>`` and a space)."""
    for line, source in read_text_lines(path):
        parts = line.split(None, 1)
        if len(parts) != 2 or "#" not in parts[0]:
            raise DataError(f"{source}: expected '<image>#<n> <sentence>' (sentence id, whitespace, sentence), "
                            f"got {line!r}")
        yield parts[0].split("#", 1)[0], parts[1], source


def image_key(name: str) -> str:
    """An image's name without its extension: ``"667626_18933d713e.jpg"`` -> ``"667626_18933d713e"``."""
    stem, ext = os.path.splitext(name)
    return stem if ext.lower() in (".jpg", ".jpeg", ".png") else name


def to_records(captions: dict[str, list[tuple[str, AnnSource]]], image_of, per_image: bool):
    """``{image_id: [(sentence, source)]}`` -> records and sources: one per sentence, or per image."""
    records, sources = [], []
    for image_id, entries in captions.items():
        texts = [clean_caption(text) for text, _ in entries]
        if per_image:
            records.append({"image": image_of(image_id), "caption": texts, "image_id": image_id})
            sources.append(entries[0][1])
        else:
            records += [{"image": image_of(image_id), "caption": t, "image_id": image_id} for t in texts]
            sources += [source for _, source in entries]
    return records, sources


class ListedCaptionDataset(PromptedCaptionDataset):
    """Sentences from text files (``ann_paths[:-1]``) for the images of a split list (``ann_paths[-1]``).

    Subclasses set :meth:`image_file` (image name -> path under ``vis_root``); ``PER_IMAGE`` makes one
    record per image holding all its sentences (eval splits).
    """

    PER_IMAGE = False

    @staticmethod
    def image_file(name: str) -> str:
        raise NotImplementedError

    @classmethod
    def load_annotations(cls, ann_paths) -> tuple[list[dict], list[AnnSource]]:
        if len(ann_paths) < 2:
            raise DataError(f"{[str(p) for p in ann_paths]}: expected the sentence file(s), then the split's "
                            "image list (storage: [sentences.txt, ..., images.txt])")
        *sentence_files, list_file = (str(p) for p in ann_paths)
        captions: dict[str, list[tuple[str, AnnSource]]] = {}
        for line, source in read_text_lines(list_file):
            captions.setdefault(image_key(line), [])
        if not captions:
            raise DataError(f"{list_file}: the split's image list is empty")
        for path in sentence_files:
            for name, sentence, source in read_sentence_file(path):
                entries = captions.get(image_key(name))
                if entries is not None:  # sentences of other splits share the file
                    entries.append((sentence, source))
        missing = [key for key, entries in captions.items() if not entries]
        if missing:
            raise DataError(f"{list_file}: {len(missing)} of {len(captions)} listed images have no sentence in "
                            f"{sentence_files}, e.g. {missing[:3]}")
        return to_records(captions, cls.image_file, cls.PER_IMAGE)


class COCOCNDataset(ListedCaptionDataset):
    """COCO-CN: ``COCO_train2014_000000000101`` is ``train2014/COCO_train2014_000000000101.jpg``."""

    @staticmethod
    def image_file(name: str) -> str:
        parts = name.split("_")
        if len(parts) != 3 or parts[0] != "COCO":
            raise DataError(f"COCO-CN image name {name!r}: expected COCO_<train2014|val2014>_<12 digits>")
        return f"{parts[1]}/{name}.jpg"


class COCOCNEvalDataset(COCOCNDataset):
    PER_IMAGE = True


class FlickrCNDataset(ListedCaptionDataset):
    """Flickr8k-CN and Flickr30k-CN: images are ``<name>.jpg`` in one folder."""

    @staticmethod
    def image_file(name: str) -> str:
        return f"{name}.jpg"


class FlickrCNEvalDataset(FlickrCNDataset):
    PER_IMAGE = True


def aic_image_folder(path: Path) -> str:
    """``.../ai_challenger_caption_train_20170902/caption_train_annotations_20170902.json`` ->
    ``ai_challenger_caption_train_20170902/caption_train_images_20170902`` (the archives' layout)."""
    if "_annotations_" not in path.stem:
        raise DataError(f"{path}: cannot tell its image folder; AI Challenger names it "
                        "caption_<split>_annotations_<date>.json beside caption_<split>_images_<date>/")
    return f"{path.parent.name}/{path.stem.replace('_annotations_', '_images_')}"


class AICICCDataset(PromptedCaptionDataset):
    """AI Challenger 2017 captions; ``vis_root`` holds the extracted archives' folders."""

    PER_IMAGE = False

    @classmethod
    def load_annotations(cls, ann_paths) -> tuple[list[dict], list[AnnSource]]:
        records, sources = [], []
        for ann_path in ann_paths:
            path = Path(ann_path)
            folder = aic_image_folder(path)
            content = read_json(path)
            if not isinstance(content, list):
                raise DataError(f"{path}: expected a JSON list of {{url, image_id, caption}}, got {type(content).__name__}")
            captions: dict[str, list[tuple[str, AnnSource]]] = {}
            for index, record in enumerate(content):
                source = AnnSource(str(path), index)
                if not isinstance(record, dict):
                    raise DataError(f"{source}: expected an object with keys image_id and caption, got {record!r}")
                for key in ("image_id", "caption"):
                    if key not in record:
                        raise DataError(f"{source}: missing required key {key!r} (has {sorted(record)})")
                sentences = record["caption"]
                if not (isinstance(sentences, list) and sentences and all(isinstance(s, str) for s in sentences)):
                    raise DataError(f"{source}: 'caption' must be a non-empty list of strings, got {sentences!r}")
                if not isinstance(record["image_id"], str):
                    raise DataError(f"{source}: 'image_id' must be a file name string, got {record['image_id']!r}")
                captions.setdefault(image_key(record["image_id"]), []).extend((s, source) for s in sentences)
            file_records, file_sources = to_records(captions, lambda key: f"{folder}/{key}.jpg", cls.PER_IMAGE)
            records += file_records
            sources += file_sources
        if not records:
            raise DataError(f"no annotation records in {[str(p) for p in ann_paths]}")
        return records, sources


class AICICCEvalDataset(AICICCDataset):
    PER_IMAGE = True


# --------------------------------------------------------------------------- builders


@register_builder_ext("coco_cn", "coco_cn/caption.yaml", eval="coco_cn/caption_eval.yaml")
class COCOCNBuilder(PromptedBuilderExt):
    """COCO-CN, 18,341 / 1,000 / 1,000 images; ``type: eval``: the test split alone."""

    train_dataset_cls, eval_dataset_cls = COCOCNDataset, COCOCNEvalDataset


@register_builder_ext("flickr8k_cn", "flickr8k_cn/caption.yaml", eval="flickr8k_cn/caption_eval.yaml")
class Flickr8kCNBuilder(PromptedBuilderExt):
    """Flickr8k-CN, 6,000 / 1,000 / 1,000 images; ``type: eval``: the test split alone."""

    train_dataset_cls, eval_dataset_cls = FlickrCNDataset, FlickrCNEvalDataset


@register_builder_ext("flickr30k_cn", "flickr30k_cn/caption.yaml", eval="flickr30k_cn/caption_eval.yaml")
class Flickr30kCNBuilder(Flickr8kCNBuilder):
    """Flickr30k-CN, 29,783 / 1,000 / 1,000 images (train/val machine-translated); ``type: eval``: test."""


@register_builder_ext("aic_icc", "aic_icc/caption.yaml", eval="aic_icc/caption_eval.yaml")
class AICICCBuilder(PromptedBuilderExt):
    """AI Challenger 2017 image captioning (AIC-ICC), 210,000 / 30,000 images; ``type: eval``: val."""

    train_dataset_cls, eval_dataset_cls = AICICCDataset, AICICCEvalDataset
