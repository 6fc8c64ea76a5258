"""Stage 0 of the demo: a tiny InternLM2 that already speaks the synthetic world's language.

Text only. Each example is laid out as stage 2 lays out an image (``Blip2InternLM.build_llm_inputs``):
``[context][<s> prompt][target </s>]``, where the true caption stands in for the query embeddings
as ``context``, and the loss covers ``target </s>`` only:

- captioning: prompt ``""``, target the caption (the model learns to read the context out);
- Chinese captioning: the same English caption as context (stage 2's queries do not depend on the
  language asked for), prompt ``一张图片的描述：``, target the Chinese caption;
- VQA: prompt ``qa_prompt.format(question)``, target the short answer;
- with ``chat`` (the demo's ``--instruct``), also conversations (:func:`chat_rows`): the world's
  LLaVA-format conversations in InternLM2's chat template, as stage 3 encodes them (:class:`~lavis_ext.models.blip2_models.chat_format.ChatFormat`,
  loss on the answers and their ``<|im_end|>``), the caption in place of the queries. A chat LLM
  knows its template before instruction tuning, as InternLM2-Chat does; LoRA in stage 3 leaves the
  embeddings of ``<|im_start|>``/``<|im_end|>`` frozen, so they must mean something already.

Stage 2 then keeps this LLM frozen and teaches the Q-Former to produce a context it can read.
The result is written in InternLM2's hub layout (remote-code ``config.json``, packed
``attention.wqkv``, ``tokenizer.model`` trained on the world's text) by
:func:`~lavis_ext.tiny.internlm2.make_tiny_internlm2` plus :func:`save_internlm2_weights`, and
loads back through :func:`~lavis_ext.models.internlm2.load_internlm2_llm` like a real checkpoint.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import torch
from einops import rearrange
from tqdm import tqdm
from transformers import LlamaForCausalLM

from lavis_ext.constants import IGNORE_INDEX
from lavis_ext.datasets.base import AnnSource
from lavis_ext.datasets.conversation import parse_record
from lavis_ext.models.blip2_models.chat_format import IMAGE_TOKEN, ChatFormat
from lavis_ext.demo.world import read_world_file
from lavis_ext.models.blip2_models.blip2_internlm import Blip2InternLMConfig
from lavis_ext.models.internlm2 import load_internlm2_llm, load_internlm2_tokenizer
from lavis_ext.models.internlm2.conversion import LAYER_NAMES, TOP_LEVEL_NAMES
from lavis_ext.text_zh import CAPTION_PROMPT_ZH
from lavis_ext.tiny.internlm2 import make_tiny_internlm2, write_internlm2_safetensors

QA_PROMPT = Blip2InternLMConfig.qa_prompt  # the question prompt stage 2 asks with
# 512 pieces: 256 of them are byte pieces, and the rest must hold the Chinese characters as well as
# English words (with 384, examples were 37 tokens long on average, 23 with 512)
LLM_SIZES = {"vocab_size": 512, "hidden_size": 128, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
             "intermediate_size": 256, "max_position_embeddings": 128}


def pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_heads: int, num_kv_heads: int,
              head_dim: int) -> torch.Tensor:
    """Inverse of :func:`~lavis_ext.models.internlm2.conversion.split_wqkv`: q ``[H·D, hidden]``,
    k and v ``[KV·D, hidden]`` -> packed ``[(H + 2·KV)·D, hidden]``, each KV head's block holding
    its ``H/KV`` query heads, then its key, then its value."""
    group = num_heads // num_kv_heads
    q = rearrange(q, "(h g d) dim -> h g d dim", g=group, d=head_dim)
    k, v = (rearrange(t, "(h d) dim -> h 1 d dim", d=head_dim) for t in (k, v))
    return rearrange(torch.cat([q, k, v], dim=1), "h gs d dim -> (h gs d) dim").contiguous()


def llama_to_internlm2_state_dict(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """A converted model's weights back under InternLM2's names, with ``wqkv`` packed."""
    config = model.config
    top_level = {llama: internlm2 for internlm2, llama in TOP_LEVEL_NAMES.items()}
    layer_names = {llama: internlm2 for internlm2, llama in LAYER_NAMES.items()}
    state = {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()}
    weights = {top_level[name]: state.pop(name) for name in list(state) if name in top_level}
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        q, k, v = (state.pop(f"{prefix}self_attn.{p}_proj.weight") for p in "qkv")
        weights[prefix + "attention.wqkv.weight"] = pack_wqkv(
            q, k, v, num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim)
        for llama, internlm2 in layer_names.items():
            weights[prefix + internlm2] = state.pop(prefix + llama)
    if state:
        raise ValueError(f"llama_to_internlm2_state_dict: no InternLM2 name for {sorted(state)}")
    return weights


def save_internlm2_weights(model: LlamaForCausalLM, dst: str | Path) -> Path:
    """Write the weights into ``dst`` in InternLM2's layout (two shards and their index; the rest
    of the directory is kept), and check that :func:`load_internlm2_llm` reads back a model with
    the same logits."""
    path = Path(dst)
    write_internlm2_safetensors(path, llama_to_internlm2_state_dict(model), sharded=True)
    probe = torch.arange(min(16, model.config.vocab_size)).unsqueeze(0)
    with torch.no_grad():
        if not torch.equal(model(probe).logits, load_internlm2_llm(dst)(probe).logits):
            raise RuntimeError(f"{path}: the saved checkpoint loads back with different logits")
    return path


# --------------------------------------------------------------------------- the world's text


def stage0_examples(world_root: str | Path, qa_prompt: str = QA_PROMPT) -> list[tuple[str, str, str]]:
    """``(context, prompt, target)`` for every train caption (English and Chinese) and train question."""
    root = Path(world_root)
    captions = {}
    for record in read_world_file(root, "train.json"):
        if "caption" not in record or "image_id" not in record:
            raise ValueError(f"{root / 'train.json'}: record {record!r} lacks 'caption' or 'image_id'")
        captions[record["image_id"]] = record["caption"]
    examples = [(text, "", text) for text in captions.values()]
    examples += [(captions[record["image_id"]], CAPTION_PROMPT_ZH, record["caption"])
                 for record in read_world_file(root, "train_zh.json")]
    for record in read_world_file(root, "vqa_train.json"):
        examples.append((captions[record["image_id"]], qa_prompt.format(record["question"]), record["answer"][0]))
    return examples


def conversations(world_root: str | Path) -> list[tuple[int, list[dict[str, str]]]]:
    """``(image_id, messages)`` of each train conversation (``conversations_train.json``), as the
    ``llava_conversation`` builder reads it."""
    name = "conversations_train.json"
    return [(int(record["id"]), parse_record(record, AnnSource(str(Path(world_root) / name), index)))
            for index, record in enumerate(read_world_file(world_root, name))]


def chat_rows(tokenizer, world_root: str | Path,
              chats: list[tuple[int, list[dict[str, str]]]]) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` of each conversation of :func:`conversations` in the chat format, the
    image's caption tokens where stage 3 puts the queries; within the LLM's positions (later rounds
    are dropped)."""
    captions = {r["image_id"]: r["caption"] for r in read_world_file(world_root, "train.json")}
    rows = []
    for image_id, messages in chats:
        context = tokenizer.encode(captions[image_id], add_special_tokens=False)
        tokens = ChatFormat(tokenizer, LLM_SIZES["max_position_embeddings"] - len(context)).encode(messages)
        at = tokens.image_position
        rows.append((tokens.input_ids[:at] + context + tokens.input_ids[at:],
                     tokens.labels[:at] + [IGNORE_INDEX] * len(context) + tokens.labels[at:]))
    return rows


