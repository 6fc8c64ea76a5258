"""Checkpoint helpers: atomic writes, safe reads, and strict loading of partial (trainable-only) weights.

Every checkpoint lavis-ext reads goes through :func:`load_checkpoint_file`: ``torch.load`` with
``weights_only=True``, so unpickling can build tensors, numbers, strings and containers, plus
the types in :data:`SAFE_GLOBALS`, and can call nothing else. A file that needs anything
more (a crafted pickle that would run code) is refused, naming the file and the global.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from numpy._core.multiarray import _reconstruct
from safetensors import SafetensorError

from lavis_ext.errors import CheckpointError, LavisExtError
from lavis_ext.local_paths import require_file

# Beyond torch's weights-only defaults, runner_ext checkpoints hold numpy's RNG state (a uint32
# array, see runner_ext.rng_state); these rebuild such an array and call nothing else.
# numpy 1.x pickles spell the module numpy.core.
SAFE_GLOBALS = [_reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
                type(np.dtype(np.uint32))]


TMP_GLOB = ".*.tmp*"  # the temporary files of the writes below, left behind by a crash


def temporary_path(path: Path, tag: str = "") -> Path:
    """Where a write of ``path`` is prepared before it is renamed onto ``path`` (matches :data:`TMP_GLOB`)."""
    return path.with_name(f".{path.name}.tmp{tag}")


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete what interrupted writes left in ``directory``; returns the removed paths."""
    stale = sorted(Path(directory).glob(TMP_GLOB))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _atomic_write(path: Path, write: Callable) -> None:
    """Call ``write(file)`` on a temporary file, then rename it onto ``path``: a crash at any
    moment leaves the old file intact."""
    path = Path(path)
    tmp = temporary_path(path, str(os.getpid()))
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


def load_checkpoint_file(path, key: str, map_location="cpu"):
    """``torch.load(path)`` restricted to weights (see the module doc); ``key`` is the config key or
    flag that named ``path``. A missing, unreadable or refused file raises naming ``key`` and ``path``."""
    path = require_file(str(path), key)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{key} = {path}: refused: loading it would need {_unsafe_globals(path, exc)}, "
                              f"which a checkpoint of weights never needs (unpickling it could run code)") from exc
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        detail = str(exc).split(". ")[0]  # torch's first sentence; the rest is generic advice
        raise CheckpointError(f"{key} = {path}: cannot read it as a torch checkpoint (truncated or "
                              f"not a checkpoint?): {detail}") from exc


def model_weights(checkpoint, key: str, path) -> dict:
    """The state dict of a loaded checkpoint: its ``"model"`` entry (LAVIS's layout), or the
    checkpoint itself when it is a bare state dict."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        return checkpoint["model"]
    if isinstance(checkpoint, dict) and checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
        return checkpoint
    found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
    raise CheckpointError(f"{key} = {path}: not a model checkpoint: no 'model' state dict (found {found})")


@contextmanager
def reading_weights(key: str, path):
    """Re-raise what torch, safetensors or a JSON parser raise while weights load from ``path``
    (e.g. a truncated ``.safetensors``) as one :class:`CheckpointError` naming ``key`` and ``path``."""
    try:
        yield
    except LavisExtError:
        raise
    except (SafetensorError, RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{key} = {path}: cannot load its weights: {exc}") from exc


def _unsafe_globals(path: Path, exc: Exception) -> str:
    """The globals the file's pickle refers to that are not allowed, e.g. ``posix.system``."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint: torch's own message names the first global
        return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    allowed = {f"{g.__module__}.{g.__name__}" if not isinstance(g, tuple) else g[1] for g in SAFE_GLOBALS}
    return ", ".join(n for n in names if n not in allowed) or "a global that is not allowed"


def load_state_dict_named(model: torch.nn.Module, state_dict: dict, source: str) -> tuple[list[str], list[str]]:
    """``model.load_state_dict(state_dict, strict=False)``; a shape mismatch (torch names the keys,
    not the file) raises naming ``source``. Returns the missing and unexpected keys."""
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: does not match the model: {exc}") from exc
    return list(missing), list(unexpected)


def load_partial_state(model: torch.nn.Module, state_dict: dict, source: str,
                       allowed_missing: Iterable[str] = ()) -> None:
    """Load ``state_dict`` and assert that nothing is unexpected and every missing key is allowed.

    Allowed missing keys: frozen parameters (LAVIS's checkpoints leave them out), buffers, and
    keys starting with one of ``allowed_missing`` (e.g. ``"llm."`` when stage 1 feeds stage 2).
    """
    missing, unexpected = load_state_dict_named(model, state_dict, source)
    check_loaded_keys(model, missing, unexpected, source, allowed_missing)


def check_loaded_keys(model: torch.nn.Module, missing: Iterable[str], unexpected: list[str], source: str,
                      allowed_missing: Iterable[str] = ()) -> None:
    """Raise naming ``source`` unless nothing is unexpected and every missing key is allowed (see
    :func:`load_partial_state`)."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()}
    prefixes = tuple(allowed_missing)
    not_allowed = [k for k in missing if k not in frozen and k not in buffers and not k.startswith(prefixes)]
    if unexpected or not_allowed:
        raise CheckpointError(f"{source}: does not match the model; unexpected keys {unexpected[:8]}, "
                              f"missing keys {not_allowed[:8]} (allowed missing: frozen, {list(prefixes)})")
