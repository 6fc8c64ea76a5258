"""The GPU check (issue 17): every GPU figure in one run, <= 8 minutes on one GPU.

    bash bench/gpu_check.sh [--out DIR]      # one GPU: InternLM2-1.8B shapes, batch 32, bf16, SDPA
    bash bench/gpu_check.sh --dry-run        # tiny sizes on CPU (make test runs this)

Rows, each through the existing benchmarks (``train_step.main``, ``generate.main``), same process:

1. stage-2 train step vs HF: step time, MFU, peak memory (goal <= 22 GiB: batch 32 on a 24 GB
   card); its steps also check fp16 ViT + bf16 LLM (lavis-ext's CUDA precision): no non-finite
   loss over ``--stability-steps`` steps;
2. the same with LoRA on the LLM (``model.lora_rank``);
3. FSDP on one GPU: not built yet (a row that says so);
4. greedy captioning tokens/s vs HF (static KV cache, and lavis-ext's dynamic cache beside it);
5. the stage-1 step (``blip2_qformer_ext``: ITC + ITM + LM, frozen ViT) with the same ViT and Q-Former.

Writes ``<out>/gpu_check.json`` after every row (so a run cut short keeps what it measured) and
``<out>/gpu_check.md``, a table of the same numbers.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import generate
import torch
import train_step
from common import BENCH_DIR, SIZES, captions, checkpoint_dirs, describe_run, images, median_seconds, warm_up
from lavis.common.registry import registry
from omegaconf import OmegaConf


REPO = BENCH_DIR.parent
PEAK_MEMORY_GOAL_GIB = 22.0
LORA_RANK = 8
STAGE1_BATCH = 60  # pretrain_stage1.yaml's batch per GPU
SETTINGS = {  # per mode: size, device, timed repetitions, steps of the stability check, stage-1 batch
    "gpu": dict(size="1.8b", device="cuda", reps=10, stability_steps=50, stage1_batch=STAGE1_BATCH),
    "dry-run": dict(size="tiny", device="cpu", reps=1, stability_steps=3, stage1_batch=4),
}


def common_args(s: dict, reps: int) -> list[str]:
    return ["--size", s["size"], "--device", s["device"], "--reps", str(reps), "--warmup", "1"]


def stage2_row(s: dict) -> dict:
    # warm-up + timed steps of lavis-ext make up the stability check
    result = train_step.main(common_args(s, s["stability_steps"] - 1))
    peak = result["peak_gib"]["lavis-ext"]
    return {"row": "stage-2 train step", "lavis_ext_s": result["seconds"]["lavis-ext"], "hf_s": result["seconds"]["hf"],
            "ratio": result["ratio"], "mfu": result["mfu"]["lavis-ext"], "hf_mfu": result["mfu"]["hf"],
            "peak_gib": peak, "hf_peak_gib": result["peak_gib"]["hf"],
            "peak_goal_met": None if peak is None else peak <= PEAK_MEMORY_GOAL_GIB,
            "stability_steps": result["steps"]["lavis-ext"], "nonfinite_losses": result["nonfinite"]["lavis-ext"]}


def lora_row(s: dict) -> dict:
    result = train_step.main([*common_args(s, s["reps"]), "--lora-rank", str(LORA_RANK)])
    return {"row": f"stage-2 train step, LoRA r={LORA_RANK}", "lavis_ext_s": result["seconds"]["lavis-ext"],
            "hf_s": result["seconds"]["hf"], "ratio": result["ratio"], "mfu": result["mfu"]["lavis-ext"],
            "peak_gib": result["peak_gib"]["lavis-ext"], "nonfinite_losses": result["nonfinite"]["lavis-ext"]}


def fsdp_row(s: dict) -> dict:
    result = train_step.main([*common_args(s, s["reps"]), "--fsdp"])
    return {"row": "stage-2 train step, FSDP2 over 1 rank", "lavis_ext_s": result["seconds"]["lavis-ext"],
            "hf_s": result["seconds"]["hf"], "ratio": result["ratio"], "mfu": result["mfu"]["lavis-ext"],
            "peak_gib": result["peak_gib"]["lavis-ext"], "nonfinite_losses": result["nonfinite"]["lavis-ext"],
            "fsdp_units": sum(result["fsdp_units"].values())}


def decode_row(s: dict) -> dict:
    result = generate.main(common_args(s, s["reps"]))
    tokens = result["tokens_per_s"]
    return {"row": f"greedy captioning, {result['new_tokens']} tokens", "lavis_ext_tok_s": tokens["lavis-ext"],
            "lavis_ext_dynamic_tok_s": tokens["lavis-ext dynamic"], "hf_tok_s": tokens["hf"], "ratio": result["ratio"],
            "static_over_dynamic": result["static_over_dynamic"], "peak_gib": result["peak_gib"]["lavis-ext"]}


def stage1_row(s: dict) -> dict:
    """Stage 1 (no HF counterpart): ``blip2_qformer_ext`` with the size's ViT and Q-Former, AdamW step."""
    d, device = SIZES[s["size"]], torch.device(s["device"])
    dirs = checkpoint_dirs(s["size"], device)
    torch.manual_seed(0)
    model = registry.get_model_class("blip2_qformer_ext").from_config(OmegaConf.create(dict(
        bert_path=str(dirs["bert"]), vit_path=str(dirs["vit"]), vit_model="eva_clip_g", image_size=d.image_size, num_query_token=d.num_query,
        vit_precision="fp16" if device.type == "cuda" else "fp32", freeze_vit=True, load_finetuned=False,
        pretrained=""))).to(device)
    model.train()
    batch = s["stage1_batch"]
    samples = {"image": images(s["size"], batch, device), "text_input": captions(batch),
               "image_id": list(range(batch))}
    losses: list[torch.Tensor] = []
    step = {"stage-1": train_step.train_step(model, lambda: model(samples)["loss"], device, losses)}
    peak = warm_up(step, {"stage-1": model}, 1, device)["stage-1"]
    seconds = median_seconds(step, s["reps"], device)["stage-1"]
    return {"row": f"stage-1 train step, batch {batch}", "lavis_ext_s": seconds, "peak_gib": peak,
            "nonfinite_losses": train_step.nonfinite(losses)}


