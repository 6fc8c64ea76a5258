"""Checkpoint and output helpers: atomic writes and strict loading of partial (trainable-only) weights."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch


def _atomic_write(path: Path, write: Callable) -> None:
    """Call ``write(file)`` on a temporary file, then rename it onto ``path``: a crash at any
    moment leaves the old file intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save(obj, path: Path) -> None:
    """``torch.save(obj, path)``, atomically."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path``, atomically."""
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def load_partial_state(model: torch.nn.Module, state_dict: dict, source: str,
                       allowed_missing: Iterable[str] = ()) -> None:
    """Load ``state_dict`` and assert that nothing is unexpected and every missing key is allowed.

    Allowed missing keys: frozen parameters (LAVIS's checkpoints leave them out), buffers, and
    keys starting with one of ``allowed_missing`` (e.g. ``"llm."`` when stage 1 feeds stage 2).
    """
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()}
    prefixes = tuple(allowed_missing)
    not_allowed = [k for k in missing if k not in frozen and k not in buffers and not k.startswith(prefixes)]
    if unexpected or not_allowed:
        raise RuntimeError(f"{source}: does not match the model; unexpected keys {unexpected[:8]}, "
                           f"missing keys {not_allowed[:8]} (allowed missing: frozen, {list(prefixes)})")
