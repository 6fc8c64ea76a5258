"""Export a trained ``blip2_internlm`` to Hugging Face ``Blip2ForConditionalGeneration``.

    python -m lavis_ext.tools.export_hf --cfg-path <yaml> --checkpoint <ckpt> --out DIR \\
        [--options model.key=value ...] [--overwrite] [--verify]

The model is built from the yaml (as training and evaluation build it: frozen ViT and LLM from
their local paths), the checkpoint's weights (``runner_ext``'s trainable weights under
``"model"``) are loaded on top, LoRA adapters are merged into the LLM, and DIR gets what
transformers 4.57 loads with no ``import lavis_ext`` and no remote code:

- ``config.json``: a ``Blip2Config`` whose ``text_config`` is the converted Llama's, with
  ``num_query_tokens`` and ``image_token_index`` (the ``<image>`` token, one id past the
  tokenizer's pieces; without it HF ignores the image);
- ``model.safetensors`` (sharded past 5 GB), float32, under transformers' BLIP-2 names
  (:data:`RENAMES`; EVA's ``q_bias``/``v_bias`` become ``qkv.bias`` with zeros for k; only the
  Q-Former's query side exists). The LLM's embedding and LM head get a zero row for
  ``<image>``, which ``generation_config.suppress_tokens`` keeps from being generated;
- ``generation_config.json``: the model's stop ids (``[</s>, <|im_end|>]`` for chat models);
- a ``Blip2Processor``: a ``BlipImageProcessor`` equal to LAVIS's ``blip_image_eval``, and the
  InternLM2 tokenizer as ``LlamaTokenizerFast`` (``tokenizer.json``, built here from the
  SentencePiece model, and checked against lavis-ext's tokenizer before anything is written)
  with ``<image>`` and the chat tokens as added special tokens, and InternLM2's chat template;
- ``README.md``: a model card.

One difference cannot be removed: LAVIS's ``ln_vision`` has eps 1e-5, but HF's
``vision_model.post_layernorm`` takes ``vision_config.layer_norm_eps``, which also drives every
ViT layer's norms (1e-6 in EVA). The export keeps the layers exact, and ``--verify`` reports
what the post-norm's eps costs.

``--verify`` runs the written directory in a fresh process with transformers alone
(``run_hf_export.py``) and compares pixels, logits, greedy captions, VQA answers and token ids
with lavis-ext on a few generated images and :data:`TOKEN_PROBES`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

import lavis_ext  # noqa: F401  (patches LAVIS, registers blip2_internlm)
from lavis.common.config import Config
from lavis.common.registry import registry
from lavis_ext.checkpoint import load_checkpoint_file, load_partial_state, model_weights, temporary_path
from lavis_ext.cli import check_model, exit_on_bad_input
from lavis_ext.errors import ConfigError
from lavis_ext.models.blip2_models.blip2_internlm import Blip2InternLM, Blip2InternLMConfig
from lavis_ext.models.blip2_models.chat_format import IMAGE_TOKEN
from lavis_ext.text import clean_answer

HF_SIDE_SCRIPT = Path(__file__).with_name("run_hf_export.py")
REPO_ROOT = Path(__file__).resolve().parents[2]  # holds `patches`, which the HF side needs (see there)
EVAL_PROCESSOR = "blip_image_eval"
LOGITS_TOLERANCE = 1e-4
HF_SIDE_TIMEOUT_S = 600

# LAVIS name (after blip2_internlm's own Qformer.bert -> qformer) -> transformers BLIP-2 name,
# as transformers' convert_blip_2_original_to_pytorch.py renames them; the first match applies.
RENAMES = (
    (r"visual_encoder\.cls_token", "vision_model.embeddings.class_embedding"),
    (r"visual_encoder\.pos_embed", "vision_model.embeddings.position_embedding"),
    (r"visual_encoder\.patch_embed\.proj\.(weight|bias)", r"vision_model.embeddings.patch_embedding.\1"),
    (r"visual_encoder\.blocks\.(\d+)\.norm([12])\.(weight|bias)", r"vision_model.encoder.layers.\1.layer_norm\2.\3"),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.qkv\.weight", r"vision_model.encoder.layers.\1.self_attn.qkv.weight"),
    (r"visual_encoder\.blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"vision_model.encoder.layers.\1.self_attn.projection.\2"),
    (r"visual_encoder\.blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"vision_model.encoder.layers.\1.mlp.\2.\3"),
    (r"ln_vision\.(weight|bias)", r"vision_model.post_layernorm.\1"),
    (r"qformer\.embeddings\.LayerNorm\.(weight|bias)", r"qformer.layernorm.\1"),
    (r"qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.(.+)", r"qformer.encoder.layer.\1.\2.attention.\3"),
    (r"qformer\.encoder\.(.+)", r"qformer.encoder.\1"),
    (r"query_tokens", "query_tokens"),
    (r"llm_proj\.(weight|bias)", r"language_projection.\1"),
    (r"llm\.(.+)", r"language_model.\1"),
)
# EVA keeps q and v biases apart (k has none); HF's qkv.bias holds [q, 0, v].
QV_BIAS = re.compile(r"visual_encoder\.blocks\.(\d+)\.attn\.(q|v)_bias")
DROPPED = ("qformer.embeddings.position_ids",)
# what the model card tells of the training run: (label, run config key)
CARD_RUN_KEYS = (("task", "task"), ("epochs", "max_epoch"), ("batch size per device", "batch_size_train"),
                 ("gradient accumulation", "accum_grad_iters"), ("learning rate", "init_lr"), ("schedule", "lr_sched"),
                 ("weight decay", "weight_decay"), ("mixed precision", "amp"))  # a buffer of the text side, which HF's query-only Q-Former lacks

# Strings whose ids must be the same from both tokenizers: English, Chinese, spaces, special
# tokens in text, bytes outside the vocabulary; then conversations through the chat template.
TOKEN_PROBES = (
    "Hello world", "a red circle on a blue square.", "The quick brown fox jumps over the lazy dog.",
    "Question: what color is the car? Answer: the car is red.", "Two people are walking along the beach at sunset.",
    "Describe the image in detail.", "it's a cat, isn't it?", "3.14159 and 42 apples; 100% sure!",
    "你好，世界！", "一只红色的圆形在蓝色的方块上。", "图片里有一只猫和一只狗在草地上玩耍。", "请详细描述这张图片。",
    "中英混合 mixed 文本 text", " leading space", "trailing space ", "two  spaces", "   three leading",
    "tab\tseparated", "line one\nline two", "\n\nnewlines first", "", " ", "emoji 🙂 and ümlauts",
    "<s>bos in text", "a</s>b", "<|im_start|>user\nhi<|im_end|>\n", "text<|im_end|>more text",
    "<|action_start|><|plugin|>tool<|action_end|>", "<|interpreter|> code", "<unk> unknown",
    "a photo of", Blip2InternLMConfig.qa_prompt.format("how many circles are there?"),
)
CHAT_PROBES = (
    [{"role": "user", "content": "What is in the image?"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "描述这张图片。"}],
    [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": "two"},
     {"role": "user", "content": " and colours? "}],
)


# --------------------------------------------------------------------------- building the model


def model_config(cfg_path: str, options: list[str]):
    """The yaml's model config with ``--options model.<key>=value`` applied: keys of
    ``Blip2InternLMConfig``, the model type, and the stage-1/2 weights loaded before the checkpoint."""
    known = {f.name for f in fields(Blip2InternLMConfig)} | {"model_type", "pretrained", "load_pretrained"}
    for option in options:
        key = option.split("=", 1)[0]
        if "=" not in option or not key.startswith("model.") or key[len("model."):] not in known:
            raise ConfigError(f"--options {option!r}: expected model.<key>=value with a key of blip2_internlm "
                              f"({sorted(known)})")
    check_model(cfg_path, options)
    project = OmegaConf.merge(OmegaConf.load(cfg_path), OmegaConf.from_dotlist(options))
    return Config.build_model_config(project).model


def build_model(cfg, cfg_path: str, checkpoint: str) -> tuple[Blip2InternLM, dict]:
    """The model of ``cfg`` (:func:`model_config` of ``cfg_path``) with ``checkpoint`` loaded, in
    eval mode; and the checkpoint's training config (``{}`` if it has none). Parameters the
    checkpoint lacks must be frozen ones."""
    model_cls = registry.get_model_class(cfg.arch)
    if model_cls is not Blip2InternLM:
        raise ConfigError(f"model.arch = {cfg.arch!r} ({cfg_path}): export_hf exports blip2_internlm models")
    cfg.load_finetuned = False  # the weights to export are --checkpoint's, loaded below
    saved = load_checkpoint_file(checkpoint, "--checkpoint")  # a bad file fails before anything is built
    state_dict = model_weights(saved, "--checkpoint", checkpoint)
    model = model_cls.from_config(cfg)
    load_partial_state(model, state_dict, f"--checkpoint = {checkpoint} (with the model of {cfg_path})")
    training_config = saved.get("config") if isinstance(saved.get("config"), dict) else {}
    return model.eval(), training_config


# --------------------------------------------------------------------------- config and weights


def image_token_id(model: Blip2InternLM) -> int:
    """``<image>``'s id: the first id after the tokenizer's pieces."""
    return len(model.llm_tokenizer)


def vision_config(model: Blip2InternLM) -> dict:
    vit = model.visual_encoder
    if not hasattr(vit, "blocks"):
        raise ConfigError(f"model.vit_model = {model.config.vit_model!r}: HF BLIP-2's vision model is EVA-ViT "
                          f"(eva_clip_g); other encoders cannot be exported")
    block = vit.blocks[0]
    return {
        "hidden_size": vit.embed_dim,
        "intermediate_size": block.mlp.fc1.out_features,
        "num_hidden_layers": len(vit.blocks),
        "num_attention_heads": block.attn.num_heads,
        "image_size": model.config.image_size,
        "patch_size": vit.patch_embed.patch_size[0],
        "hidden_act": "gelu",  # EVA's MLP uses nn.GELU (exact)
        "layer_norm_eps": block.norm1.eps,  # exact for every layer; post_layernorm shares it (module doc)
        "attention_dropout": 0.0,
        "qkv_bias": True,
    }


def qformer_config(model: Blip2InternLM) -> dict:
    bert = model.qformer.config
    return {
        "vocab_size": bert.vocab_size,
        "hidden_size": bert.hidden_size,
        "num_hidden_layers": bert.num_hidden_layers,
        "num_attention_heads": bert.num_attention_heads,
        "intermediate_size": bert.intermediate_size,
        "hidden_act": bert.hidden_act,
        "hidden_dropout_prob": bert.hidden_dropout_prob,
        "attention_probs_dropout_prob": bert.attention_probs_dropout_prob,
        "max_position_embeddings": bert.max_position_embeddings,
        "initializer_range": bert.initializer_range,
        "layer_norm_eps": bert.layer_norm_eps,
        "pad_token_id": bert.pad_token_id,
        "cross_attention_frequency": bert.cross_attention_freq,
        "encoder_hidden_size": model.visual_encoder.embed_dim,
        "use_qformer_text_input": False,
    }


def hf_config(model: Blip2InternLM, llm):
    """``Blip2Config`` of the export; ``llm`` is the (merged) ``LlamaForCausalLM``."""
    from transformers import Blip2Config

    text = llm.config.to_dict()
    text.pop("_name_or_path", None)  # a local path of the exporting machine
    text["vocab_size"] = max(llm.get_input_embeddings().num_embeddings, image_token_id(model) + 1)
    text["dtype"] = "float32"
    config = Blip2Config(vision_config=vision_config(model), qformer_config=qformer_config(model), text_config=text,
                         num_query_tokens=model.config.num_query_token, image_token_index=image_token_id(model))
    config.dtype = torch.float32
    return config


def hf_state_dict(model: Blip2InternLM, llm, vocab_size: int) -> dict[str, torch.Tensor]:
    """The weights under transformers' BLIP-2 names, float32 (:data:`RENAMES`); the LLM's
    embedding and head padded with zero rows to ``vocab_size``. Raises on a key no rule covers."""
    source = {k: v for k, v in model.state_dict().items() if not k.startswith("llm.") and k not in DROPPED}
    source.update({f"llm.{k}": v for k, v in llm.state_dict().items()})
    out: dict[str, torch.Tensor] = {}
    biases: dict[str, dict[str, torch.Tensor]] = {}
    unmapped = []
    for key, tensor in source.items():
        qv = QV_BIAS.fullmatch(key)
        if qv:
            biases.setdefault(qv.group(1), {})[qv.group(2)] = tensor
            continue
        for pattern, replacement in RENAMES:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, replacement, key)] = tensor.float()
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ConfigError(f"the model has weights that HF BLIP-2 has no place for: {unmapped[:8]} (e.g. an EVA-ViT "
                          f"with relative position bias or layer scale, set by model.vit_path's config.json)")
    for layer, bias in biases.items():
        q, v = bias["q"].float(), bias["v"].float()
        out[f"vision_model.encoder.layers.{layer}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    for name in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        if name in out and out[name].shape[0] < vocab_size:
            rows = out[name]
            out[name] = torch.cat([rows, rows.new_zeros(vocab_size - rows.shape[0], rows.shape[1])])
    return out


def check_keys(config, state_dict: dict[str, torch.Tensor]) -> None:
    """``state_dict`` has exactly the keys and shapes of ``Blip2ForConditionalGeneration(config)``."""
    from transformers import Blip2ForConditionalGeneration

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Blip2ForConditionalGeneration(config).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    shapes = [f"{k}: {got[k]} != {expected[k]}" for k in sorted(set(got) & set(expected)) if got[k] != expected[k]]
    if missing or extra or shapes:
        raise ConfigError(f"the exported weights do not fit Blip2ForConditionalGeneration: missing {missing[:8]}, "
                          f"unexpected {extra[:8]}, shapes {shapes[:8]}")


def generation_config(model: Blip2InternLM):
    from transformers import GenerationConfig

    tokenizer = model.llm_tokenizer
    stops = model.stop_token_ids
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=stops if len(stops) > 1 else stops[0],
                            pad_token_id=tokenizer.pad_token_id, suppress_tokens=[image_token_id(model)],
                            max_new_tokens=30)  # LAVIS's caption length; HF's max_length would count the image tokens


# --------------------------------------------------------------------------- processor


def fast_tokenizer(model: Blip2InternLM):
    """``tokenizers.Tokenizer`` equal to the SentencePiece model under LlamaTokenizer's legacy
    rules (what transformers' LlamaConverter builds, which needs protobuf): BPE with byte
    fallback, a ``▁`` prepended to each chunk between added tokens, spaces as ``▁``. The added
    tokens (``<s>``..., the chat tokens, whose pieces are placeholders) take their ids' vocab slots;
    ``<image>`` comes after the pieces."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    tokenizer = model.llm_tokenizer
    sp = tokenizer.sp
    scores = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    _, merges = SentencePieceExtractor(str(tokenizer.model_file)).extract(scores)
    pieces = [piece for piece, _ in scores]
    for text, token_id in tokenizer.added_tokens.items():
        pieces[token_id] = text
    vocab = {piece: i for i, piece in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise ConfigError(f"{tokenizer.model_file}: an added token's text is also another piece of the vocabulary")
    merges = [(a, b) for a, b in merges if a in vocab and b in vocab and a + b in vocab]
    fast = Tokenizer(BPE(vocab, merges, unk_token=tokenizer.unk_token, fuse_unk=True, byte_fallback=True))
    fast.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    fast.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    if tokenizer.add_bos_token:
        bos = tokenizer.bos_token
        fast.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                            special_tokens=[(bos, tokenizer.bos_token_id)])
    specials = set(tokenizer.special_token_ids.values())
    added = sorted(tokenizer.added_tokens.items(), key=lambda item: item[1]) + [(IMAGE_TOKEN, image_token_id(model))]
    fast.add_tokens([AddedToken(text, special=token_id in specials or text == IMAGE_TOKEN, normalized=False)
                     for text, token_id in added])
    wrong = {text: fast.token_to_id(text) for text, token_id in added if fast.token_to_id(text) != token_id}
    if wrong:
        raise ConfigError(f"{tokenizer.model_file}: added tokens got ids {wrong} in tokenizer.json")
    return fast


def write_tokenizer_files(model: Blip2InternLM, directory: Path) -> None:
    """lavis-ext's ``save_pretrained`` files plus ``tokenizer.json``, with ``<image>`` declared.

    ``clean_up_tokenization_spaces`` is on: InternLM2's tokenizer always cleans up on decode.
    """
    model.llm_tokenizer.save_pretrained(directory)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["added_tokens_decoder"][str(image_token_id(model))] = {
        "content": IMAGE_TOKEN, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
        "special": True}
    config["clean_up_tokenization_spaces"] = True
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    fast_tokenizer(model).save(str(directory / "tokenizer.json"))


def lavis_token_ids(tokenizer, probes: list[dict]) -> list[list[int]]:
    """lavis-ext's ids of each probe: ``{"text"}`` with bos, ``{"messages"}`` through the chat template."""
    return [tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=True)
            if "messages" in p else tokenizer.encode(p["text"]) for p in probes]


