"""Convert a caption builder's data (annotation json + image root) into webdataset shards.

    python -m lavis_ext.tools.make_shards --ann coco_karpathy_train.json --images coco/images/ --out shards/
    python -m lavis_ext.tools.make_shards --builder vg_caption_ext --ann vg_caption.json --images vg/images/ --out vg_shards/

The records are read and checked by the builder's own dataset class (so VG's upstream paths
are resolved as training resolves them), one sample per record with its first caption, as
training uses it. Shards are in img2dataset's layout (:mod:`lavis_ext.datasets.webdataset`);
the json keeps the record's ``image`` and ``image_id``. JPEGs are copied byte for byte, other
images re-encoded as JPEG. Undecodable images are skipped and counted. The ``wds_caption``
builder reads the result (``build_info.shards.storage: <out>``).
"""
from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path

from lavis.common.registry import registry

from lavis_ext.datasets.base import DataError
from lavis_ext.datasets.caption import CaptionDatasetExt
from lavis_ext.datasets.webdataset import write_shards

logger = logging.getLogger(__name__)
JPEG_QUALITY = 95  # for images that are not JPEGs already


def caption_dataset(builder: str, ann_paths: list[str], images: str) -> CaptionDatasetExt:
    """The builder's train dataset class over the files, without processors."""
    builder_cls = registry.get_builder_class(builder)
    if builder_cls is None:
        raise ValueError(f"--builder {builder!r}: no such builder")
    dataset_cls = getattr(builder_cls, "train_dataset_cls", None)
    if not (isinstance(dataset_cls, type) and issubclass(dataset_cls, CaptionDatasetExt)):
        raise ValueError(f"--builder {builder!r}: not a caption builder (its train dataset is {dataset_cls})")
    return dataset_cls(None, None, images, ann_paths, name=f"{builder}/train")


def jpeg_samples(dataset: CaptionDatasetExt, skipped: list[str]):
    """``(jpeg bytes, caption, metadata)`` per record; records with a bad image go to ``skipped``."""
    for i, ann in enumerate(dataset.annotation):
        try:
            image = dataset.load_image(i)
        except DataError as err:
            skipped.append(str(err))
            logger.warning("skipping %s", err)
            continue
        data = Path(dataset.image_path(i)).read_bytes()
        if data[:3] != b"\xff\xd8\xff":  # not a JPEG (its magic bytes): re-encode; JPEGs stay byte for byte
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
            data = buffer.getvalue()
        caption = ann["caption"] if isinstance(ann["caption"], str) else ann["caption"][0]
        meta = {"image": ann["image"], "image_id": ann["image_id"], "width": image.width, "height": image.height,
                "original_width": image.width, "original_height": image.height}
        yield data, caption, meta


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builder", default="coco_caption_ext", help="a caption builder (default coco_caption_ext)")
    parser.add_argument("--ann", action="append", required=True, help="annotation json (repeatable)")
    parser.add_argument("--images", required=True, help="the image root (build_info.images.storage)")
    parser.add_argument("--out", type=Path, required=True, help="directory for the shards")
    parser.add_argument("--samples-per-shard", type=int, default=10_000, help="img2dataset's default: 10000")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    dataset = caption_dataset(args.builder, args.ann, args.images)
    skipped: list[str] = []
    shards = write_shards(args.out, jpeg_samples(dataset, skipped), args.samples_per_shard)
    written = len(dataset.annotation) - len(skipped)
    print(f"wrote {written} samples in {len(shards)} shard(s) to {args.out}; "
          f"{len(skipped)} record(s) with a bad image skipped")
    return shards


if __name__ == "__main__":
    main()
