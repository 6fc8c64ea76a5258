"""LAVIS imports spaCy at module level, but spaCy is not a dependency of lavis-ext.

Upstream: ``lavis/models/img2prompt_models/img2prompt_vqa.py:10`` does ``import spacy``;
``lavis/__init__.py`` imports every model, so ``import lavis`` fails with
``ModuleNotFoundError: No module named 'spacy'``.

Fix: when spaCy is not installed, register a stand-in module whose ``load`` raises an
error that says how to install spaCy and its English model. Code that lemmatises
answers (OK-VQA) reaches that error only if it is configured to use spaCy.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

INSTALL_HINT = (
    "spaCy is not installed. Lemmatisation (e.g. OK-VQA answers) needs it: "
    "`.venv/bin/pip install spacy` and then `.venv/bin/python -m spacy download en_core_web_sm` "
    "(or install the en_core_web_sm wheel from a local file on an offline machine)."
)


def _load(name: str, *args, **kwargs):
    raise ModuleNotFoundError(f"cannot load spaCy model {name!r}: {INSTALL_HINT}")


def apply() -> None:
    if "spacy" in sys.modules or importlib.util.find_spec("spacy") is not None:
        return
    stub = types.ModuleType("spacy")
    stub.__spec__ = importlib.machinery.ModuleSpec("spacy", None)  # find_spec("spacy") asks for it
    stub.__doc__ = "lavis-ext stand-in for the missing spaCy package. " + INSTALL_HINT
    stub.load = _load
    stub.LAVIS_EXT_STUB = True
    sys.modules["spacy"] = stub
