"""The demo's image encoder, briefly pretrained and then frozen, as BLIP-2's EVA-ViT is.

A tiny EVA-ViT whose patches are the synthetic world's grid cells learns to tag each patch with
the colour and the shape of the object in it (or "empty"): two linear heads on the patch tokens,
cross-entropy, horizontal flips as augmentation. Only the ViT is kept: ``DST`` gets
``config.json`` (:func:`~lavis_ext.tiny.blip2.make_tiny_vit`) and ``model.pth``, the directory
layout ``model.vit_path`` / ``LAVIS_EXT_VIT`` reads.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from lavis.processors.blip_processors import BlipImageEvalProcessor
from PIL import Image
from tqdm import tqdm

from lavis_ext import blip2_parts
from lavis_ext.demo.world import CELL, COLOURS, GRID, IMAGE_SIZE, SHAPES, read_world_file
from lavis_ext.tiny.blip2 import make_tiny_vit

VIT_SIZES = {"patch_size": CELL, "embed_dim": 128, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0}
EMPTY = 0  # label of a cell without an object; colours and shapes count from 1


def load_split(world_root: str | Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images ``[N, 3, S, S]`` (the eval processor's normalisation) and per-cell colour and shape
    labels ``[N, GRID, GRID]``, from ``<split>.json`` and ``objects_<split>.json``."""
    root = Path(world_root)
    objects = read_world_file(root, f"objects_{split}.json")
    image_of = {r["image_id"]: r["image"] for r in read_world_file(root, f"{split}.json")}
    processor = BlipImageEvalProcessor(image_size=IMAGE_SIZE)
    images = []
    colours = torch.full((len(image_of), GRID, GRID), EMPTY, dtype=torch.long)
    shapes = colours.clone()
    for n, (image_id, image) in enumerate(sorted(image_of.items())):
        images.append(processor(Image.open(root / "images" / image).convert("RGB")))
        for o in objects[str(image_id)]:
            colours[n, o["row"], o["col"]] = list(COLOURS).index(o["colour"]) + 1
            shapes[n, o["row"], o["col"]] = SHAPES.index(o["shape"]) + 1
    return torch.stack(images), colours, shapes


class CellTagger(nn.Module):
    """ViT patch tokens -> colour and shape logits per cell."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.colour_head = nn.Linear(vit.num_features, len(COLOURS) + 1)
        self.shape_head = nn.Linear(vit.num_features, len(SHAPES) + 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        patches = self.vit(images)[:, 1:]  # drop the class token; patches are the cells, row-major
        return self.colour_head(patches), self.shape_head(patches)


def pretrain_tiny_vit(world_root: str | Path, dst: str | Path, *, steps: int = 300, batch_size: int = 64,
                      lr: float = 1e-3, seed: int = 0) -> dict[str, float]:
    """Train the cell tagger on the train split; write ``dst/config.json`` and ``dst/model.pth``.

    Returns the first and last loss (means over 10 steps) and the tagging accuracy on the val split.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    dst = make_tiny_vit(dst, **VIT_SIZES)
    model = CellTagger(blip2_parts.build_vision_encoder("eva_clip_g", str(dst), IMAGE_SIZE)).train()
    images, colours, shapes = load_split(world_root, "train")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    losses = []
    for _ in tqdm(range(steps), desc="image encoder: tagging cells"):
        index = torch.tensor(rng.sample(range(len(images)), batch_size))
        batch, colour, shape = images[index], colours[index], shapes[index]
        if rng.random() < 0.5:  # the train processor flips images; flip the cells with them
            batch, colour, shape = batch.flip(-1), colour.flip(-1), shape.flip(-1)
        colour_logits, shape_logits = model(batch)
        loss = F.cross_entropy(colour_logits.flatten(0, 1), colour.flatten()) + F.cross_entropy(
            shape_logits.flatten(0, 1), shape.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    torch.save(model.vit.state_dict(), dst / "model.pth")
    val_images, val_colours, val_shapes = load_split(world_root, "val")
    with torch.no_grad():
        colour_logits, shape_logits = model.eval()(val_images)
    correct = (colour_logits.argmax(-1) == val_colours.flatten(1)) & (shape_logits.argmax(-1) == val_shapes.flatten(1))
    window = min(10, steps)
    return {"first_loss": sum(losses[:window]) / window, "last_loss": sum(losses[-window:]) / window,
            "val_cell_accuracy": correct.float().mean().item()}