def token_probes() -> list[dict]:
    return [{"text": text} for text in TOKEN_PROBES] + [{"messages": m} for m in CHAT_PROBES]


def probe_mismatches(probes: list[dict], expected: list[list[int]], got: list[list[int]]) -> list[str]:
    return [f"{probe}: lavis-ext {e} vs HF {g}" for probe, e, g in zip(probes, expected, got, strict=True) if e != g]


def eval_image_processor(model: Blip2InternLM, cfg):
    """LAVIS's eval image processor of the model type (``preprocess.vis_processor.eval``) and the
    equal ``BlipImageProcessor``: resize to a square with PIL's bicubic, scale to [0, 1], normalise."""
    from transformers import BlipImageProcessor
    from transformers.image_utils import PILImageResampling

    defaults = OmegaConf.load(Blip2InternLM.default_config_path(cfg.model_type))
    eval_cfg = OmegaConf.select(defaults, "preprocess.vis_processor.eval")
    if eval_cfg is None or eval_cfg.get("name") != EVAL_PROCESSOR:
        raise ConfigError(f"{Blip2InternLM.default_config_path(cfg.model_type)}: preprocess.vis_processor.eval must "
                          f"be {EVAL_PROCESSOR} (the processor BlipImageProcessor reproduces)")
    if int(eval_cfg.image_size) != model.config.image_size:
        raise ConfigError(f"preprocess.vis_processor.eval.image_size = {eval_cfg.image_size} of model type "
                          f"{cfg.model_type}, but model.image_size = {model.config.image_size}")
    lavis = registry.get_processor_class(EVAL_PROCESSOR).from_config(eval_cfg)
    size = model.config.image_size
    hf = BlipImageProcessor(size={"height": size, "width": size}, resample=PILImageResampling.BICUBIC,
                            image_mean=list(lavis.normalize.mean), image_std=list(lavis.normalize.std),
                            do_convert_rgb=True)
    return lavis, hf


