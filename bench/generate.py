"""Greedy captioning with the KV cache, lavis-ext vs HF BLIP-2: generated tokens per second.

    .venv/bin/python bench/generate.py --size small                    # CPU default, < 3 min
    .venv/bin/python bench/generate.py --size 1.8b --device cuda

Each call captions a batch of images from the prompt and decodes the text; both systems are
made to emit exactly ``--new-tokens`` tokens (``min_new_tokens = max_new_tokens``), so the
work is the same. lavis-ext runs with its default static KV cache (``model.llm_cache``) and,
in the same run, with the dynamic cache HF uses, which shows what the static cache buys.
Goal: lavis-ext's tokens/s >= 1.5x HF's.
"""
from __future__ import annotations

import torch
from common import (
    SIZES,
    build_systems,
    describe_run,
    hf_text_inputs,
    images,
    median_seconds,
    parser,
    precision,
    warm_up,
)

PROMPT = "a photo of"


def main(argv: list[str] | None = None) -> dict:
    """Print the comparison; return ``{"tokens_per_s": {system: ...}, "ratio": ..., ...}``."""
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--new-tokens", type=int, default=20)
    args = p.parse_args(argv)
    d = SIZES[args.size]
    args.batch = args.batch or d.batch
    device = torch.device(args.device)
    lavis, hf = build_systems(args)
    lavis.eval()
    hf.eval()

    pixels, n = images(args.size, args.batch, device), args.new_tokens
    prompts = [PROMPT] * args.batch
    stop_ids, tok = lavis.stop_token_ids, lavis.llm_tokenizer

    def run_lavis(cache: str):
        def run() -> list[str]:
            lavis.config.llm_cache = cache
            with precision(device):
                return lavis.generate({"image": pixels, "prompt": prompts}, num_beams=1, max_length=n, min_length=n)
        return run

    def run_hf() -> list[str]:
        inputs = hf_text_inputs(lavis, prompts, None, d.llm_vocab - 1, device)
        with precision(device):
            out = hf.generate(pixel_values=pixels, **inputs, do_sample=False, num_beams=1, max_new_tokens=n,
                              min_new_tokens=n, eos_token_id=stop_ids, pad_token_id=tok.pad_token_id,
                              suppress_tokens=lavis.llm.generation_config.suppress_tokens)
        return tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    runs = {"lavis-ext": run_lavis("static"), "lavis-ext dynamic": run_lavis("dynamic"), "hf": run_hf}
    outputs = {name: run() for name, run in runs.items()}
    if outputs["lavis-ext"] != outputs["lavis-ext dynamic"]:
        raise AssertionError(f"static and dynamic cache captions differ: {outputs}")
    peaks = warm_up(runs, {"lavis-ext": lavis, "lavis-ext dynamic": lavis, "hf": hf}, args.warmup, device)
    seconds = median_seconds(runs, args.reps, device)

    print(describe_run(args))
    print(f"prompt {PROMPT!r}, {d.num_query} queries, {n} new tokens per image, greedy, KV cache")
    tokens_per_s = {name: args.batch * n / s for name, s in seconds.items()}
    for name in runs:
        line = f"{name:17s} {seconds[name]:.4f} s per batch (median of {args.reps}), {tokens_per_s[name]:.1f} tokens/s"
        if device.type == "cuda":
            line += f", peak memory {peaks[name]:.2f} GiB"
        print(line)
    ratio = tokens_per_s["lavis-ext"] / tokens_per_s["hf"]
    static_gain = tokens_per_s["lavis-ext"] / tokens_per_s["lavis-ext dynamic"]
    print(f"ratio lavis-ext / hf tokens/s: {ratio:.3f} (goal >= 1.5)")
    print(f"ratio static / dynamic cache (lavis-ext) tokens/s: {static_gain:.3f}")
    return {"tokens_per_s": tokens_per_s, "ratio": ratio, "static_over_dynamic": static_gain,
            "peak_gib": peaks, "new_tokens": n, "batch": args.batch}


if __name__ == "__main__":
    main()
