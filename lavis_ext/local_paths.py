"""Local paths in configs: which environment variable fills each key, and one clear error
(:class:`LocalPathError`, naming the key, its variable and the path) when a path is unset or
missing. lavis-ext never downloads; every weight, tokenizer and dataset is a local path.
"""
from __future__ import annotations

from pathlib import Path

from lavis_ext.errors import LavisExtError

# config key -> the environment variable that lavis-ext's yamls fill it from
ENV_VARS = {
    "model.bert_path": "LAVIS_EXT_BERT",
    "model.vit_path": "LAVIS_EXT_VIT",
    "model.llm_path": "LAVIS_EXT_INTERNLM2_1_8B, LAVIS_EXT_INTERNLM2_CHAT_1_8B, LAVIS_EXT_INTERNLM2_7B "
                      "or LAVIS_EXT_TINY_LLM, by model_type",
    "model.pretrained": "LAVIS_EXT_STAGE1_CKPT",
    "model.finetuned": "LAVIS_EXT_STAGE2_CKPT",
}


class LocalPathError(LavisExtError, FileNotFoundError):
    """A configured local path is unset or missing; the message names the key, its environment
    variable and the path."""


def describe_key(key: str) -> str:
    """``key`` with the environment variable that sets it, e.g. ``model.bert_path (env LAVIS_EXT_BERT)``."""
    return f"{key} (env {ENV_VARS[key]})" if key in ENV_VARS else key


def require_dir(path: str, key: str, must_contain: tuple[str, ...] = ()) -> Path:
    """Return ``path`` as a directory, or raise one clear error naming ``key`` and ``path``."""
    key = describe_key(key)
    if not path:
        raise LocalPathError(f"{key} is not set; lavis-ext never downloads, so point it at a local directory")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise LocalPathError(f"{key} = {path!r}: no such directory")
    for name in must_contain:
        if not (p / name).is_file():
            raise LocalPathError(f"{key} = {path!r}: missing {name}")
    return p


def require_file(path: str, key: str) -> Path:
    """Return ``path`` as an existing file, or raise naming ``key`` (and its environment variable)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise LocalPathError(f"{describe_key(key)} = {path!r}: no such file")
    return p
