"""InternLM2 checkpoints loaded as an exact ``transformers.LlamaForCausalLM``.

transformers 4.57 has no native ``internlm2`` model, and the hub's remote code is not run
here. InternLM2 is Llama with renamed parameters and a packed ``attention.wqkv``, so a
checkpoint converts to Llama exactly (the same mapping as InternLM's
``tools/convert2llama.py``):

===========================================  ==============================================
InternLM2 (``model.layers.{i}.`` elided)     Llama
===========================================  ==============================================
``model.tok_embeddings.weight``              ``model.embed_tokens.weight``
``attention_norm.weight``                    ``input_layernorm.weight``
``attention.wqkv.weight``                    ``self_attn.{q,k,v}_proj.weight`` (split)
``attention.wo.weight``                      ``self_attn.o_proj.weight``
``ffn_norm.weight``                          ``post_attention_layernorm.weight``
``feed_forward.w1`` / ``w3`` / ``w2``        ``mlp.gate_proj`` / ``up_proj`` / ``down_proj``
``model.norm.weight``                        ``model.norm.weight``
``output.weight``                            ``lm_head.weight``
===========================================  ==============================================

The rows of ``wqkv`` are grouped per KV head: block ``j`` is ``[q_{jG} .. q_{jG+G-1}, k_j,
v_j]`` with ``G = heads / kv_heads``, each piece ``head_dim`` rows. Splitting it into
contiguous thirds (or ``[Q|K|V]``) is wrong whenever there is more than one KV head. No RoPE
permutation is needed: both models rotate halves of the head dimension.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from safetensors.torch import load_file
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# (single file, sharded index) per serialization, in order of preference.
WEIGHT_LAYOUTS = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)

# Every field that decides the architecture or the numerics. The InternLM2 class defaults
# (bias=True, rms_norm_eps=1e-6, rope_theta=1e4) differ from the released checkpoints, so a
# missing field is an error rather than a silent default. ``rope_scaling`` may be null.
REQUIRED_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "bias",
    "tie_word_embeddings",
)
# InternLM2-only or loader-specific fields; everything else is passed to LlamaConfig as is.
DROPPED_CONFIG_KEYS = (
    "auto_map",
    "_name_or_path",
    "transformers_version",
    "model_type",
    "architectures",
    "tokenizer_class",
    "attn_implementation",
)
ROPE_SCALING_TYPES = ("linear", "dynamic")

TOP_LEVEL_NAMES = {
    "model.tok_embeddings.weight": "model.embed_tokens.weight",
    "model.norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Older checkpoints saved the rotary cache; it is recomputed from the config.
_STALE_ROTARY_KEY = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist")
    with file.open(encoding="utf-8") as handle:
        return json.load(handle)


def _llama_rope_scaling(rope_scaling: Mapping[str, Any] | None, source: str) -> dict[str, Any] | None:
    """InternLM2's ``{"type": t, "factor": f}`` as transformers 4.57's ``{"rope_type": t, "factor": f}``."""
    if rope_scaling is None:
        return None
    rope_type = rope_scaling.get("type", rope_scaling.get("rope_type"))
    if rope_type not in ROPE_SCALING_TYPES:
        raise ValueError(f"{source}: rope_scaling type {rope_type!r} is not one of {ROPE_SCALING_TYPES}")
    if "factor" not in rope_scaling:
        raise ValueError(f"{source}: rope_scaling {dict(rope_scaling)} has no 'factor'")
    return {"rope_type": rope_type, "factor": float(rope_scaling["factor"])}


def internlm2_config_to_llama(config: Mapping[str, Any], source: str | Path = CONFIG_FILE) -> LlamaConfig:
    """Map an InternLM2 ``config.json`` (as a dict) to the equivalent ``LlamaConfig``.

    Every value comes from ``config``; ``source`` (the file it was read from) is named in
    errors. ``bias: true`` is refused: no released InternLM2 checkpoint has attention biases,
    and ``convert2llama`` asserts the same.
    """
    source = str(source)
    if config.get("model_type") != "internlm2":
        raise ValueError(f"{source}: model_type is {config.get('model_type')!r}, expected 'internlm2'")
    missing = [key for key in REQUIRED_CONFIG_KEYS if key not in config]
    if missing:
        raise ValueError(f"{source}: required InternLM2 config key(s) missing: {', '.join(missing)}")
    if config["bias"]:
        raise ValueError(
            f"{source}: 'bias' is true; InternLM2 checkpoints with wqkv/wo biases are not supported "
            "(released checkpoints use bias: false)"
        )
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    hidden = config["hidden_size"]
    if hidden % heads or heads % kv_heads:
        raise ValueError(
            f"{source}: hidden_size {hidden}, num_attention_heads {heads} and num_key_value_heads "
            f"{kv_heads} must divide evenly"
        )

    fields = {key: value for key, value in config.items() if key not in DROPPED_CONFIG_KEYS and key != "bias"}
    fields["rope_scaling"] = _llama_rope_scaling(config["rope_scaling"], source)
    return LlamaConfig(**fields, attention_bias=False, mlp_bias=False, architectures=["LlamaForCausalLM"])


def split_wqkv(
    wqkv: torch.Tensor, *, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a packed ``[(H + 2·KV)·D, hidden]`` weight into q ``[H·D]``, k and v ``[KV·D]`` rows.

    Rows are viewed as ``(KV, G + 2, D)``: slots ``[:G]`` are that KV head's query heads (in
    HF's head order once flattened), slot ``G`` its key and slot ``G + 1`` its value. Each part
    is copied into its own storage so it neither keeps the packed tensor alive nor shares
    memory with its siblings (which safetensors refuses to save).
    """
    group = num_heads // num_kv_heads
    expected_rows = (num_heads + 2 * num_kv_heads) * head_dim
    if wqkv.shape[0] != expected_rows:
        raise ValueError(
            f"wqkv has {wqkv.shape[0]} rows, expected (heads {num_heads} + 2 * kv_heads {num_kv_heads}) "
            f"* head_dim {head_dim} = {expected_rows}"
        )
    blocks = rearrange(wqkv, "(h gs d) dim -> h gs d dim", gs=group + 2, d=head_dim)
    parts = torch.split(blocks, [group, 1, 1], dim=1)
    q, k, v = (
        rearrange(part, "h gs d dim -> (h gs d) dim").clone(memory_format=torch.contiguous_format)
        for part in parts
    )
    return q, k, v


