"""What the lavis-ext vs Hugging Face BLIP-2 benchmarks share: sizes, model builders, timing, FLOPs.

Both systems are built in one process with the same dimensions, random weights, frozen set
(ViT and LLM frozen; ``ln_vision``, Q-Former, query tokens and projection trainable) and
precision (CPU: fp32; CUDA: frozen parts in half precision, bf16 autocast, fp32 trainables):

- lavis-ext: ``Blip2InternLM`` from a random InternLM2-format checkpoint and tiny-format
  BERT/EVA-ViT directories (:mod:`lavis_ext.tiny`), as ``load_model`` would build it;
- HF: ``Blip2ForConditionalGeneration`` whose text model is the same LLM as a ``LlamaConfig``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import lavis_ext  # noqa: E402,F401  (patches precede any LAVIS/transformers import)
import torch  # noqa: E402
from transformers import Blip2Config, Blip2ForConditionalGeneration  # noqa: E402

from lavis_ext.constants import IGNORE_INDEX  # noqa: E402
from lavis_ext.models.blip2_models.blip2_internlm import Blip2InternLM, Blip2InternLMConfig  # noqa: E402
from lavis_ext.models.internlm2 import internlm2_config_to_llama  # noqa: E402
from lavis_ext.tiny.blip2 import make_tiny_bert, make_tiny_vit  # noqa: E402
from lavis_ext.tiny.internlm2 import (  # noqa: E402
    make_tiny_internlm2,
    random_internlm2_weights,
    write_internlm2_safetensors,
)

BENCH_DIR = Path(__file__).resolve().parent
CACHE_DIR = BENCH_DIR / ".cache"  # generated checkpoints, reused across runs (git-ignored)
SYSTEMS = ("lavis-ext", "hf")
# COCO-like captions; the tiny tokenizer is trained on them, so they take about as many tokens as with InternLM2's
CAPTIONS = (
    "a man riding a bicycle down a city street next to parked cars",
    "two people are walking along the beach at sunset",
    "a photo of a cat sitting on a sofa",
    "a red circle on a blue square",
    "the quick brown fox jumps over the lazy dog in the park",
    "a plate of food with broccoli and rice on a wooden table",
    "a group of giraffes standing in a grassy field",
    "a bus parked on the side of the road",
)


@dataclass(frozen=True)
class Dims:
    """One benchmark size: the same numbers configure both systems."""

    vit_width: int
    vit_depth: int
    vit_heads: int
    vit_mlp_ratio: float  # EVA's ratio; MLP width is int(width * ratio), as in eva_vit.Mlp
    patch: int
    image_size: int
    qformer_hidden: int
    qformer_layers: int
    qformer_heads: int
    qformer_intermediate: int
    num_query: int
    llm_hidden: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    llm_intermediate: int
    llm_vocab: int
    batch: int  # default batch size for this size
    cross_attention_freq: int = 2

    @property
    def vit_intermediate(self) -> int:
        return int(self.vit_width * self.vit_mlp_ratio)

    @property
    def vit_tokens(self) -> int:
        return (self.image_size // self.patch) ** 2 + 1


SIZES = {
    "tiny": Dims(vit_width=64, vit_depth=2, vit_heads=2, vit_mlp_ratio=4.0, patch=16, image_size=64,
                 qformer_hidden=64, qformer_layers=2, qformer_heads=2, qformer_intermediate=128, num_query=8,
                 llm_hidden=64, llm_layers=2, llm_heads=4, llm_kv_heads=2, llm_intermediate=128, llm_vocab=1024,
                 batch=4),
    # CPU default: ~100M-parameter LLM (49M in embeddings + lm_head), 6-layer ViT at 224 px
    "small": Dims(vit_width=384, vit_depth=6, vit_heads=6, vit_mlp_ratio=4.0, patch=14, image_size=224,
                  qformer_hidden=768, qformer_layers=2, qformer_heads=12, qformer_intermediate=3072, num_query=32,
                  llm_hidden=768, llm_layers=8, llm_heads=12, llm_kv_heads=4, llm_intermediate=2048,
                  llm_vocab=32000, batch=4),
    # EVA ViT-g (as BLIP-2 uses it: 39 blocks), BERT-base Q-Former, InternLM2-1.8B
    "1.8b": Dims(vit_width=1408, vit_depth=39, vit_heads=16, vit_mlp_ratio=4.3637, patch=14, image_size=224,
                 qformer_hidden=768, qformer_layers=12, qformer_heads=12, qformer_intermediate=3072, num_query=32,
                 llm_hidden=2048, llm_layers=24, llm_heads=16, llm_kv_heads=8, llm_intermediate=8192,
                 llm_vocab=92544, batch=32),
}


# --------------------------------------------------------------------------- command line and precision


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch", type=int, default=None, help="default: the size's batch")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per system before timing")
    p.add_argument("--reps", type=int, default=5, help="timed runs per system, alternating the systems")
    p.add_argument("--compile", action="store_true", help="torch.compile the ViT, Q-Former and LLM of both")
    p.add_argument("--seed", type=int, default=0)
    return p


def precision(device: torch.device):
    """bf16 autocast on CUDA (``run.amp: bf16``), plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def half_dtype(device: torch.device) -> torch.dtype:
    """The storage dtype of the frozen LLM (and HF's frozen ViT)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- checkpoints on disk


def _write_llm(dst: Path, d: Dims, dtype: torch.dtype) -> None:
    """A random InternLM2 checkpoint (hub layout) with ``d``'s LLM shapes and the tiny tokenizer.

    ``make_tiny_internlm2`` sizes the vocab to its tokenizer; we ask it for the tokenizer and
    config only (no layers), then write the real-size weights. Ids past the tokenizer's pieces
    cannot be decoded, so ``generation_config.json`` suppresses them (both systems use it).
    """
    make_tiny_internlm2(dst, hidden_size=d.llm_hidden, num_layers=0, num_heads=d.llm_heads,
                        num_kv_heads=d.llm_kv_heads, intermediate_size=d.llm_intermediate,
                        max_position_embeddings=32768, texts=CAPTIONS, dtype=dtype)
    config = json.loads((dst / "config.json").read_text())
    n_pieces = config["vocab_size"]
    config.update(vocab_size=d.llm_vocab, num_hidden_layers=d.llm_layers)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    generation = json.loads((dst / "generation_config.json").read_text())
    generation["suppress_tokens"] = list(range(n_pieces, d.llm_vocab))
    (dst / "generation_config.json").write_text(json.dumps(generation))
    weights = {name: w.to(dtype) for name, w in random_internlm2_weights(config, seed=0).items()}
    write_internlm2_safetensors(dst, weights, sharded=False)


def checkpoint_dirs(size: str, device: torch.device) -> dict[str, Path]:
    """``bert``, ``vit`` and ``llm`` directories for ``size``, made once under ``bench/.cache``."""
    d = SIZES[size]
    root = CACHE_DIR / f"{size}-{half_dtype(device)}".replace("torch.", "")
    if not (root / "done").is_file():
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        make_tiny_bert(tmp / "bert", hidden_size=d.qformer_hidden, num_layers=d.qformer_layers,
                       num_heads=d.qformer_heads, intermediate_size=d.qformer_intermediate)
        make_tiny_vit(tmp / "vit", patch_size=d.patch, embed_dim=d.vit_width, depth=d.vit_depth,
                      num_heads=d.vit_heads, mlp_ratio=d.vit_mlp_ratio)
        _write_llm(tmp / "llm", d, half_dtype(device))
        (tmp / "done").touch()
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    return {name: root / name for name in ("bert", "vit", "llm")}


# --------------------------------------------------------------------------- the two systems


def build_lavis(size: str, device: torch.device, lora_rank: int = 0) -> Blip2InternLM:
    d, dirs = SIZES[size], checkpoint_dirs(size, device)
    config = Blip2InternLMConfig(
        llm_path=str(dirs["llm"]), bert_path=str(dirs["bert"]), vit_path=str(dirs["vit"]),
        image_size=d.image_size, num_query_token=d.num_query, cross_attention_freq=d.cross_attention_freq,
        vit_precision="fp16", llm_dtype="bf16", max_txt_len=64,  # fp16/bf16 become fp32 without CUDA
        lora_rank=lora_rank)
    return Blip2InternLM(config).to(device)


def build_hf(size: str, device: torch.device, image_token_id: int) -> Blip2ForConditionalGeneration:
    """HF BLIP-2 with lavis-ext's dims; its text model is the lavis-ext LLM's own ``LlamaConfig``."""
    d, dirs = SIZES[size], checkpoint_dirs(size, device)
    text_config = internlm2_config_to_llama(json.loads((dirs["llm"] / "config.json").read_text()))
    config = Blip2Config(
        vision_config=dict(
            hidden_size=d.vit_width, intermediate_size=d.vit_intermediate, num_hidden_layers=d.vit_depth,
            num_attention_heads=d.vit_heads, image_size=d.image_size, patch_size=d.patch,
            layer_norm_eps=1e-6, qkv_bias=True),  # EVA: LayerNorm eps 1e-6, q and v biases
        qformer_config=dict(
            hidden_size=d.qformer_hidden, num_hidden_layers=d.qformer_layers,
            num_attention_heads=d.qformer_heads, intermediate_size=d.qformer_intermediate,
            cross_attention_frequency=d.cross_attention_freq, encoder_hidden_size=d.vit_width,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),  # as the lavis-ext BERT dir
        text_config=text_config.to_dict(),
        num_query_tokens=d.num_query,
        image_token_index=image_token_id,
    )
    model = Blip2ForConditionalGeneration(config)
    model.vision_model.to(half_dtype(device))
    model.language_model.to(half_dtype(device))
    # the same frozen set and dtypes as lavis-ext: ViT and LLM frozen in half precision;
    # post_layernorm is lavis-ext's ln_vision, trainable in fp32
    model.vision_model.post_layernorm.float()
    for module, trainable in ((model.vision_model, False), (model.language_model, False),
                              (model.vision_model.post_layernorm, True)):
        module.requires_grad_(trainable)
    return model.to(device)


def maybe_compile(model: torch.nn.Module, parts: tuple[str, ...], enabled: bool) -> None:
    """``torch.compile`` the named submodules in place (``--compile``)."""
    if enabled:
        for name in parts:
            model.get_submodule(name).compile()


LAVIS_PARTS = ("visual_encoder", "qformer", "llm")
HF_PARTS = ("vision_model", "qformer", "language_model")


def build_systems(args) -> tuple[Blip2InternLM, Blip2ForConditionalGeneration]:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    lavis = build_lavis(args.size, device, lora_rank=getattr(args, "lora_rank", 0))
    hf = build_hf(args.size, device, image_token_id=SIZES[args.size].llm_vocab - 1)  # never a text token
    maybe_compile(lavis, LAVIS_PARTS, args.compile)
    maybe_compile(hf, HF_PARTS, args.compile)
    return lavis, hf


def hf_text_inputs(lavis: Blip2InternLM, prompts: list[str], targets: list[str] | None, image_token_id: int,
                   device: torch.device) -> dict[str, torch.Tensor]:
    """HF inputs for the sequences lavis-ext builds: ``[image tokens][<s> prompt][target </s>]``,
    right-padded, tokenized by the same tokenizer; ``labels`` only when there are targets."""
    tok, n_query = lavis.llm_tokenizer, lavis.config.num_query_token
    rows, labels = [], []
    for i, prompt in enumerate(prompts):
        prompt_ids = [image_token_id] * n_query + tok.encode(prompt, add_special_tokens=True)
        target_ids = [] if targets is None else tok.encode(targets[i], add_special_tokens=False) + [tok.eos_token_id]
        rows.append(prompt_ids + target_ids)
        labels.append([IGNORE_INDEX] * len(prompt_ids) + target_ids)
    width = max(map(len, rows))
    pad = [[tok.pad_token_id] * (width - len(r)) for r in rows]
    inputs = {
        "input_ids": torch.tensor([r + p for r, p in zip(rows, pad)], device=device),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * len(p) for r, p in zip(rows, pad)], device=device),
    }
    if targets is not None:
        inputs["labels"] = torch.tensor([lab + [IGNORE_INDEX] * len(p) for lab, p in zip(labels, pad)], device=device)
    return inputs


def images(size: str, batch: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    d = SIZES[size]
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, d.image_size, d.image_size, generator=generator).to(device)


def captions(batch: int) -> list[str]:
    return [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]


def param_count(model: torch.nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in model.parameters() if trainable is None or p.requires_grad == trainable)


# --------------------------------------------------------------------------- timing


def warm_up(runs: dict[str, Callable[[], object]], models: dict[str, torch.nn.Module], n: int,
            device: torch.device) -> dict[str, float | None]:
    """Call each run ``n`` times (one system after the other); return each system's peak GPU
    memory in GiB: its own parameters and buffers plus the most allocated on top during its
    runs (optimizer state, gradients, activations). ``None`` on CPU."""
    peaks: dict[str, float | None] = {}
    for name, run in runs.items():
        synchronize(device)
        if device.type == "cuda":
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(n):
            run()
        synchronize(device)
        peaks[name] = None
        if device.type == "cuda":
            resident = sum(t.numel() * t.element_size()
                           for t in (*models[name].parameters(), *models[name].buffers()))
            peaks[name] = (resident + torch.cuda.max_memory_allocated(device) - before) / 2**30
    return peaks


def median_seconds(runs: dict[str, Callable[[], object]], reps: int, device: torch.device) -> dict[str, float]:
    """Median wall time of each run, alternating the runs (A B, then B A, ...) so that load
    from other processes on the machine hits both alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for _ in range(reps):
        for name in order:
            synchronize(device)
            start = time.perf_counter()
            runs[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
        order.reverse()
    return {name: statistics.median(t) for name, t in times.items()}


def describe_run(args) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True,
                            text=True).stdout.strip()
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return (f"commit {commit}, {time.strftime('%Y-%m-%d')}, {device}, torch {torch.__version__}, "
            f"size {args.size}, batch {args.batch}")


