"""BLIP-2 with an InternLM2 language model, loaded as native ``LlamaForCausalLM``.

Registered in LAVIS as ``blip2_internlm``::

    >>> import lavis_ext
    >>> from lavis.models import load_model
    >>> model = load_model("blip2_internlm", "pretrain_internlm2_1_8b", is_eval=True)

The image enters the LLM once, through :meth:`Blip2InternLM.encode_images` (ViT -> Q-Former ->
``llm_proj``) and :meth:`Blip2InternLM.build_llm_inputs` (query embeddings, then the
bos-prefixed prompt, then the target): ``forward``, ``generate``, ``predict_answers`` and
``chat`` (the chat CLI and web app, :mod:`lavis_ext.chat`, :mod:`lavis_ext.app`) all go through
those two methods.
"""
from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
from lavis.common.registry import registry
from lavis.models.blip2_models.blip2 import Blip2Base, LayerNorm, disabled_train
from torch.nn.utils.rnn import pad_sequence

from lavis_ext import blip2_parts, local_paths
from lavis_ext.checkpoint import load_checkpoint_file, load_partial_state, model_weights, reading_weights
from lavis_ext.constants import IGNORE_INDEX
from lavis_ext.errors import CheckpointError, ConfigError
from lavis_ext.models.blip2_models.chat_format import IMAGE_TOKEN, LLMTokens, encode_with_image
from lavis_ext.models.internlm2 import load_internlm2_llm, load_internlm2_tokenizer
from lavis_ext.models.internlm2.tokenizer import IM_END
from lavis_ext.models.lora import DEFAULT_TARGET_MODULES, add_lora, is_lora_parameter, lora_config
from lavis_ext.text import clean_answer, english_pipeline, lemmatize

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "models" / "blip2"
LLM_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LLM_CACHES = ("static", "dynamic")
# LAVIS config keys that say how to load, not what to build
LOADING_KEYS = ("arch", "model_type", "load_pretrained", "load_finetuned", "pretrained", "finetuned")
# The Q-Former's text side (names under its BERT), which the queries never use: stage 2 drops these
# modules (_query_only) and skips their stage-1 weights. Queries have their own *_query FFNs.
QFORMER_TEXT_SIDE = re.compile(r"(embeddings\.(word_embeddings|position_embeddings|position_ids)"
                               r"|encoder\.layer\.\d+\.(intermediate|output))(?=\.|$)")
# Stage-1 heads that stage 2 does not use: ITC projections and temperature, ITM, the LM head.
STAGE1_HEADS = ("vision_proj.", "text_proj.", "itm_head.", "temp", "Qformer.cls.")
STAGE1_QFORMER = "Qformer.bert."


@dataclass
class Blip2InternLMConfig:
    """Everything ``Blip2InternLM`` is built from. Unknown keys raise.

    Paths are local (``llm_path``: an InternLM2 or Llama checkpoint directory; ``bert_path``,
    ``vit_path``: see :mod:`lavis_ext.blip2_parts`). The model yamls fill them from environment
    variables; ``--options model.<key>=...`` overrides.
    """

    llm_path: str = ""
    bert_path: str = ""
    vit_path: str = ""
    vit_model: str = "eva_clip_g"
    image_size: int = 224
    drop_path_rate: float = 0.0
    use_grad_checkpoint: bool = False
    vit_precision: str = "fp16"  # fp32 where there is no CUDA (patches.cpu_fp16)
    freeze_vit: bool = True
    freeze_llm: bool = True
    freeze_qformer: bool = False  # for adapter/LoRA work: train only llm_proj (+ adapters)
    freeze_llm_proj: bool = False
    # LoRA on the LLM (PEFT; lavis_ext.models.lora); lora_rank 0 = none. Only the LLM's modules are wrapped.
    lora_rank: int = 0  # higher: more capacity and memory
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    num_query_token: int = 32
    cross_attention_freq: int = 2
    llm_dtype: str = "bf16"  # bf16 | fp16 | fp32; fp32 on CPU
    max_txt_len: int = 32  # prompt + target tokens per sample in training
    prompt: str = ""  # caption prompt, e.g. "a photo of"; samples["prompt"] overrides per sample
    qa_prompt: str = "Question: {} Short answer:"
    use_chat_template: bool = False  # wrap VQA prompts in InternLM2's chat format (chat models)
    apply_lemmatizer: bool = False  # lemmatise VQA answers with spaCy (OK-VQA, as LAVIS's blip2_t5)
    # KV cache of generation: "static" preallocates it for prompt + max new tokens (transformers'
    # StaticCache; faster decode steps, the same tokens), "dynamic" grows it per token
    llm_cache: str = "static"

    @classmethod
    def from_lavis(cls, cfg) -> "Blip2InternLMConfig":
        known = {f.name for f in fields(cls)}
        values = {k: cfg[k] for k in cfg if k not in LOADING_KEYS}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"model config: unknown keys {unknown}; blip2_internlm takes {sorted(known)}")
        config = cls(**values)
        config.lora_target_modules = list(config.lora_target_modules)  # a ListConfig from the yaml
        if config.llm_cache not in LLM_CACHES:
            raise ConfigError(f"model.llm_cache = {config.llm_cache!r}: expected one of {list(LLM_CACHES)}")
        if config.llm_dtype not in LLM_DTYPES:
            raise ConfigError(f"model.llm_dtype = {config.llm_dtype!r}: expected one of {sorted(LLM_DTYPES)}")
        if config.lora_rank < 0 or (config.lora_rank and not config.freeze_llm):
            raise ConfigError(f"model.lora_rank = {config.lora_rank}: expected 0 (no LoRA) or a positive rank "
                              f"with freeze_llm True (LoRA trains adapters beside the frozen LLM)")
        return config


