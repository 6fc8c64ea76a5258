"""LoRA on the LLM with PEFT, and the mapping to PEFT's adapter files.

``Blip2InternLM`` wraps its ``llm`` (a ``LlamaForCausalLM``) with :func:`add_lora` when
``lora_rank > 0``; only the LLM's modules are wrapped, so the Q-Former (``query``/``key``/
``value``/``dense``) and the ViT (``qkv``/``proj``/``fc1``/``fc2``) never get LoRA, whatever the names.

In the model, LoRA weights are named as PEFT names them inside a ``PeftModelForCausalLM``:
``llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``. In PEFT's
``adapter_model.safetensors`` the same weight is
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (no prefix, no adapter name):
:func:`adapter_state_dict` maps one onto the other.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from peft import LoraConfig, PeftModelForCausalLM, get_peft_model

# The Llama projections: attention and MLP (PEFT's own Llama default is q_proj and v_proj only).
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_NAME = "default"  # PEFT's name of the one adapter
LORA_MARKER = ".lora_"  # in the name of every LoRA parameter (lora_A, lora_B)


def lora_config(rank: int, alpha: float, dropout: float, target_modules: Sequence[str],
                base_model: str = "") -> LoraConfig:
    """PEFT's ``LoraConfig`` for a causal LM, with exactly the given target module names."""
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                      bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model or None)


def add_lora(llm: torch.nn.Module, config: LoraConfig) -> PeftModelForCausalLM:
    """``llm`` wrapped with LoRA adapters; every target module name must occur in ``llm``."""
    names = {name.rsplit(".", 1)[-1] for name, _ in llm.named_modules()}
    unknown = sorted(set(config.target_modules) - names)
    if unknown:
        raise ValueError(f"model.lora_target_modules: {unknown} are not modules of the LLM "
                         f"({type(llm).__name__} has e.g. {sorted(names & set(DEFAULT_TARGET_MODULES))})")
    return get_peft_model(llm, config, adapter_name=ADAPTER_NAME)


def is_lora_parameter(name: str) -> bool:
    return LORA_MARKER in name


def adapter_state_dict(state_dict: Mapping[str, torch.Tensor], prefix: str = "llm.") -> dict[str, torch.Tensor]:
    """The LoRA weights of a model ``state_dict`` under PEFT's file names (see the module docstring)."""
    adapter = {}
    for name, tensor in state_dict.items():
        if name.startswith(prefix) and is_lora_parameter(name):
            adapter[name[len(prefix):].replace(f".{ADAPTER_NAME}.", ".")] = tensor
    return adapter
