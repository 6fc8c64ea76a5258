#!/usr/bin/env bash
# COCO captioning evaluation of BLIP-2 x InternLM2. Extra arguments go to evaluate.py.
# Env: NPROC_PER_NODE (default: all GPUs, or 2 CPU processes), NNODES, MASTER_ADDR, MASTER_PORT (c10d rendezvous; port 0 = any free port, one node only), CFG_PATH.
cd "$(dirname "$0")/../../.." && exec "${PYTHON:-.venv/bin/python}" -m torch.distributed.run --nproc_per_node="${NPROC_PER_NODE:-$("${PYTHON:-.venv/bin/python}" -c 'import torch; print(torch.cuda.device_count() or 2)')}" --nnodes="${NNODES:-1}" --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-0}" evaluate.py --cfg-path "${CFG_PATH:-lavis_ext/projects/blip2/eval/caption_coco_internlm2_eval.yaml}" "$@"