@registry.register_model("blip2_internlm")
class Blip2InternLM(Blip2Base):
    """BLIP-2 stage 2: frozen ViT -> Q-Former -> ``llm_proj`` -> frozen InternLM2 (as Llama)."""

    config_class = Blip2InternLMConfig  # the model keys and their defaults; the yamls carry what differs
    PRETRAINED_MODEL_CONFIG_DICT = {  # absolute: LAVIS joins relative paths onto its own package
        "pretrain_internlm2_1_8b": str(CONFIG_DIR / "blip2_pretrain_internlm2_1_8b.yaml"),
        "pretrain_internlm2_chat_1_8b": str(CONFIG_DIR / "blip2_pretrain_internlm2_chat_1_8b.yaml"),
        "pretrain_internlm2_7b": str(CONFIG_DIR / "blip2_pretrain_internlm2_7b.yaml"),
        "tiny": str(CONFIG_DIR / "blip2_internlm2_tiny.yaml"),
    }

    def __init__(self, config: Blip2InternLMConfig):
        super().__init__()
        self.config = config
        self.visual_encoder = blip2_parts.build_vision_encoder(
            config.vit_model, config.vit_path, config.image_size, config.drop_path_rate, config.use_grad_checkpoint,
            precision=config.vit_precision)
        self.ln_vision = LayerNorm(self.visual_encoder.num_features)
        qformer_lm, self.query_tokens = blip2_parts.build_qformer(
            config.bert_path, config.num_query_token, self.visual_encoder.num_features, config.cross_attention_freq)
        self.qformer = self._query_only(qformer_lm.bert)

        llm_dtype = LLM_DTYPES[config.llm_dtype]
        if llm_dtype != torch.float32 and not torch.cuda.is_available():
            logger.info("model.llm_dtype %s without CUDA: LLM loaded in fp32", config.llm_dtype)
            llm_dtype = torch.float32
        self.llm_tokenizer = load_internlm2_tokenizer(local_paths.require_dir(config.llm_path, "model.llm_path"))
        with reading_weights("model.llm_path", config.llm_path):
            self.llm = load_internlm2_llm(config.llm_path, torch_dtype=llm_dtype)
        check_tokenizer_fits(self.llm_tokenizer, self.llm, config.llm_path)
        if config.lora_rank:
            self.llm = add_lora(self.llm, lora_config(config.lora_rank, config.lora_alpha, config.lora_dropout,
                                                      config.lora_target_modules, base_model=config.llm_path))
        self.llm_proj = nn.Linear(self.qformer.config.hidden_size, self.llm.config.hidden_size)
        self.stop_token_ids = self._stop_token_ids()
        self.set_trainable(freeze_vit=config.freeze_vit, freeze_llm=config.freeze_llm,
                           freeze_qformer=config.freeze_qformer, freeze_llm_proj=config.freeze_llm_proj)

    @staticmethod
    def _query_only(bert: nn.Module) -> nn.Module:
        """Drop the Q-Former's text side (:data:`QFORMER_TEXT_SIDE`): queries never use it."""
        for name in [name for name, _ in bert.named_modules() if QFORMER_TEXT_SIDE.fullmatch(name)]:
            parent, _, child = name.rpartition(".")
            setattr(bert.get_submodule(parent), child, None)
        return bert

    def _stop_token_ids(self) -> list[int]:
        """EOS, plus ``<|im_end|>`` for chat models (generation_config lists it), never ``"\\n"``."""
        ids = [self.llm_tokenizer.eos_token_id]
        eos = self.llm.generation_config.eos_token_id
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
        if self.config.use_chat_template:
            ids += self.llm_tokenizer.stop_token_ids
        return sorted(set(ids))

    # ------------------------------------------------------------------ freezing

    def set_trainable(self, *, freeze_vit: bool, freeze_llm: bool, freeze_qformer: bool,
                      freeze_llm_proj: bool = False) -> int:
        """The one place that freezes parts; logs and returns the trainable parameter count.

        LoRA parameters always train; the frozen LLM around them stays in train mode then, so
        that LoRA's dropout applies (the converted Llama has no dropout of its own).
        """
        frozen = {"visual_encoder": freeze_vit, "llm": freeze_llm, "qformer": freeze_qformer,
                  "query_tokens": freeze_qformer, "llm_proj": freeze_llm_proj}
        for name, param in self.named_parameters():
            param.requires_grad = is_lora_parameter(name) or not frozen.get(name.split(".", 1)[0], False)
        for name in ("visual_encoder", "llm"):
            if frozen[name] and not (name == "llm" and self.config.lora_rank):
                module = getattr(self, name).eval()
                module.train = disabled_train.__get__(module)
        counts: dict[str, int] = {}
        for name, param in self.named_parameters():
            if param.requires_grad:
                part = "lora" if is_lora_parameter(name) else name.split(".", 1)[0]
                counts[part] = counts.get(part, 0) + param.numel()
        trainable = sum(counts.values())
        total = sum(p.numel() for p in self.parameters())
        logger.info("blip2_internlm: %d trainable parameters of %d (%s; frozen: %s)", trainable, total,
                    ", ".join(f"{k} {v}" for k, v in counts.items()), [k for k, v in frozen.items() if v] or "none")
        return trainable

    # ------------------------------------------------------------------ the image -> LLM path

    def maybe_autocast(self):
        """The ViT's forward in the dtype it is stored in (``model.vit_precision``): autocast on CUDA
        when that is half precision (the images arrive in fp32); otherwise nothing. The trainable
        path's autocast is the runner's (``run.amp``)."""
        dtype = next(m.weight.dtype for m in self.visual_encoder.modules() if isinstance(m, nn.Linear))
        if self.device.type != "cuda" or dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=dtype)

    def encode_images(self, image: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> query embeddings in the LLM's space ``[B, num_query_token, H_llm]``."""
        # step 1: the vision encoder (no graph when frozen)
        vit_trainable = any(p.requires_grad for p in self.visual_encoder.parameters())
        with (contextlib.nullcontext() if vit_trainable else torch.no_grad()), self.maybe_autocast():
            image_embeds = self.visual_encoder(image)
        image_embeds = self.ln_vision(image_embeds.float())
        # step 2: the learned queries cross-attend to the image
        query_output = blip2_parts.query_pass(self.qformer, self.query_tokens, image_embeds)
        # step 3: project into the LLM's embedding space
        return self.llm_proj(query_output.last_hidden_state).to(self.llm.dtype)

    def build_llm_inputs(self, query_embeds: torch.Tensor, prompts: list[str], targets: list[str] | None = None,
                         padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Splice ``[queries][<s> prompt][target </s>]`` per sample and pad the batch (:meth:`splice_llm_inputs`).

        A prompt that contains ``<image>`` gets the queries there instead of in front
        (``<s><|im_start|>user\n[queries]\n{question}...``, as instruction tuning lays them out).
        Targets get the end of a turn appended so the model learns to stop: ``<|im_end|>`` with
        ``use_chat_template`` (the chat format's turn end, as instruction tuning supervises it),
        else the LLM's EOS; prompt+target are truncated to ``max_txt_len`` tokens. Generation uses
        ``padding_side="left"``.
        """
        tok = self.llm_tokenizer
        target_end = tok.convert_tokens_to_ids(IM_END) if self.config.use_chat_template else tok.eos_token_id
        rows = []
        for i, prompt in enumerate(prompts):
            prompt_ids, image_position = encode_with_image(tok, prompt, add_bos=True)
            target_ids = [] if targets is None else tok.encode(targets[i], add_special_tokens=False) + [target_end]
            if targets is not None:
                budget = max(self.config.max_txt_len - len(prompt_ids), 1)
                target_ids = target_ids[:budget]
            rows.append(LLMTokens(prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids, image_position))
        return self.splice_llm_inputs(query_embeds, rows, padding_side)

    def splice_llm_inputs(self, query_embeds: torch.Tensor, rows: list[LLMTokens],
                          padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The one splice of image and text: per sample, the text's token embeddings with the
        ``num_query_token`` query embeddings inserted before ``input_ids[image_position]``.

        Returns ``inputs_embeds [B, T, H]``, ``attention_mask [B, T]`` and ``labels [B, T]``,
        where labels are ``IGNORE_INDEX`` on the queries, on every unsupervised token and on padding.
        """
        embed = self.llm.get_input_embeddings()
        device = query_embeds.device
        n_query = query_embeds.shape[1]
        embeds, masks, labels = [], [], []
        for query, row in zip(query_embeds, rows, strict=True):
            at = row.image_position
            text = embed(torch.tensor(row.input_ids, dtype=torch.long, device=device))
            embeds.append(torch.cat([text[:at], query, text[at:]]))
            masks.append(torch.ones(n_query + len(row.input_ids), dtype=torch.long, device=device))
            labels.append(torch.tensor(row.labels[:at] + [IGNORE_INDEX] * n_query + row.labels[at:],
                                       dtype=torch.long, device=device))
        return (pad_rows(embeds, padding_side, 0.0), pad_rows(masks, padding_side, 0),
                pad_rows(labels, padding_side, IGNORE_INDEX))

    def _prompts(self, samples: dict, default: str) -> list[str]:
        """Caption prompts, one per image: ``samples["prompt"]`` (a dataset's own) or ``default``,
        in the chat format for chat models (:meth:`format_question`), in training and generation alike."""
        batch = samples["image"].shape[0]
        prompts = samples.get("prompt", default)
        prompts = [prompts] * batch if isinstance(prompts, str) else list(prompts)
        if len(prompts) != batch:
            raise ValueError(f"samples['prompt'] has {len(prompts)} prompts for {batch} images")
        return [self.format_question(prompt, "{}") for prompt in prompts]

    # ------------------------------------------------------------------ training

    def forward(self, samples: dict) -> dict:
        """Language-modelling loss of ``samples["image"]`` with either captions (``text_input``, the
        targets, and an optional ``prompt``) or encoded conversations (``input_ids``, ``labels``,
        ``image_position``, as :mod:`lavis_ext.datasets.conversation` gives them)."""
        query_embeds = self.encode_images(samples["image"])
        if "input_ids" in samples:
            rows = [LLMTokens(list(ids), list(labels), int(at)) for ids, labels, at
                    in zip(samples["input_ids"], samples["labels"], samples["image_position"], strict=True)]
            inputs_embeds, attention_mask, labels = self.splice_llm_inputs(query_embeds, rows)
        else:
            inputs_embeds, attention_mask, labels = self.build_llm_inputs(
                query_embeds, self._prompts(samples, self.config.prompt), list(samples["text_input"]))
        hidden = self.llm.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                        use_cache=False).last_hidden_state
        # The loss is computed here, not by the LLM: position t predicts labels[t + 1], and the LM
        # head runs only where that label is a target. Queries, prompt and padding take most of
        # the sequence and need no logits (the LLM would compute [B, T, vocab] of them).
        next_labels = labels[:, 1:]
        is_target = next_labels != IGNORE_INDEX
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][is_target])
        return {"loss": nn.functional.cross_entropy(logits.float(), next_labels[is_target])}

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def generate(self, samples: dict, use_nucleus_sampling: bool = False, num_beams: int = 5, max_length: int = 30,
                 min_length: int = 1, top_p: float = 0.9, repetition_penalty: float = 1.0,
                 length_penalty: float = 1.0, num_captions: int = 1, temperature: float = 1.0) -> list[str]:
        """Captions (``num_captions`` per image, image-major); ``max/min_length`` count new tokens."""
        query_embeds = self.encode_images(samples["image"])
        prompts = self._prompts(samples, self.config.prompt)
        return self._generate_from(query_embeds, prompts, do_sample=use_nucleus_sampling, num_beams=num_beams,
                                   max_new_tokens=max_length, min_new_tokens=min_length, top_p=top_p,
                                   repetition_penalty=repetition_penalty, length_penalty=length_penalty,
                                   num_return_sequences=num_captions, temperature=temperature)

    def _generate_from(self, query_embeds: torch.Tensor, prompts: list[str], **generate_kwargs) -> list[str]:
        inputs_embeds, attention_mask, _ = self.build_llm_inputs(query_embeds, prompts, padding_side="left")
        if generate_kwargs.get("do_sample"):
            generate_kwargs["num_beams"] = 1
        else:
            generate_kwargs.pop("top_p", None)
            generate_kwargs.pop("temperature", None)
        if self.config.llm_cache == "static":
            generate_kwargs["cache_implementation"] = "static"
        outputs = self.llm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                    eos_token_id=self.stop_token_ids, pad_token_id=self.llm_tokenizer.pad_token_id,
                                    **generate_kwargs)
        return [self.decode_answer(row) for row in outputs.tolist()]

    def decode_answer(self, ids: list[int]) -> str:
        """The answer text of generated ids: up to the first stop token, decoded, cleaned."""
        return clean_answer(self.llm_tokenizer.decode(self._cut_at_stop(ids), skip_special_tokens=True))

    def _cut_at_stop(self, ids: list[int]) -> list[int]:
        """Generated ids up to (without) the first stop token: what follows it is padding."""
        stops = [i for i, token_id in enumerate(ids) if token_id in self.stop_token_ids]
        return ids[:stops[0]] if stops else ids

    def format_question(self, question: str, template: str) -> str:
        """``template.format(question)``, wrapped in the chat format when ``use_chat_template``."""
        return self.chat_prompt([], question, template)

    def chat_prompt(self, history: Sequence[tuple[str, str]], question: str, template: str) -> str:
        """The prompt of a conversation: earlier ``(question, answer)`` turns, then ``question``,
        each question as ``template.format(question)``; an ``<image>`` in ``template`` (where the
        queries go) stays in the first turn only, as in a training conversation.

        With ``use_chat_template``, InternLM2's chat format ending in the generation prompt (without
        the bos: :meth:`build_llm_inputs` adds it); otherwise the turns joined by spaces, as BLIP-2
        prompts a base LLM for visual conversation (``Question: q1 Short answer: a1 Question: q2 ...``).
        """
        turns = [*history, (question, None)]
        templates = [template] + [without_image(template)] * len(history)
        if not self.config.use_chat_template:
            return " ".join(t.format(q) + ("" if a is None else f" {a}") for t, (q, a) in zip(templates, turns))
        messages = []
        for t, (q, a) in zip(templates, turns):
            messages.append({"role": "user", "content": t.format(q)})
            if a is not None:
                messages.append({"role": "assistant", "content": a})
        chat = self.llm_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return chat.removeprefix(self.llm_tokenizer.bos_token)

    @torch.no_grad()
    def chat(self, image: torch.Tensor | None, history: Sequence[tuple[str, str]], question: str, *,
             template: str | None = None, num_beams: int = 5, max_new_tokens: int = 30, min_new_tokens: int = 1,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 0.9, length_penalty: float = 1.0,
             repetition_penalty: float = 1.0, streamer=None) -> str:
        """The answer to ``question`` after the ``history`` of ``(question, answer)`` turns, about
        ``image`` (one processed image, ``[3, H, W]`` or ``[1, 3, H, W]``), or text only when ``None``.

        Questions go into ``template`` (default ``qa_prompt``), so a first question is prompted as
        :meth:`predict_answers` prompts it (:meth:`chat_prompt`). ``streamer`` (a transformers
        streamer) receives the generated ids as they come; transformers refuses it with beam search.
        The answer stops at :attr:`stop_token_ids` and comes back without them (:meth:`decode_answer`).
        """
        template = self.config.qa_prompt if template is None else template
        if image is None:  # no query embeddings and no place for them: the LLM sees the text alone
            query_embeds = torch.zeros(1, 0, self.llm.config.hidden_size, dtype=self.llm.dtype, device=self.device)
            template = without_image(template)
        else:
            query_embeds = self.encode_images(image.reshape(1, *image.shape[-3:]).to(self.device))
        prompt = self.chat_prompt(history, question, template)
        (answer,) = self._generate_from(
            query_embeds, [prompt], num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
            do_sample=do_sample, temperature=temperature, top_p=top_p, length_penalty=length_penalty,
            repetition_penalty=repetition_penalty, streamer=streamer)
        return answer

    @torch.no_grad()
    def predict_answers(self, samples: dict, num_beams: int = 5, inference_method: str = "generate",
                        max_len: int = 10, min_len: int = 1, num_ans_candidates: int = 128, answer_list=None,
                        prompt: str = "", length_penalty: float = 0, **kwargs) -> list[str]:
        """Open-ended VQA with LAVIS's signature: one answer string per question."""
        if inference_method != "generate":
            raise ValueError(f"blip2_internlm supports inference_method 'generate', got {inference_method!r}")
        template = prompt or self.config.qa_prompt
        questions = samples["text_input"]
        questions = [questions] if isinstance(questions, str) else list(questions)
        prompts = [self.format_question(q, template) for q in questions]
        query_embeds = self.encode_images(samples["image"])
        answers = self._generate_from(query_embeds, prompts, num_beams=num_beams, max_new_tokens=max_len,
                                      min_new_tokens=min_len, length_penalty=length_penalty, do_sample=False)
        return lemmatize(answers) if self.config.apply_lemmatizer else answers

    # ------------------------------------------------------------------ building and loading

    @classmethod
    def from_config(cls, cfg):
        config = Blip2InternLMConfig.from_lavis(cfg)
        if config.apply_lemmatizer:
            english_pipeline()  # a missing spaCy model fails here, before any weights load
        model = cls(config)
        model.load_checkpoint_from_config(cfg)
        return model

    def load_from_pretrained(self, url_or_filename):
        """Load a stage-1 checkpoint (LAVIS ``blip2`` or ``blip2_qformer_ext``) into stage 2, or a
        stage-2 checkpoint into stage 3 (its LoRA weights, under ``llm.``, start as initialised).

        ``Qformer.bert.*`` becomes ``qformer.*``; the ITC/ITM heads and the Q-Former's text side
        are dropped on purpose. Every other key must fit, and only the LLM, ``llm_proj`` and
        the frozen ViT may be missing.
        """
        state_dict = model_weights(load_checkpoint_file(url_or_filename, "model.pretrained"),
                                   "model.pretrained", url_or_filename)
        mapped = {}
        for key, value in state_dict.items():
            if key.startswith(STAGE1_HEADS) or (key.startswith(STAGE1_QFORMER)
                                                 and QFORMER_TEXT_SIDE.match(key[len(STAGE1_QFORMER):])):
                continue
            mapped[key.replace(STAGE1_QFORMER, "qformer.", 1)] = value
        load_partial_state(self, mapped, f"model.pretrained = {url_or_filename}", allowed_missing=("llm.", "llm_proj."))
        logger.info("loaded stage-1 weights from %s", url_or_filename)

    def load_checkpoint(self, url_or_filename):
        """Load a ``blip2_internlm`` checkpoint; only frozen parameters may be missing."""
        state_dict = model_weights(load_checkpoint_file(url_or_filename, "model.finetuned"),
                                   "model.finetuned", url_or_filename)
        load_partial_state(self, state_dict, f"model.finetuned = {url_or_filename}")
        logger.info("loaded checkpoint from %s", url_or_filename)


def without_image(template: str) -> str:
    """``template`` without its ``<image>`` placeholder (and the newline after it, as LLaVA lays it out)."""
    return template.replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "")


def check_tokenizer_fits(tokenizer, llm: nn.Module, llm_path: str) -> None:
    """Every token id the tokenizer can produce must have a row in the LLM's input embedding
    (otherwise the first step fails with an ``IndexError`` deep in the embedding)."""
    rows = llm.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise CheckpointError(f"model.llm_path = {llm_path}: the tokenizer has {len(tokenizer)} pieces but the "
                              f"LLM's embedding has {rows} rows; tokenizer.model and the weights do not belong together")


def pad_rows(rows: list[torch.Tensor], side: str, value) -> torch.Tensor:
    """Stack variable-length rows ``[L_i, ...]`` into ``[B, max L, ...]``, padding left or right."""
    if side == "right":
        return pad_sequence(rows, batch_first=True, padding_value=value)
    flipped = pad_sequence([r.flip(0) for r in rows], batch_first=True, padding_value=value)
    return flipped.flip(1)
