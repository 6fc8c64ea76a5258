#!/usr/bin/env bash
# Zero-shot GQA evaluation of BLIP-2 x InternLM2. Extra arguments go to evaluate.py.
# Env: NPROC_PER_NODE (default: all GPUs, or 2 CPU processes), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, CFG_PATH.
cd "$(dirname "$0")/../../.." && exec "${PYTHON:-.venv/bin/python}" -m torch.distributed.run --nproc_per_node="${NPROC_PER_NODE:-$("${PYTHON:-.venv/bin/python}" -c 'import torch; print(torch.cuda.device_count() or 2)')}" --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" evaluate.py --cfg-path "${CFG_PATH:-lavis_ext/projects/blip2/eval/gqa_zeroshot_internlm2_eval.yaml}" "$@"