# --------------------------------------------------------------------------- model card


def model_card(model: Blip2InternLM, training_config: dict, checkpoint: str, name: str) -> str:
    """``README.md`` of the export ``name``: what it is, how it was trained (the checkpoint's
    ``run``/``datasets`` config and the model's freezing and LoRA), the prompt format and a code sample."""
    cfg = model.config
    n = cfg.num_query_token
    run = training_config.get("run", {})
    trained = [f"- checkpoint `{Path(checkpoint).name}`"]
    if training_config.get("datasets"):
        trained.append(f"- datasets: {', '.join(f'`{d}`' for d in sorted(training_config['datasets']))}")
    trained += [f"- {label}: `{run[key]}`" for label, key in CARD_RUN_KEYS if key in run]
    if not run:
        trained.append("- the checkpoint records no training config")
    frozen = [part for part, flag in (("ViT", cfg.freeze_vit), ("LLM", cfg.freeze_llm), ("Q-Former", cfg.freeze_qformer))
              if flag]
    trained.append(f"- frozen: {', '.join(frozen) or 'nothing'}")
    if cfg.lora_rank:
        trained.append(f"- LoRA rank {cfg.lora_rank} (alpha {cfg.lora_alpha}) on {', '.join(cfg.lora_target_modules)}, "
                       f"merged into the LLM's weights")
    question = cfg.qa_prompt.format("What is in the image?")
    captions = f"Captions follow the prompt {cfg.prompt!r}; questions are asked as `{cfg.qa_prompt}`"
    if cfg.use_chat_template:
        prompt = (f"{captions}; both as a user turn in InternLM2's chat template (`processor.tokenizer.apply_chat_template`, which "
                  f"writes the bos itself, hence `add_special_tokens=False`); answers end at `<|im_end|>`.")
        vqa = ('text = processor.tokenizer.apply_chat_template(\n'
               f'    [{{"role": "user", "content": {question!r}}}], add_generation_prompt=True, tokenize=False)\n'
               'inputs = processor(images=image, text=text, add_special_tokens=False, return_tensors="pt")')
    else:
        prompt = f"{captions}."
        vqa = f'inputs = processor(images=image, text={question!r}, return_tensors="pt")'
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [blip-2, internlm2]
---
# BLIP-2 with InternLM2 ({Path(cfg.llm_path).name})

