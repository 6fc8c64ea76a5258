"""Answer post-processing shared by generation, VQA and evaluation."""
from __future__ import annotations

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
