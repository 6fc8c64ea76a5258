"""lavis-ext's dataset builders; importing this package registers them in LAVIS's registry."""
from lavis_ext.datasets import builders, caption_zh, conversation, webdataset  # noqa: F401  (registers the builders)
from lavis_ext.datasets.builders import COCOCaptionBuilderExt, VGCaptionBuilderExt
from lavis_ext.datasets.base import DataError
from lavis_ext.datasets.caption import CaptionDatasetExt, VGCaptionDatasetExt

__all__ = ["COCOCaptionBuilderExt", "VGCaptionBuilderExt", "CaptionDatasetExt", "VGCaptionDatasetExt", "DataError"]
