"""Stage-2 train step, lavis-ext vs HF BLIP-2: forward, backward and AdamW, ViT and LLM frozen.

    .venv/bin/python bench/train_step.py --size small                  # CPU default, < 3 min
    .venv/bin/python bench/train_step.py --size 1.8b --device cuda     # MFU against --peak-tflops

Goal: lavis-ext's step time <= 0.9x HF's (ratio of medians, same run). ``--lora-rank N`` puts
LoRA on lavis-ext's LLM (``model.lora_rank``; HF stays without); ``--fsdp`` shards lavis-ext's model
with FSDP2 over one rank, as ``run.data_parallel: fsdp`` does (``lavis_ext.runners.fsdp``), to
show what the sharding machinery costs on one device. Every step's loss is checked:
the count of non-finite ones is printed (on CUDA lavis-ext runs its ViT in fp16, its LLM in bf16).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from common import (
    SIZES,
    build_systems,
    captions,
    describe_run,
    hf_text_inputs,
    images,
    median_seconds,
    param_count,
    parser,
    precision,
    train_step_flops,
    warm_up,
)

from lavis_ext.constants import IGNORE_INDEX
from lavis_ext.runners.fsdp import shard_model


def train_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], device: torch.device,
               losses: list[torch.Tensor] | None = None) -> Callable[[], None]:
    """One optimizer step on ``loss_fn()``: AdamW over the trainable parameters (fused on CUDA).
    Each step's detached loss is appended to ``losses`` when given (no device sync)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  weight_decay=0.05, fused=device.type == "cuda")

    def step() -> None:
        with precision(device):
            loss = loss_fn()
        if losses is not None:
            losses.append(loss.detach())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def nonfinite(losses: list[torch.Tensor]) -> int:
    return sum(not bool(torch.isfinite(loss).all()) for loss in losses)


def main(argv: list[str] | None = None) -> dict:
    """Print the comparison; return ``{"seconds": {system: ...}, "ratio": ..., "mfu": ..., ...}``."""
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the device's dense bf16 peak, for MFU (H100 SXM: 989)")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA on lavis-ext's LLM (0: none)")
    p.add_argument("--fsdp", action="store_true", help="shard lavis-ext's model with FSDP2 over one rank")
    args = p.parse_args(argv)
    d = SIZES[args.size]
    args.batch = args.batch or d.batch
    device = torch.device(args.device)
    lavis, hf = build_systems(args)
    lavis.train()  # the frozen ViT and LLM stay in eval mode (set_trainable)
    hf.train()
    hf.vision_model.eval()
    hf.language_model.eval()

    pixels, texts, image_token = images(args.size, args.batch, device), captions(args.batch), d.llm_vocab - 1
    prompts = [lavis.config.prompt] * args.batch
    # the sequences both systems see: same length, same targets
    with torch.no_grad():
        _, _, labels = lavis.build_llm_inputs(lavis.encode_images(pixels), prompts, texts)
    hf_shape = hf_text_inputs(lavis, prompts, texts, image_token, device)["labels"].shape
    assert labels.shape == hf_shape, f"lavis-ext sequences {tuple(labels.shape)} != HF {tuple(hf_shape)}"
    seq_len, n_targets = labels.shape[1], int((labels[:, 1:] != IGNORE_INDEX).sum())
    units = {}
    if args.fsdp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="tcp://127.0.0.1:0",
                                rank=0, world_size=1)
        units = shard_model(lavis, device, world_size=1)
        print(f"FSDP2 units of lavis-ext's model: {units}")

    models = {"lavis-ext": lavis, "hf": hf}
    losses: dict[str, list[torch.Tensor]] = {"lavis-ext": [], "hf": []}
    steps = {
        "lavis-ext": train_step(lavis, lambda: lavis({"image": pixels, "text_input": texts})["loss"], device,
                                losses["lavis-ext"]),
        "hf": train_step(hf, lambda: hf(pixel_values=pixels,
                                        **hf_text_inputs(lavis, prompts, texts, image_token, device)).loss, device,
                         losses["hf"]),
    }
    peaks = warm_up(steps, models, args.warmup, device)
    seconds = median_seconds(steps, args.reps, device)

    flops = train_step_flops(d, args.batch, seq_len, n_targets)
    print(describe_run(args))
    print(f"sequence length {seq_len} ({d.num_query} queries), {n_targets} target tokens; "
          f"model FLOPs per step {flops / 1e12:.3f} T")
    mfu = {name: flops / s / (args.peak_tflops * 1e12) if device.type == "cuda" else None
           for name, s in seconds.items()}
    for name, model in models.items():
        line = (f"{name:10s} step {seconds[name]:.4f} s (median of {args.reps}), "
                f"trainable {param_count(model, True) / 1e6:.1f}M of {param_count(model) / 1e6:.1f}M params, "
                f"{nonfinite(losses[name])} non-finite of {len(losses[name])} losses")
        if device.type == "cuda":
            line += f", MFU {100 * mfu[name]:.1f}%, peak memory {peaks[name]:.2f} GiB"
        print(line)
    ratio = seconds["lavis-ext"] / seconds["hf"]
    print(f"ratio lavis-ext / hf step time: {ratio:.3f} (goal <= 0.9)")
    if args.fsdp:
        dist.destroy_process_group()
    return {"seconds": seconds, "ratio": ratio, "mfu": mfu, "peak_gib": peaks, "flops": flops,
            "steps": {name: len(v) for name, v in losses.items()},
            "nonfinite": {name: nonfinite(v) for name, v in losses.items()}, "fsdp_units": units}


if __name__ == "__main__":
    main()