def convert_internlm2_tensor(name: str, tensor: torch.Tensor, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Convert one InternLM2 tensor to its Llama name(s).

    Returns three tensors for ``wqkv``, none for a stale ``rotary_emb.inv_freq`` and one
    otherwise. An unknown name is returned unchanged, so the caller's strict check reports it.
    """
    if _STALE_ROTARY_KEY.search(name):
        return {}
    if name in TOP_LEVEL_NAMES:
        return {TOP_LEVEL_NAMES[name]: tensor}
    match = _LAYER_KEY.match(name)
    if match is None:
        return {name: tensor}
    prefix, suffix = f"model.layers.{match.group(1)}.", match.group(2)
    if suffix == "attention.wqkv.weight":
        q, k, v = split_wqkv(
            tensor,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
        )
        return {
            f"{prefix}self_attn.q_proj.weight": q,
            f"{prefix}self_attn.k_proj.weight": k,
            f"{prefix}self_attn.v_proj.weight": v,
        }
    if suffix in LAYER_NAMES:
        return {prefix + LAYER_NAMES[suffix]: tensor}
    return {name: tensor}


def convert_internlm2_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: LlamaConfig
) -> dict[str, torch.Tensor]:
    """Convert an InternLM2 state dict (or one shard of it) to Llama names and layout.

    Each tensor converts on its own, so shards can be converted one at a time.
    """
    converted = (convert_internlm2_tensor(name, tensor, config) for name, tensor in state_dict.items())
    return dict(chain.from_iterable(parts.items() for parts in converted))


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files: a single file or the shards named by its index."""
    for single, index in WEIGHT_LAYOUTS:
        if (path / single).is_file():
            return [path / single]
        if (path / index).is_file():
            shards = sorted(set(_read_json(path / index)["weight_map"].values()))
            return [path / shard for shard in shards]
    names = ", ".join(chain.from_iterable(WEIGHT_LAYOUTS))
    raise FileNotFoundError(f"{path}: no weights found (looked for {names})")


def _load_shard(file: Path) -> dict[str, torch.Tensor]:
    if file.name.endswith(".safetensors"):
        return load_file(file)
    return torch.load(file, map_location="cpu", weights_only=True)


def _iter_converted_shards(path: Path, config: LlamaConfig) -> Iterator[dict[str, torch.Tensor]]:
    for file in weight_files(path):
        yield convert_internlm2_state_dict(_load_shard(file), config)


def load_internlm2_llm(
    path: str | Path,
    torch_dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> LlamaForCausalLM:
    """Load a local InternLM2 checkpoint (hub layout) as an equivalent ``LlamaForCausalLM``.

    ``path`` holds ``config.json`` and ``model.safetensors``, ``pytorch_model.bin`` or a
    sharded index of either. A directory already in Llama layout (``model_type: llama``, e.g.
    written by ``python -m lavis_ext.models.internlm2.convert``) loads with
    ``from_pretrained``.

    The model is built on the ``meta`` device and filled shard by shard with
    ``load_state_dict(assign=True)``, so about one shard is held besides the model itself.
    Loading is strict: missing parameters or unknown keys raise ``ValueError`` listing them.
    ``generation_config.json`` (the chat models' eos ids) is kept when present. Returns the
    model in eval mode.
    """
    path = Path(path)
    raw_config = _read_json(path / CONFIG_FILE)
    if raw_config.get("model_type") == "llama":
        model = LlamaForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=torch_dtype, attn_implementation=attn_implementation
        )
        return model.eval()

    config = internlm2_config_to_llama(raw_config, source=path / CONFIG_FILE)
    config.dtype = torch_dtype
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = LlamaForCausalLM(config)

    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    filled: set[str] = set()
    unexpected: list[str] = []
    for tensors in _iter_converted_shards(path, config):
        unexpected += [name for name in tensors if name not in expected]
        known = {name: tensor.to(torch_dtype) for name, tensor in tensors.items() if name in expected}
        model.load_state_dict(known, strict=False, assign=True)
        filled.update(known)
        del tensors, known  # free this shard before the next one is read

    missing = sorted(expected - filled)
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match the converted Llama model; "
            f"missing (Llama names): {missing}; unexpected: {sorted(unexpected)}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    # The rotary cache is a non-persistent buffer, so it is still on `meta`: rebuild it.
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)
    named = chain(model.named_parameters(), model.named_buffers())
    on_meta = [name for name, tensor in named if tensor.is_meta]
    if on_meta:
        raise ValueError(f"{path}: tensors left unfilled after loading: {on_meta}")

    if (path / GENERATION_CONFIG_FILE).is_file():
        model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    return model.eval()
