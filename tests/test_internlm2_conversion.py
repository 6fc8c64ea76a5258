"""InternLM2 -> Llama conversion checked against a float64 InternLM2 forward written from the spec.

The reference reads the ORIGINAL packed ``wqkv`` and indexes it per head as the spec says
(block j = [q_{jG} .. q_{jG+G-1}, k_j, v_j]); it shares no code with the converter.
transformers is used through its lazy top-level module, so its model code is first imported
after ``lavis_ext`` has applied its environment patches.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

from lavis_ext.models.internlm2 import (
    convert_internlm2_state_dict,
    internlm2_config_to_llama,
    load_internlm2_llm,
    load_internlm2_tokenizer,
)
from lavis_ext.models.internlm2.conversion import split_wqkv
from lavis_ext.models.internlm2.convert import main as convert_main
from lavis_ext.tiny.internlm2 import make_tiny_internlm2

MAX_POS = 16
SEQ_LEN = 40  # > MAX_POS, so dynamic NTK rescales the RoPE base
TOLERANCE = 1e-4


# ---------------------------------------------------------------- reference InternLM2 forward
def _packed_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(ckpt.glob("*.safetensors")):
        weights |= load_file(file)
    return {name: tensor.double() for name, tensor in weights.items()}


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rope_cos_sin(
    cfg: dict[str, Any], seq_len: int, head_dim: int, use_scaling: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    base = cfg["rope_theta"]
    positions = torch.arange(seq_len, dtype=torch.float64)
    scaling = cfg["rope_scaling"] if use_scaling else None
    if scaling and scaling["type"] == "dynamic" and seq_len > cfg["max_position_embeddings"]:
        f, max_pos = scaling["factor"], cfg["max_position_embeddings"]
        base = base * ((f * seq_len / max_pos) - (f - 1)) ** (head_dim / (head_dim - 2))
    if scaling and scaling["type"] == "linear":
        positions = positions / scaling["factor"]
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def reference_logits(ckpt: Path, input_ids: torch.Tensor, use_scaling: bool = True) -> torch.Tensor:
    """InternLM2 forward for one sequence ``[L]`` in float64 -> logits ``[L, V]``."""
    cfg = json.loads((ckpt / "config.json").read_text())
    w = _packed_weights(ckpt)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg["hidden_size"] // heads
    group = heads // kv_heads
    eps = cfg["rms_norm_eps"]
    seq_len = input_ids.shape[0]
    cos, sin = _rope_cos_sin(cfg, seq_len, head_dim, use_scaling)
    causal = torch.full((seq_len, seq_len), float("-inf"), dtype=torch.float64).triu(1)

    def rows(tensor: torch.Tensor, start: int) -> torch.Tensor:
        return tensor[:, start : start + head_dim]

    x = w["model.tok_embeddings.weight"][input_ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        qkv = _rms_norm(x, w[p + "attention_norm.weight"], eps) @ w[p + "attention.wqkv.weight"].T
        block = (group + 2) * head_dim
        outputs = []
        for h in range(heads):
            j = h // group  # query head h reads KV head h // G
            q = rows(qkv, j * block + (h % group) * head_dim)
            k = rows(qkv, j * block + group * head_dim)
            v = rows(qkv, j * block + (group + 1) * head_dim)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            scores = q @ k.T / math.sqrt(head_dim) + causal
            outputs.append(torch.softmax(scores, dim=-1) @ v)
        x = x + torch.cat(outputs, dim=-1) @ w[p + "attention.wo.weight"].T
        hn = _rms_norm(x, w[p + "ffn_norm.weight"], eps)
        gate, up = hn @ w[p + "feed_forward.w1.weight"].T, hn @ w[p + "feed_forward.w3.weight"].T
        x = x + (F.silu(gate) * up) @ w[p + "feed_forward.w2.weight"].T
    return _rms_norm(x, w["model.norm.weight"], eps) @ w["output.weight"].T


# English, Chinese, spaces, newlines, tabs, emoji, digits and added tokens inside text.
TOKENIZER_TEXTS = ["a red circle.", "你好，世界！", " two  spaces ", "a\n\nb\tc", "emoji 🙂 2024",
                   "x <|plugin|> y", "<s>hi</s>", "a<|im_end|>b", ""]


# ---------------------------------------------------------------- helpers
def _input_ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(3, vocab_size, (SEQ_LEN,), generator=torch.Generator().manual_seed(1))


def _logits(model: transformers.LlamaForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids[None]).logits[0]


def _max_diff(model: transformers.LlamaForCausalLM, ckpt: Path, input_ids: torch.Tensor) -> float:
    return (_logits(model, input_ids).double() - reference_logits(ckpt, input_ids)).abs().max().item()


def _tiny(tmp_path: Path, name: str = "internlm2", **kwargs: Any) -> Path:
    kwargs = {"max_position_embeddings": MAX_POS, **kwargs}
    return make_tiny_internlm2(tmp_path / name, **kwargs)


def _edit_config(ckpt: Path, *, remove: str | None = None, **changes: Any) -> None:
    file = ckpt / "config.json"
    config = json.loads(file.read_text()) | changes
    if remove is not None:
        del config[remove]
    file.write_text(json.dumps(config))


def _as_pytorch_bin(src: Path, dst: Path, shards: int) -> Path:
    """Copy ``src`` with its weights re-saved as ``pytorch_model.bin`` (with an index if shards > 1)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors*"))
    weights = _packed_weights(src)
    weights = {name: tensor.float() for name, tensor in weights.items()}
    if shards == 1:
        torch.save(weights, dst / "pytorch_model.bin")
        return dst
    names = list(weights)
    weight_map = {}
    for n in range(shards):
        shard = f"pytorch_model-{n + 1:05d}-of-{shards:05d}.bin"
        part = names[n::shards]
        torch.save({name: weights[name] for name in part}, dst / shard)
        weight_map |= dict.fromkeys(part, shard)
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