# --------------------------------------------------------------------------- FLOPs (for MFU)


def _linear(n_tokens: int, d_in: int, d_out: int) -> float:
    return 2.0 * n_tokens * d_in * d_out


def _attention(n_q: int, n_kv: int, width: int) -> float:
    """``QK^T`` and ``attn @ V`` (full, not causal-halved, as MFU conventions count it)."""
    return 2 * 2.0 * n_q * n_kv * width


def vit_flops(d: Dims) -> float:
    """Forward FLOPs of the ViT for one image."""
    n, w = d.vit_tokens, d.vit_width
    patches = _linear(n - 1, 3 * d.patch * d.patch, w)
    block = _linear(n, w, 3 * w) + _attention(n, n, w) + _linear(n, w, w) + 2 * _linear(n, w, d.vit_intermediate)
    return patches + d.vit_depth * block


def qformer_flops(d: Dims) -> float:
    """Forward FLOPs of the Q-Former's query path and the projection, for one image."""
    q, h, n = d.num_query, d.qformer_hidden, d.vit_tokens
    self_attn = _linear(q, h, 3 * h) + _attention(q, q, h) + _linear(q, h, h)
    cross_attn = _linear(q, h, h) + _linear(n, d.vit_width, 2 * h) + _attention(q, n, h) + _linear(q, h, h)
    ffn = 2 * _linear(q, h, d.qformer_intermediate)
    n_cross = len(range(0, d.qformer_layers, d.cross_attention_freq))
    return d.qformer_layers * (self_attn + ffn) + n_cross * cross_attn + _linear(q, h, d.llm_hidden)


def llm_flops(d: Dims, seq_len: int) -> float:
    """Forward FLOPs of the LLM's decoder layers for one sequence of ``seq_len`` tokens."""
    h, head_dim = d.llm_hidden, d.llm_hidden // d.llm_heads
    kv = d.llm_kv_heads * head_dim
    attn = _linear(seq_len, h, h + 2 * kv) + _attention(seq_len, seq_len, h) + _linear(seq_len, h, h)
    mlp = 3 * _linear(seq_len, h, d.llm_intermediate)
    return d.llm_layers * (attn + mlp)


def train_step_flops(d: Dims, batch: int, seq_len: int, n_targets: int) -> float:
    """Model FLOPs of one stage-2 step: frozen ViT forward; Q-Former and projection forward and
    backward (3x forward); LLM forward, plus the backward through it to its inputs, which is
    activation gradients only (no weight gradients, ~1x forward). The LM head is counted on the
    ``n_targets`` positions (whole batch) the loss needs."""
    lm_head = _linear(n_targets, d.llm_hidden, d.llm_vocab)
    return batch * (vit_flops(d) + 3 * qformer_flops(d)) + 2 * (batch * llm_flops(d, seq_len) + lm_head)
