"""lavis-ext's evaluation tasks; importing this package registers ``vqa_ext``, ``gqa_ext`` and ``captioning_ext``."""
from lavis_ext.tasks import captioning, vqa  # noqa: F401  (registration)
