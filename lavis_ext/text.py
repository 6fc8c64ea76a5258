"""Answer post-processing shared by generation, VQA and evaluation."""
from __future__ import annotations

import functools
from collections.abc import Iterable


def clean_answer(text: str, stop_strings: Iterable[str] = ()) -> str:
    """Cut ``text`` at the first stop string or newline, trim whitespace and a trailing period.

    >>> clean_answer(" Two apples.<|im_end|>", ["<|im_end|>"])
    'Two apples'
    """
    for stop in (*stop_strings, "\n"):
        if stop:
            text = text.split(stop, 1)[0]
    text = text.strip()
    return text[:-1].rstrip() if text.endswith(".") else text


SPACY_MODEL = "en_core_web_sm"


@functools.cache
def english_pipeline():
    """spaCy's small English pipeline, loaded once; a missing spaCy or model says how to install it."""
    import spacy  # without spaCy, patches/spacy_stub.py makes spacy.load raise with install steps

    try:
        return spacy.load(SPACY_MODEL)
    except OSError as exc:
        raise OSError(f"apply_lemmatizer needs the spaCy model {SPACY_MODEL!r}: "
                      f"`.venv/bin/python -m spacy download {SPACY_MODEL}` (offline: pip install its wheel)") from exc


def lemmatize(answers: list[str]) -> list[str]:
    """Nouns and verbs to their lemma ("dogs running" -> "dog run"), as LAVIS does for OK-VQA answers."""
    return [" ".join(t.lemma_ if t.pos_ in ("NOUN", "VERB") else t.text for t in doc)
            for doc in english_pipeline().pipe(answers)]