BLIP-2 (EVA-ViT, Q-Former with {n} queries, linear projection) in front of an InternLM2 language model
(converted to Llama; no remote code), trained with lavis-ext and exported to `Blip2ForConditionalGeneration`.

## Training
{chr(10).join(trained)}

## Prompt format
The processor puts {n} `<image>` tokens (id {image_token_id(model)}) before `<s>` and the prompt; the model puts
the {n} image embeddings there. {prompt} A prompt may instead place the image inside the text: write
`<image>` {n} times there and call `processor.tokenizer` and `processor.image_processor` separately.

## Use
```python
import torch
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Processor

model = Blip2ForConditionalGeneration.from_pretrained("{name}", dtype=torch.float32)
processor = Blip2Processor.from_pretrained("{name}")
image = Image.open("photo.jpg").convert("RGB")
{vqa}
out = model.generate(**inputs, num_beams=1, max_new_tokens=30)
print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
`generate` returns the prompt (image tokens included) before the new tokens, hence the slice. Stop ids are
in `generation_config.json`; `<image>` is never generated (`suppress_tokens`).

## Differences from lavis-ext
HF's vision post-layernorm uses the ViT layers' eps (1e-6) where LAVIS's `ln_vision` used 1e-5.
"""


# --------------------------------------------------------------------------- export


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` without ``overwrite``, and with it anything but an earlier export."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    if any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"--out {out}: exists and is not empty (pass --overwrite to replace an earlier export)")
        if not (out / "config.json").is_file():
            raise ConfigError(f"--out {out}: --overwrite replaces only an earlier export (it has config.json); "
                              f"this directory has none, so it is left alone")


