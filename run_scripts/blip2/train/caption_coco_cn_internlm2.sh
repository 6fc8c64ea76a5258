#!/usr/bin/env bash
# Chinese caption fine-tuning of BLIP-2 x InternLM2 on COCO-CN from a stage-2 checkpoint (LAVIS_EXT_STAGE2_CKPT): pretrain_stage2_internlm.sh's launch with this yaml. Extra arguments go to train.py.
# Env: NPROC_PER_NODE (default: all GPUs, or 2 CPU processes), NNODES, MASTER_ADDR, MASTER_PORT (c10d rendezvous; port 0 = any free port, one node only), CFG_PATH.
CFG_PATH="${CFG_PATH:-lavis_ext/projects/blip2/train/caption_coco_cn_internlm2_1_8b.yaml}" exec bash "$(dirname "$0")/pretrain_stage2_internlm.sh" "$@"
