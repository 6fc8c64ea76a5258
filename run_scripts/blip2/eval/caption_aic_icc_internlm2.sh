#!/usr/bin/env bash
# Chinese captioning evaluation of BLIP-2 x InternLM2 on AIC-ICC (AI Challenger 2017) val: caption_coco_internlm2.sh's launch with this set's yaml. Extra arguments go to evaluate.py.
# Env: NPROC_PER_NODE (default: all GPUs, or 2 CPU processes), NNODES, MASTER_ADDR, MASTER_PORT (c10d rendezvous; port 0 = any free port, one node only), CFG_PATH.
CFG_PATH="${CFG_PATH:-lavis_ext/projects/blip2/eval/caption_aic_icc_internlm2_eval.yaml}" exec bash "$(dirname "$0")/caption_coco_internlm2.sh" "$@"
