#!/usr/bin/env bash
# The GPU check of issue 17 (bench/gpu_check.py): stage-2 step (time, MFU, peak memory, fp16 ViT +
# bf16 LLM stability), LoRA, FSDP2 over 1 rank, greedy decode vs HF, stage-1 step; JSON + table in output/gpu_check/.
#   bash bench/gpu_check.sh [--out DIR]    # one GPU, <= 8 minutes (cut at 8: the JSON keeps the rows done)
#   bash bench/gpu_check.sh --dry-run      # tiny sizes on CPU
cd "$(dirname "$0")/.." && exec timeout --signal=INT 480 "${PYTHON:-.venv/bin/python}" bench/gpu_check.py "$@"
