"""InternLM2 as an LLM for BLIP-2: exact conversion to ``LlamaForCausalLM`` and a faithful tokenizer."""
from lavis_ext.models.internlm2.conversion import (
    convert_internlm2_state_dict,
    internlm2_config_to_llama,
    load_internlm2_llm,
)
from lavis_ext.models.internlm2.tokenizer import InternLM2Tokenizer, load_internlm2_tokenizer

__all__ = [
    "InternLM2Tokenizer",
    "convert_internlm2_state_dict",
    "internlm2_config_to_llama",
    "load_internlm2_llm",
    "load_internlm2_tokenizer",
]
