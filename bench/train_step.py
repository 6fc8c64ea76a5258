"""Stage-2 train step, lavis-ext vs HF BLIP-2: forward, backward and AdamW, ViT and LLM frozen.

    .venv/bin/python bench/train_step.py --size small                  # CPU default, < 3 min
    .venv/bin/python bench/train_step.py --size 1.8b --device cuda     # MFU against --peak-tflops

Goal: lavis-ext's step time <= 0.9x HF's (ratio of medians, same run).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
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


def train_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], None]:
    """One optimizer step on ``loss_fn()``: AdamW over the trainable parameters (fused on CUDA)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  weight_decay=0.05, fused=device.type == "cuda")

    def step() -> None:
        with precision(device):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the device's dense bf16 peak, for MFU (H100 SXM: 989)")
    args = p.parse_args()
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

    models = {"lavis-ext": lavis, "hf": hf}
    steps = {
        "lavis-ext": train_step(lavis, lambda: lavis({"image": pixels, "text_input": texts})["loss"], device),
        "hf": train_step(hf, lambda: hf(pixel_values=pixels,
                                        **hf_text_inputs(lavis, prompts, texts, image_token, device)).loss, device),
    }
    peaks = warm_up(steps, models, args.warmup, device)
    seconds = median_seconds(steps, args.reps, device)

    flops = train_step_flops(d, args.batch, seq_len, n_targets)
    print(describe_run(args))
    print(f"sequence length {seq_len} ({d.num_query} queries), {n_targets} target tokens; "
          f"model FLOPs per step {flops / 1e12:.3f} T")
    for name, model in models.items():
        line = (f"{name:10s} step {seconds[name]:.4f} s (median of {args.reps}), "
                f"trainable {param_count(model, True) / 1e6:.1f}M of {param_count(model) / 1e6:.1f}M params")
        if device.type == "cuda":
            mfu = flops / seconds[name] / (args.peak_tflops * 1e12)
            line += f", MFU {100 * mfu:.1f}%, peak memory {peaks[name]:.2f} GiB"
        print(line)
    print(f"ratio lavis-ext / hf step time: {seconds['lavis-ext'] / seconds['hf']:.3f} (goal <= 0.9)")


if __name__ == "__main__":
    main()
