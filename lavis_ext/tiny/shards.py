"""Tiny webdataset shards in img2dataset's layout, generated on the fly for tests.

The layout is what ``img2dataset --output_format webdataset`` writes (rom1504/img2dataset:
``img2dataset/writer.py`` ``WebDatasetSampleWriter.write`` puts ``{"__key__": key, "jpg": ...,
"txt": caption, "json": json.dumps(meta, indent=4)}`` into ``<shard:05d>.tar`` through
webdataset's ``TarWriter``; ``img2dataset/downloader.py`` ``compute_key`` makes the 9-digit key
from the shard id and the sample's index; ``meta`` holds the input columns (``url``, ``caption``)
plus ``key``, ``status``, ``error_message``, ``width``, ``height``, ``original_width``,
``original_height``), with ``<shard>_stats.json`` beside each tar. The writing itself is
:func:`lavis_ext.datasets.webdataset.write_shards`, which ``lavis_ext.tools.make_shards`` uses too.
"""
from __future__ import annotations

import io
import random
from pathlib import Path

from lavis_ext.datasets.webdataset import write_shards
from lavis_ext.tiny.data import COLOURS, SHAPES, draw_shape

CORRUPT_JPEG = b"\xff\xd8\xff\xe0 not a jpeg"  # a JPEG's magic bytes, then garbage: PIL cannot decode it


def make_tiny_shards(root: str | Path, num_shards: int = 4, samples_per_shard: int = 4, size: int = 32,
                     seed: int = 0, corrupt: tuple[int, ...] = ()) -> list[Path]:
    """``num_shards`` shards of ``samples_per_shard`` one-shape images captioned "a red circle";
    the samples numbered in ``corrupt`` (counting over all shards from 0) get an undecodable
    ``.jpg``. Returns the shard paths (``<root>/00000.tar``, ...)."""
    rng = random.Random(seed)

    def samples():
        for n in range(num_shards * samples_per_shard):
            colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
            buffer = io.BytesIO()
            draw_shape(colour, shape, size).save(buffer, format="JPEG")
            meta = {"url": f"https://example.invalid/{n}.jpg", "width": size, "height": size,
                    "original_width": size, "original_height": size}
            yield (CORRUPT_JPEG if n in corrupt else buffer.getvalue()), f"a {colour} {shape}", meta

    return write_shards(root, samples(), samples_per_shard)