# ---------------------------------------------------------------- logits vs the spec
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (4, 1)], ids=["G1", "G2", "G4"])
def test_logits_match_reference_forward(
    tmp_path: Path, heads: int, kv_heads: int, attn_implementation: str
) -> None:
    ckpt = _tiny(tmp_path, num_heads=heads, num_kv_heads=kv_heads)
    model = load_internlm2_llm(ckpt, torch_dtype=torch.float32, attn_implementation=attn_implementation)
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert model.config._attn_implementation == attn_implementation
    input_ids = _input_ids(model.config.vocab_size)

    assert _max_diff(model, ckpt, input_ids) <= TOLERANCE
    # The check sees dynamic NTK: ignoring it moves the reference by several tolerances (~1e-3).
    no_ntk = reference_logits(ckpt, input_ids, use_scaling=False)
    assert (_logits(model, input_ids).double() - no_ntk).abs().max().item() > 5 * TOLERANCE


def test_linear_rope_scaling_matches_reference(tmp_path: Path) -> None:
    ckpt = _tiny(tmp_path, rope_scaling={"type": "linear", "factor": 3.0})
    model = load_internlm2_llm(ckpt, attn_implementation="eager")
    assert model.config.rope_scaling == {"rope_type": "linear", "factor": 3.0}
    assert _max_diff(model, ckpt, _input_ids(model.config.vocab_size)) <= TOLERANCE


def _naive_qkv_split(model: transformers.LlamaForCausalLM, ckpt: Path) -> None:
    """Overwrite q/k/v with a contiguous ``[Q | K | V]`` split of the packed rows (thirds when G == 1)."""
    weights = _packed_weights(ckpt)
    cfg = model.config
    sizes = [cfg.num_attention_heads * cfg.head_dim] + [cfg.num_key_value_heads * cfg.head_dim] * 2
    for i, layer in enumerate(model.model.layers):
        q, k, v = weights[f"model.layers.{i}.attention.wqkv.weight"].float().split(sizes)
        attn = layer.self_attn
        for proj, value in ((attn.q_proj, q), (attn.k_proj, k), (attn.v_proj, v)):
            proj.weight.data.copy_(value)


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2)], ids=["G1", "G2"])
def test_naive_qkv_split_fails_reference(tmp_path: Path, heads: int, kv_heads: int) -> None:
    ckpt = _tiny(tmp_path, num_heads=heads, num_kv_heads=kv_heads)
    model = load_internlm2_llm(ckpt, attn_implementation="eager")
    _naive_qkv_split(model, ckpt)
    assert _max_diff(model, ckpt, _input_ids(model.config.vocab_size)) > 1e-2


