"""The errors lavis-ext raises for bad input. Each message names the file or config key at fault.

``train.py`` and ``evaluate.py`` (:func:`lavis_ext.cli.main`) print these as one line,
``error: <message>``, and exit with code 2; ``--debug`` or ``LAVIS_EXT_DEBUG=1`` adds the
traceback. Other exceptions are bugs and keep their traceback.

Each class also derives from the built-in error it refines, so ``except ValueError`` (etc.)
still catches it.
"""
from __future__ import annotations


class LavisExtError(Exception):
    """Bad input: a config value, a data file, a checkpoint or a local path."""


class ConfigError(LavisExtError, ValueError):
    """A config value that cannot work; the message names the key."""


class CheckpointError(LavisExtError, RuntimeError):
    """A checkpoint or weight file that cannot be loaded, or is refused; the message names the file."""
