#!/usr/bin/env bash
# BLIP-2 stage 2 (stage-1 Q-Former -> frozen InternLM2) on COCO + VG; CFG_PATH selects 1.8B (default) or 7B. Extra arguments go to train.py.
# Env: NPROC_PER_NODE (default: all GPUs, or 2 CPU processes), NNODES, MASTER_ADDR, MASTER_PORT (c10d rendezvous; port 0 = any free port, one node only).
cd "$(dirname "$0")/../../.." && exec "${PYTHON:-.venv/bin/python}" -m torch.distributed.run --nproc_per_node="${NPROC_PER_NODE:-$("${PYTHON:-.venv/bin/python}" -c 'import torch; print(torch.cuda.device_count() or 2)')}" --nnodes="${NNODES:-1}" --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-0}" train.py --cfg-path "${CFG_PATH:-lavis_ext/projects/blip2/train/pretrain_stage2_internlm2_1_8b.yaml}" "$@"
