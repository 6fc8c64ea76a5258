"""Chinese caption text: undoing a data set's word segmentation, and segmenting for the metrics.

COCO's caption metrics count words, and Chinese is written without spaces: pycocoevalcap's PTB
tokenizer leaves an unsegmented sentence as one token and keeps ``。``/``，`` as tokens, so
BLEU and CIDEr of Chinese text come out near 0 whatever the caption. The official Chinese
evaluations segment both sides first (AI Challenger 2017: ``jieba.cut(..., cut_all=False)``;
mBLIP: single characters). :func:`tokenize_for_metrics` does that, the same way for predictions
and references:

1. NFKC (full-width letters and digits become ASCII), lower case;
2. punctuation of every script (``。，、！？：；“”《》（）…`` and ASCII) removed;
3. any segmentation the text already has (Flickr8k-CN/Flickr30k-CN and COCO-CN ship
   BosonNLP-segmented files) removed between CJK characters (:func:`join_cjk`);
4. segmented by :data:`SEGMENTERS`: ``"jieba"`` (precise mode, as AI Challenger's evaluation)
   or ``"char"`` (each CJK character a word, runs of Latin letters and digits one word, as mBLIP).

jieba's dictionary ships in its package; it is loaded once per process, without logging, on
first use (about 1 s).
"""
from __future__ import annotations

import functools
import logging
import re
import unicodedata

SEGMENTERS = ("jieba", "char")
CAPTION_PROMPT_ZH = "一张图片的描述："  # "a description of a picture:", the Chinese caption prompt
# CJK Unified Ideographs (+ extension A, compatibility ideographs): the characters Chinese words are made of
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_PUNCTUATION = "\u3001-\u303f\uff01-\uff0f\uff1a-\uff20"  # 、。「」… and full-width ，！？：；（）
_SPACE_BETWEEN_CJK = re.compile(rf"(?<=[{_CJK}{_CJK_PUNCTUATION}])\s+(?=[{_CJK}{_CJK_PUNCTUATION}])")
_CHAR_TOKEN = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")


def join_cjk(text: str) -> str:
    """Remove the spaces a word segmenter put between CJK characters (and CJK punctuation):
    ``"一个 男人 在 骑车 。"`` -> ``"一个男人在骑车。"``; a space next to a Latin word or a digit stays."""
    return _SPACE_BETWEEN_CJK.sub("", text.strip())


def strip_punctuation(text: str) -> str:
    """Every Unicode punctuation character (categories P*) becomes a space."""
    return "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)


@functools.cache
def _jieba():
    import jieba

    jieba.setLogLevel(logging.WARNING)  # jieba logs the dictionary build at DEBUG to stderr
    tokenizer = jieba.Tokenizer()
    tokenizer.initialize()
    return tokenizer


def segment(text: str, segmenter: str) -> list[str]:
    """The words of already normalised ``text`` (see :func:`tokenize_for_metrics`)."""
    if segmenter == "jieba":
        return [w for w in _jieba().cut(text, cut_all=False) if w.strip()]
    if segmenter == "char":
        return _CHAR_TOKEN.findall(text)
    raise ValueError(f"unknown Chinese segmenter {segmenter!r}; expected one of {list(SEGMENTERS)}")


def tokenize_for_metrics(text: str, segmenter: str) -> str:
    """``text`` as the caption metrics read it: normalised, segmented, words joined by single spaces.

    >>> tokenize_for_metrics("两个红色圆形，和一个蓝色方形。", "char")
    '两 个 红 色 圆 形 和 一 个 蓝 色 方 形'
    """
    normalised = join_cjk(" ".join(strip_punctuation(unicodedata.normalize("NFKC", text).lower()).split()))
    return " ".join(segment(normalised, segmenter))
