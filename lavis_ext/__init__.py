"""lavis-ext: BLIP-2 with InternLM2 on top of salesforce-lavis 1.0.2.

``import lavis_ext`` applies the documented fixes in :mod:`patches` (before LAVIS is
imported) and registers lavis-ext's models, builders and runner in LAVIS's registry.
LAVIS's own models keep working as before.
"""
import patches as _patches

_patches.apply_all()

# LAVIS registers its lr schedulers only when lavis.common.optims is imported, which
# lavis/__init__.py does not do (runner_base.py:161 then calls None).
import lavis.common.optims  # noqa: E402,F401

from lavis_ext import runners  # noqa: E402,F401  (registers runner_ext)

__version__ = "0.1.0"
