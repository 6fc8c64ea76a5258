"""Models registered by lavis-ext (importing registers them in LAVIS)."""
from lavis_ext.models import blip2_models  # noqa: F401