def world_texts(examples: list[tuple[str, str, str]]) -> list[str]:
    """What the tokenizer is trained on: every distinct string of the examples, plus the eval captions' prefix."""
    return sorted({part for example in examples for part in example if part} | {"a picture of"})


# --------------------------------------------------------------------------- training


def encode_examples(tokenizer, examples: list[tuple[str, str, str]]) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` per example, the token layout of ``build_llm_inputs`` with the
    context's tokens in place of the queries; labels are ``IGNORE_INDEX`` outside ``target </s>``."""
    encoded = []
    for context, prompt, target in examples:
        given = tokenizer.encode(context, add_special_tokens=False) + tokenizer.encode(prompt, add_special_tokens=True)
        answer = tokenizer.encode(target, add_special_tokens=False) + [tokenizer.eos_token_id]
        encoded.append((given + answer, [IGNORE_INDEX] * len(given) + answer))
    return encoded


def _batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [pad_id] * (length - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [IGNORE_INDEX] * (length - len(lab)) for _, lab in rows])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids, _ in rows])
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pretrain_tiny_llm(world_root: str | Path, dst: str | Path, *, steps: int = 1500, batch_size: int = 64,
                      lr: float = 3e-3, warmup_steps: int = 50, seed: int = 0,
                      qa_prompt: str = QA_PROMPT, chat: bool = False) -> dict[str, float]:
    """Make a random tiny InternLM2 in ``dst`` (tokenizer trained on the world's text), train it
    on :func:`stage0_examples` (and with ``chat`` on :func:`chat_rows`; AdamW, linear warmup then
    cosine), save it in place. A batch is all examples or all conversations (these are 3-4x longer),
    in proportion to their counts.

    Returns the first and last training loss (means over 20 steps).
    """
    examples = stage0_examples(world_root, qa_prompt)
    texts = set(world_texts(examples))
    chats = conversations(world_root) if chat else []
    texts |= {m["content"].replace(IMAGE_TOKEN, "").strip() for _, messages in chats for m in messages}
    # fp32 storage: the trained weights are saved as trained (the release stores bf16)
    make_tiny_internlm2(dst, texts=sorted(texts), seed=seed, dtype=torch.float32, **LLM_SIZES)
    tokenizer = load_internlm2_tokenizer(dst)
    rows = encode_examples(tokenizer, examples)
    conversation_rows = chat_rows(tokenizer, world_root, chats)
    conversation_share = len(conversation_rows) / (len(conversation_rows) + len(rows))  # of the batches
    model = load_internlm2_llm(dst).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup_steps) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(seed)
    torch.manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc="stage 0: tiny LLM on the world's text"):
        source = conversation_rows if conversation_rows and rng.random() < conversation_share else rows
        loss = model(**_batch(rng.sample(source, batch_size), tokenizer.pad_token_id)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    save_internlm2_weights(model, dst)
    window = min(20, steps)
    return {"first_loss": sum(losses[:window]) / window, "last_loss": sum(losses[-window:]) / window}
