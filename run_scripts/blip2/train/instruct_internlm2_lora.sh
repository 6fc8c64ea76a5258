#!/usr/bin/env bash
# BLIP-2 stage 3: instruction tuning with LoRA on InternLM2-Chat from a stage-2 checkpoint (LAVIS_EXT_STAGE2_CKPT) on LLaVA conversations: pretrain_stage2_internlm.sh's launch with this yaml. Extra arguments go to train.py.
# Env: NPROC_PER_NODE (default: all GPUs, or 2 CPU processes), NNODES, MASTER_ADDR, MASTER_PORT (c10d rendezvous; port 0 = any free port, one node only), CFG_PATH.
CFG_PATH="${CFG_PATH:-lavis_ext/projects/blip2/train/instruct_internlm2_chat_1_8b_lora.yaml}" exec bash "$(dirname "$0")/pretrain_stage2_internlm.sh" "$@"