ROWS = (stage2_row, lora_row, fsdp_row, decode_row, stage1_row)


def fmt(value, spec: str = ".3f") -> str:
    return "" if value is None else f"{value:{spec}}"


def table(rows: list[dict]) -> str:
    lines = ["| check | lavis-ext | HF | ratio | MFU | peak GiB | non-finite losses |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "lavis_ext_tok_s" in r:
            ours = f"{r['lavis_ext_tok_s']:.1f} tok/s (dynamic cache {r['lavis_ext_dynamic_tok_s']:.1f})"
            theirs = f"{r['hf_tok_s']:.1f} tok/s"
        else:
            ours, theirs = f"{r['lavis_ext_s']:.4f} s", fmt(r.get("hf_s"), ".4f") + (" s" if r.get("hf_s") else "")
        nonfinite = "" if "nonfinite_losses" not in r else f"{r['nonfinite_losses']}" + (
            f" of {r['stability_steps']}" if "stability_steps" in r else "")
        mfu = "" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        peak = fmt(r.get("peak_gib"), ".2f") + ("" if r.get("peak_goal_met") is None
                                                else f" ({'meets' if r['peak_goal_met'] else 'misses'} <= 22)")
        lines.append(f"| {r['row']} | {ours} | {theirs} | {fmt(r.get('ratio'))} | {mfu} | {peak} | {nonfinite} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: checks the script, measures nothing")
    p.add_argument("--out", type=Path, default=REPO / "output" / "gpu_check", help="where gpu_check.json and .md go")
    args = p.parse_args(argv)
    mode = "dry-run" if args.dry_run else "gpu"
    s = SETTINGS[mode]
    if s["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --dry-run to check the script on CPU)")
    args.out.mkdir(parents=True, exist_ok=True)
    run = argparse.Namespace(size=s["size"], device=s["device"], batch=SIZES[s["size"]].batch)
    report = {"mode": mode, "run": describe_run(run), "rows": []}
    start = time.perf_counter()
    for row in ROWS:
        report["rows"].append(row(s))
        report["seconds"] = time.perf_counter() - start
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (args.out / "gpu_check.md").write_text(f"{report['run']}, {mode}, {report['seconds']:.0f} s\n\n"
                                           + table(report["rows"]))
    print(table(report["rows"]))
    return report


if __name__ == "__main__":
    main()