def test_naive_split_coincides_with_a_single_kv_head(tmp_path: Path) -> None:
    """With one KV head the only block is [q_0 .. q_{G-1}, k_0, v_0], i.e. exactly [Q | K | V]."""
    ckpt = _tiny(tmp_path, num_heads=4, num_kv_heads=1)
    model = load_internlm2_llm(ckpt, attn_implementation="eager")
    input_ids = _input_ids(model.config.vocab_size)
    converted = _logits(model, input_ids)
    _naive_qkv_split(model, ckpt)
    assert torch.equal(_logits(model, input_ids), converted)


def test_split_wqkv_repacks_bit_exactly() -> None:
    heads, kv_heads, head_dim = 6, 3, 4
    wqkv = torch.randn((heads + 2 * kv_heads) * head_dim, 8)
    q, k, v = split_wqkv(wqkv, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)
    assert (q.shape, k.shape, v.shape) == ((24, 8), (12, 8), (12, 8))
    group = heads // kv_heads
    per_kv_head = torch.cat(
        [q.view(kv_heads, group * head_dim, 8), k.view(kv_heads, head_dim, 8), v.view(kv_heads, head_dim, 8)],
        dim=1,
    )
    assert torch.equal(per_kv_head.reshape_as(wqkv), wqkv)
    assert q.untyped_storage().data_ptr() != wqkv.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="rows"):
        split_wqkv(wqkv[:-1], num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)


def test_convert_state_dict_names_match_llama(tmp_path: Path) -> None:
    ckpt = _tiny(tmp_path, sharded=False)  # one weights file to read (the hub's two shards load below)
    config = internlm2_config_to_llama(json.loads((ckpt / "config.json").read_text()))
    stale = {"model.layers.0.attention.rotary_emb.inv_freq": torch.ones(8)}
    state_dict = load_file(ckpt / "model.safetensors") | stale
    converted = convert_internlm2_state_dict(state_dict, config)
    with torch.device("meta"):
        expected = transformers.LlamaForCausalLM(config).state_dict()
    def shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        return {name: tuple(tensor.shape) for name, tensor in tensors.items()}

    assert shapes(converted) == shapes(expected)


# ---------------------------------------------------------------- weight layouts
@pytest.mark.parametrize("layout", ["safetensors_sharded", "bin", "bin_sharded"])
def test_weight_layouts_load_identically(tmp_path: Path, layout: str) -> None:
    single = _tiny(tmp_path, "single", sharded=False)
    if layout == "safetensors_sharded":
        other = _tiny(tmp_path, "sharded")  # the hub's layout
        assert (other / "model.safetensors.index.json").is_file()
        assert not (other / "model.safetensors").exists()
    else:
        other = _as_pytorch_bin(single, tmp_path / layout, shards=1 if layout == "bin" else 3)
    reference = load_internlm2_llm(single, attn_implementation="eager")
    loaded = load_internlm2_llm(other, attn_implementation="eager")
    input_ids = _input_ids(reference.config.vocab_size)
    assert torch.equal(_logits(loaded, input_ids), _logits(reference, input_ids))


def test_bfloat16_load(tmp_path: Path) -> None:
    model = load_internlm2_llm(_tiny(tmp_path), torch_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "sdpa"
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"
    assert torch.isfinite(_logits(model, _input_ids(model.config.vocab_size)).float()).all()


# ---------------------------------------------------------------- config mapping
def test_config_fields_come_from_config_json(tmp_path: Path) -> None:
    ckpt = _tiny(tmp_path, rope_theta=12345.0, rms_norm_eps=3e-6)
    config = load_internlm2_llm(ckpt).config
    assert config.model_type == "llama"
    assert config.rope_theta == 12345.0
    assert config.rms_norm_eps == 3e-6
    assert config.rope_scaling == {"rope_type": "dynamic", "factor": 2.0}
    assert config.max_position_embeddings == MAX_POS
    assert config.attention_bias is False and config.mlp_bias is False
    assert config.architectures == ["LlamaForCausalLM"]
    assert not hasattr(config, "auto_map") and not hasattr(config, "bias")


def test_bias_true_is_refused(tmp_path: Path) -> None:
    ckpt = _tiny(tmp_path)
    _edit_config(ckpt, bias=True)
    with pytest.raises(ValueError, match="bias") as error:
        load_internlm2_llm(ckpt)
    assert str(ckpt / "config.json") in str(error.value)


@pytest.mark.parametrize("key", ["rope_theta", "rms_norm_eps", "rope_scaling", "bias"])
def test_missing_config_key_is_named(tmp_path: Path, key: str) -> None:
    ckpt = _tiny(tmp_path)
    _edit_config(ckpt, remove=key)
    with pytest.raises(ValueError, match=key) as error:
        load_internlm2_llm(ckpt)
    assert str(ckpt / "config.json") in str(error.value)


_MINIMAL_CONFIG = {
    "model_type": "internlm2",
    "vocab_size": 32,
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "hidden_act": "silu",
    "max_position_embeddings": 16,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e6,
    "bias": False,
    "tie_word_embeddings": False,
}


def test_unsupported_rope_scaling_is_refused() -> None:
    with pytest.raises(ValueError, match="yarn"):
        internlm2_config_to_llama(_MINIMAL_CONFIG | {"rope_scaling": {"type": "yarn", "factor": 2.0}})


def test_tied_word_embeddings_reuse_the_input_embedding(tmp_path: Path) -> None:
    ckpt = _tiny(tmp_path, sharded=False)  # a test that edits the one weights file
    _edit_config(ckpt, tie_word_embeddings=True)
    weights = load_file(ckpt / "model.safetensors")
    del weights["output.weight"]
    save_file(weights, ckpt / "model.safetensors")
    model = load_internlm2_llm(ckpt)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, weights["model.tok_embeddings.weight"])


