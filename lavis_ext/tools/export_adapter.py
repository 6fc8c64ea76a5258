"""Export a LoRA-tuned ``blip2_internlm`` checkpoint (stage 3) as files others can load without lavis-ext.

    python -m lavis_ext.tools.export_adapter CHECKPOINT OUT [--merge]

``OUT`` receives:

- ``adapter_config.json`` + ``adapter_model.safetensors``: a standard PEFT LoRA adapter for the
  LLM as a converted Llama (``python -m lavis_ext.models.internlm2.convert SRC DST``), loaded with
  ``PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(DST), OUT)``;
- ``blip2_qformer.safetensors``: every other trained weight of the checkpoint (``query_tokens``,
  ``ln_vision``, ``qformer``, ``llm_proj``) under lavis-ext's names, and ``blip2_config.json``,
  the checkpoint's model config.

With ``--merge``, ``OUT`` holds instead a plain Llama directory (``config.json``, safetensors,
tokenizer) with the LoRA update merged into the weights of the checkpoint's ``model.llm_path``,
beside the same two ``blip2_*`` files.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from lavis_ext.checkpoint import load_checkpoint_file, model_weights
from lavis_ext.models.blip2_models.blip2_internlm import Blip2InternLMConfig
from lavis_ext.models.internlm2 import load_internlm2_llm, load_internlm2_tokenizer
from lavis_ext.models.lora import adapter_state_dict, lora_config

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # PEFT's SAFETENSORS_WEIGHTS_NAME
BLIP2_WEIGHTS = "blip2_qformer.safetensors"
BLIP2_CONFIG = "blip2_config.json"


def write_adapter(config: Blip2InternLMConfig, state_dict: dict, out: Path) -> None:
    """PEFT's two adapter files for the LoRA weights in ``state_dict``."""
    adapter = adapter_state_dict(state_dict)
    if not adapter:
        raise ValueError("the checkpoint holds no LoRA weights (llm.*.lora_A/B); was it trained with model.lora_rank > 0?")
    lora_config(config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_target_modules,
                base_model=config.llm_path).save_pretrained(str(out))
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def write_merged_llm(config: Blip2InternLMConfig, state_dict: dict, out: Path) -> None:
    """The LLM of ``config.llm_path`` with the adapter merged in, as a plain Llama directory."""
    from peft import PeftModel

    llm = load_internlm2_llm(config.llm_path, torch_dtype=torch.float32)
    with tempfile.TemporaryDirectory() as adapter_dir:
        write_adapter(config, state_dict, Path(adapter_dir))
        merged = PeftModel.from_pretrained(llm, adapter_dir).merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)
    load_internlm2_tokenizer(config.llm_path).save_pretrained(out)


def export(checkpoint_path: str | Path, out: str | Path, merge: bool = False) -> Path:
    checkpoint = load_checkpoint_file(checkpoint_path, "CHECKPOINT")
    state_dict = model_weights(checkpoint, "CHECKPOINT", checkpoint_path)
    if not isinstance(checkpoint.get("config"), dict) or "model" not in checkpoint["config"]:
        raise ValueError(f"{checkpoint_path}: no model config in the checkpoint (runner_ext writes it under 'config')")
    model_cfg = OmegaConf.create(checkpoint["config"]).model
    config = Blip2InternLMConfig.from_lavis(model_cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (write_merged_llm if merge else write_adapter)(config, state_dict, out)
    blip2 = {k: v.contiguous() for k, v in state_dict.items() if not k.startswith("llm.")}
    save_file(blip2, str(out / BLIP2_WEIGHTS), metadata={"format": "pt"})
    (out / BLIP2_CONFIG).write_text(json.dumps(OmegaConf.to_container(model_cfg, resolve=True), indent=2) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a runner_ext checkpoint of blip2_internlm with model.lora_rank > 0")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--merge", action="store_true", help="write a merged Llama directory instead of the adapter")
    args = parser.parse_args(argv)
    return export(args.checkpoint, args.out, merge=args.merge)


if __name__ == "__main__":
    main()