def export(model: Blip2InternLM, out: Path, training_config: dict, checkpoint: str, image_processor) -> None:
    """Write the export to ``out`` (module doc). It is prepared beside ``out`` and renamed onto it
    at the end, so a failure leaves no half-written directory; an earlier ``out`` is replaced."""
    from huggingface_hub import save_torch_state_dict
    from transformers import AutoTokenizer, Blip2Processor

    llm = model.llm.merge_and_unload() if model.config.lora_rank else model.llm
    config = hf_config(model, llm)
    state_dict = hf_state_dict(model, llm, config.text_config.vocab_size)
    check_keys(config, state_dict)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_path(out, str(os.getpid()))
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write_tokenizer_files(model, staging)  # the processor rewrites them below, as transformers writes them
        tokenizer = AutoTokenizer.from_pretrained(staging)
        probes = token_probes()
        mismatches = probe_mismatches(probes, lavis_token_ids(model.llm_tokenizer, probes),
                                      [hf_probe_ids(tokenizer, p) for p in probes])
        if mismatches:
            raise ConfigError(f"{model.llm_tokenizer.model_file}: the exported tokenizer gives other ids than "
                              f"lavis-ext's: {mismatches[:3]}")
        processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=model.config.num_query_token,
                                   chat_template=tokenizer.chat_template)
        if processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != config.image_token_index:
            raise ConfigError(f"the processor's {IMAGE_TOKEN} id is not image_token_index {config.image_token_index}")
        processor.save_pretrained(staging)
        config.save_pretrained(staging)
        generation_config(model).save_pretrained(staging)
        save_torch_state_dict(state_dict, staging)
        (staging / "README.md").write_text(model_card(model, training_config, checkpoint, out.name),
                                            encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def hf_probe_ids(tokenizer, probe: dict) -> list[int]:
    """A transformers tokenizer's ids of a probe, as :func:`lavis_token_ids` takes them."""
    if "messages" in probe:
        return tokenizer.apply_chat_template(probe["messages"], add_generation_prompt=True, tokenize=True)
    return tokenizer(probe["text"])["input_ids"]


# --------------------------------------------------------------------------- verification


@dataclass
class VerifyReport:
    """lavis-ext vs the export run by transformers alone; ``ok`` when every check holds."""

    pixel_max_diff: float
    logits_max_diff: float  # over the lavis-ext vocabulary; the <image> column only exists in HF
    logits_max_diff_same_eps: float  # against lavis-ext with ln_vision's eps set to HF's
    eps_cost: float  # lavis-ext's own logits, eps 1e-5 vs HF's eps
    captions: list[tuple[str, str]]  # greedy: lavis-ext's, and HF's ids as lavis-ext's tokenizer decodes them
    answers: list[tuple[str, str]]
    hf_decode_mismatches: list[str]  # HF's own decode of generated ids, where it differs (not on invalid UTF-8)
    invalid_utf8_rows: int  # generated rows with byte pieces that are not UTF-8 (decoded differently, see there)
    token_mismatches: list[str]
    decode_mismatches: list[str]
    probes: int
    imported: list[str]  # lavis_ext / lavis modules in the HF process (must be none)
    logit_cases: int

    @property
    def ok(self) -> bool:
        return (self.pixel_max_diff == 0.0 and self.logits_max_diff <= LOGITS_TOLERANCE
                and all(a == b for a, b in self.captions + self.answers) and not self.hf_decode_mismatches
                and not self.token_mismatches and not self.decode_mismatches and not self.imported)

    def format(self) -> str:
        lines = [f"pixel values: max |diff| {self.pixel_max_diff:.3g}",
                 (f"logits ({self.logit_cases} cases): max |diff| {self.logits_max_diff:.3g} (limit "
                  f"{LOGITS_TOLERANCE:g}); {self.logits_max_diff_same_eps:.3g} against lavis-ext with HF's "
                  f"post-layernorm eps; that eps alone moves lavis-ext's logits by {self.eps_cost:.3g}")]
        for kind, pairs in (("caption", self.captions), ("answer", self.answers)):
            for lavis_text, hf_text in pairs:
                lines.append(f"{kind}: {'same' if lavis_text == hf_text else 'DIFFERENT'}: "
                             f"lavis-ext {lavis_text!r}" + ("" if lavis_text == hf_text else f" | HF {hf_text!r}"))
        if self.invalid_utf8_rows:
            lines.append(f"{self.invalid_utf8_rows} generated rows hold byte pieces that are not UTF-8: HF's fast "
                         f"tokenizer decodes such a run as one U+FFFD per byte, SentencePiece keeps its valid bytes")
        lines += [f"HF decode: {m}" for m in self.hf_decode_mismatches]
        lines.append(f"tokenizer: {self.probes - len(self.token_mismatches)}/{self.probes} probes give the same ids, "
                     f"{self.probes - len(self.decode_mismatches)}/{self.probes} decode the same")
        lines += [f"  {m}" for m in self.token_mismatches + self.decode_mismatches]
        if self.imported:
            lines.append(f"the HF process imported {self.imported}")
        lines.append("verify: OK" if self.ok else "verify: DIFFERENCES")
        return "\n".join(lines)


def verify_images(directory: Path) -> list[Path]:
    """Three RGB images of different sizes and shapes (noise, a gradient, blocks), as PNG files."""
    rng = np.random.default_rng(0)
    gradient = np.stack([*np.meshgrid(np.linspace(0, 255, 120), np.linspace(0, 255, 90)), np.full((90, 120), 128.0)], -1)
    blocks = np.kron(rng.integers(0, 256, (5, 3, 3)), np.ones((40, 40, 1)))
    arrays = [rng.integers(0, 256, (200, 300, 3)), gradient, blocks]
    paths = []
    for i, array in enumerate(arrays):
        paths.append(directory / f"image{i}.png")
        Image.fromarray(array.astype(np.uint8)).save(paths[-1])
    return paths


def verify_cases(model: Blip2InternLM, export_dir: Path, image_files: list[Path]) -> dict:
    cfg = model.config
    front = [cfg.prompt, "a photo of", cfg.qa_prompt.format("how many circles are there?")]
    inline = "<|im_start|>user\n<image>\nWhat is in the image?<|im_end|>\n<|im_start|>assistant\n"
    logit_cases = [{"image": i % len(image_files), "text": text, "layout": "front"} for i, text in enumerate(front)]
    logit_cases.append({"image": 1, "text": inline, "layout": "inline"})
    return {
        "export_dir": str(export_dir),
        "images": [str(p) for p in image_files],
        "logit_cases": logit_cases,
        # as Blip2InternLM lays them out: captions after model.prompt, questions in model.qa_prompt,
        # both inside the chat template for chat models
        "captions": {"items": [[i, cfg.prompt] for i in range(len(image_files))], "template": "{}",
                     "chat": cfg.use_chat_template, "max_new_tokens": 8},
        "answers": {"items": [[0, "what colour is it?"], [1, "how many squares are there in the picture?"],
                              [2, "是什么？"]],
                    "template": cfg.qa_prompt, "chat": cfg.use_chat_template, "max_new_tokens": 6},
        "token_probes": token_probes(),
    }


@torch.no_grad()
def lavis_reference(model: Blip2InternLM, cases: dict, lavis_processor, eps: float | None = None) -> dict:
    """lavis-ext's pixels, logits, captions and answers for ``cases`` (logits with ``ln_vision.eps``
    set to ``eps`` when given)."""
    images = [lavis_processor(Image.open(p).convert("RGB")) for p in cases["images"]]
    saved_eps = model.ln_vision.eps
    model.ln_vision.eps = saved_eps if eps is None else eps
    try:
        logits = []
        for case in cases["logit_cases"]:
            query_embeds = model.encode_images(images[case["image"]][None])
            inputs_embeds, attention_mask, _ = model.build_llm_inputs(query_embeds, [case["text"]])
            logits.append(model.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits[0].float())
    finally:
        model.ln_vision.eps = saved_eps
    if eps is not None:
        return {"logits": logits}
    caption, vqa = cases["captions"], cases["answers"]
    captions = model.generate({"image": torch.stack([images[i] for i, _ in caption["items"]]),
                               "prompt": [text for _, text in caption["items"]]},
                              num_beams=1, max_length=caption["max_new_tokens"], min_length=1)
    answers = model.predict_answers({"image": torch.stack([images[i] for i, _ in vqa["items"]]),
                                     "text_input": [text for _, text in vqa["items"]]},
                                    num_beams=1, max_len=vqa["max_new_tokens"], min_len=1, prompt=vqa["template"])
    return {"pixels": images, "logits": logits, "captions": captions, "answers": answers}


def run_hf_side(cases: dict, work: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """:data:`HF_SIDE_SCRIPT` on ``cases`` in a fresh process; its results and tensors."""
    from safetensors.torch import load_file

    cases_file = work / "cases.json"
    cases_file.write_text(json.dumps(cases, ensure_ascii=False), encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, str(HF_SIDE_SCRIPT), str(cases_file), str(work)], env=env, cwd=work,
                          capture_output=True, text=True, timeout=HF_SIDE_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"loading {cases['export_dir']} with transformers alone failed:\n{done.stderr[-4000:]}")
    return json.loads((work / "results.json").read_text(encoding="utf-8")), load_file(str(work / "tensors.safetensors"))


def has_invalid_utf8(tokenizer, ids: list[int]) -> bool:
    """Whether ``ids`` hold a run of byte pieces (``<0xNN>``, SentencePiece's byte fallback) that is not UTF-8."""
    sp, run = tokenizer.sp, bytearray()
    for token_id in [*ids, None]:
        if token_id is not None and token_id < sp.get_piece_size() and sp.is_byte(token_id):
            run.append(int(sp.id_to_piece(token_id)[3:5], 16))
            continue
        try:
            run.decode("utf-8")
        except UnicodeDecodeError:
            return True
        run.clear()
    return False


def compare(model: Blip2InternLM, cases: dict, reference: dict, same_eps: dict, hf: dict,
            tensors: dict[str, torch.Tensor]) -> VerifyReport:
    vocab = len(model.llm_tokenizer)
    pixel = max(float((tensors[f"pixel_values.{i}"] - p).abs().max()) for i, p in enumerate(reference["pixels"]))

    def max_logit_diff(logits: list[torch.Tensor]) -> float:
        """Over all cases; infinite where the sequences differ in length (the tokenizers disagree)."""
        hf_logits = [tensors[f"logits.{j}"][:, :vocab] for j in range(len(logits))]
        return max(float((h - x).abs().max()) if h.shape == x.shape else float("inf")
                   for h, x in zip(hf_logits, logits))

    tokenizer = model.llm_tokenizer
    generated = hf["captions"] + hf["answers"]
    invalid_utf8 = [row for row in generated if has_invalid_utf8(tokenizer, row["ids"])]
    probes = cases["token_probes"]
    expected = lavis_token_ids(tokenizer, probes)
    decoded = [tokenizer.decode(ids, skip_special_tokens=True) for ids in expected]
    decode_mismatches = [f"{p}: lavis-ext {a!r} vs HF {b!r}" for p, a, b in zip(probes, decoded, hf["decoded"])
                         if a != b]
    return VerifyReport(
        pixel_max_diff=pixel,
        logits_max_diff=max_logit_diff(reference["logits"]),
        logits_max_diff_same_eps=max_logit_diff(same_eps["logits"]),
        eps_cost=max(float((a - b).abs().max()) for a, b in zip(reference["logits"], same_eps["logits"])),
        captions=list(zip(reference["captions"], [clean_answer(tokenizer.decode(c["ids"], skip_special_tokens=True))
                                                  for c in hf["captions"]])),
        answers=list(zip(reference["answers"], [clean_answer(tokenizer.decode(a["ids"], skip_special_tokens=True))
                                                for a in hf["answers"]])),
        hf_decode_mismatches=[f"{row['ids']}: lavis-ext {tokenizer.decode(row['ids'], skip_special_tokens=True)!r} vs "
                              f"HF {row['text']!r}" for row in generated if row not in invalid_utf8
                              and tokenizer.decode(row["ids"], skip_special_tokens=True) != row["text"]],
        invalid_utf8_rows=len(invalid_utf8),
        token_mismatches=probe_mismatches(probes, expected, hf["token_ids"]),
        decode_mismatches=decode_mismatches,
        probes=len(probes),
        imported=hf["imported"],
        logit_cases=len(cases["logit_cases"]),
    )


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Export a blip2_internlm checkpoint to HF Blip2ForConditionalGeneration")
    parser.add_argument("--cfg-path", required=True, help="the yaml the model was trained or evaluated with")
    parser.add_argument("--checkpoint", required=True, help="runner_ext checkpoint (trainable weights under 'model')")
    parser.add_argument("--out", required=True, type=Path, help="directory to write (must be empty or absent)")
    parser.add_argument("--options", nargs="+", default=[], help="model.<key>=value overrides of the yaml")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    parser.add_argument("--verify", action="store_true",
                        help="load the export with transformers alone in a fresh process and compare with lavis-ext")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> VerifyReport | None:
    out = args.out.expanduser().absolute()
    prepare_out_dir(out, args.overwrite)
    cfg = model_config(args.cfg_path, args.options)
    model, training_config = build_model(cfg, args.cfg_path, args.checkpoint)
    lavis_processor, hf_processor = eval_image_processor(model, cfg)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        if args.verify:  # references first: the export merges LoRA into the model's LLM
            cases = verify_cases(model, out, verify_images(work))
            reference = lavis_reference(model, cases, lavis_processor)
            same_eps = lavis_reference(model, cases, lavis_processor, eps=vision_config(model)["layer_norm_eps"])
        export(model, out, training_config, args.checkpoint, hf_processor)
        print(f"wrote {out}")
        if not args.verify:
            return None
        report = compare(model, cases, reference, same_eps, *run_hf_side(cases, work))
    print(report.format())
    return report


def main(argv: list[str] | None = None) -> VerifyReport | None:
    """:func:`run`; bad input ends in one line, ``error: <message>``, and exit code 2, and a
    failed ``--verify`` in exit code 1."""
    report = exit_on_bad_input(lambda a: run(parse_args(a)), argv)
    if report is not None and not report.ok:
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