# ---------------------------------------------------------------- strict loading
def test_missing_weight_is_listed(tmp_path: Path) -> None:
    ckpt = _tiny(tmp_path, sharded=False)  # a test that edits the one weights file
    weights = load_file(ckpt / "model.safetensors")
    del weights["model.layers.1.feed_forward.w3.weight"]
    save_file(weights, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_internlm2_llm(ckpt)


def test_unexpected_weight_is_listed_but_stale_rotary_cache_is_ignored(tmp_path: Path) -> None:
    ckpt = _tiny(tmp_path, sharded=False)  # a test that edits the one weights file
    weights = load_file(ckpt / "model.safetensors")
    weights["model.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(weights, ckpt / "model.safetensors")
    load_internlm2_llm(ckpt)

    weights["model.layers.0.attention.extra.weight"] = torch.ones(2)
    save_file(weights, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected.*model\.layers\.0\.attention\.extra\.weight"):
        load_internlm2_llm(ckpt)


# ---------------------------------------------------------------- convert CLI and Llama layout
def test_convert_cli_writes_llama_layout(tmp_path: Path) -> None:
    src = _tiny(tmp_path, chat=True)
    dst = tmp_path / "llama"
    assert convert_main([str(src), str(dst), "--max-shard-size", "100KB"]) == 0

    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config and "bias" not in config
    assert (dst / "model.safetensors.index.json").is_file()
    tokenizer_config = json.loads((dst / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "LlamaTokenizer" and "auto_map" not in tokenizer_config
    tokenizer = load_internlm2_tokenizer(src)
    generation = json.loads((dst / "generation_config.json").read_text())
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert generation["eos_token_id"] == tokenizer.stop_token_ids == [2, im_end]

    converted = load_internlm2_llm(dst, attn_implementation="eager")
    original = load_internlm2_llm(src, attn_implementation="eager")
    assert converted.generation_config.eos_token_id == generation["eos_token_id"]
    input_ids = _input_ids(original.config.vocab_size)
    assert torch.equal(_logits(converted, input_ids), _logits(original, input_ids))
    assert _max_diff(converted, src, input_ids) <= TOLERANCE

    # The copy's tokenizer gives the same ids, through ours and through transformers' own
    # LlamaTokenizer, which decodes the chat tokens by their texts, not as [UNUSED_TOKEN_*].
    copied = load_internlm2_tokenizer(dst)
    llama_tokenizer = transformers.LlamaTokenizer.from_pretrained(dst)
    messages = [{"role": "user", "content": "Hello 世界, a red circle."}]
    chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    for text in [chat, *TOKENIZER_TEXTS]:
        ours = tokenizer.encode(text)
        assert copied.encode(text) == ours
        assert llama_tokenizer(text)["input_ids"] == ours, text
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert llama_tokenizer.convert_ids_to_tokens([im_end, im_start]) == ["<|im_end|>", "<|im_start|>"]
    assert "[UNUSED_TOKEN" not in llama_tokenizer.decode(tokenizer.encode(chat))
