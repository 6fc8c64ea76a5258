"""lavis-ext: BLIP-2 with InternLM2 on top of salesforce-lavis 1.0.2.

``import lavis_ext`` applies the documented fixes in ``patches/`` (before LAVIS is
imported) and registers lavis-ext's models, builders, tasks and runner in LAVIS's registry.
LAVIS's own models keep working as before.
"""
import warnings

# timm 1.x warns on every LAVIS import of its old module paths; the paths still work.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm\.")

import lavis_ext_patches as _patches  # noqa: E402  (the patches/ directory)

_patches.apply_all()

# LAVIS registers its lr schedulers only when lavis.common.optims is imported, which
# lavis/__init__.py does not do (runner_base.py:161 then calls None).
import lavis.common.optims  # noqa: E402,F401

from lavis_ext import datasets, models, runners, tasks  # noqa: E402,F401  (registration)
from lavis_ext.demo import world  # noqa: E402,F401  (the demo's builders)

__version__ = "0.1.0"
