"""blip2_internlm on tiny parts: label masking, trainable set, generation, loading."""
from __future__ import annotations

import torch
import pytest
from lavis.common.registry import registry
from lavis.models import load_model, load_model_and_preprocess

from lavis_ext.constants import IGNORE_INDEX
from lavis_ext.models.blip2_models.blip2_internlm import Blip2InternLM

N_QUERY = 4  # num_query_token of the tiny model type


@pytest.fixture
def model(tiny_model_env):
    torch.manual_seed(0)
    return load_model("blip2_internlm", "tiny", is_eval=True)


def images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))


def test_registered():
    assert registry.get_model_class("blip2_internlm") is Blip2InternLM


def test_load_model_and_preprocess(tiny_model_env):
    model, vis, txt = load_model_and_preprocess("blip2_internlm", "tiny", is_eval=True)
    assert isinstance(model, Blip2InternLM) and set(vis) == {"train", "eval"} and set(txt) == {"train", "eval"}


def test_unknown_config_key_is_refused(tiny_model_env):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Blip2InternLM.default_config_path("tiny")).model
    cfg.num_query_tokens = 8  # typo of num_query_token
    with pytest.raises(ValueError, match="num_query_tokens"):
        Blip2InternLM.from_config(cfg)


def test_missing_llm_path_names_the_key(tiny_model_env, monkeypatch):
    monkeypatch.setenv("LAVIS_EXT_TINY_LLM", "/no/such/llm")
    with pytest.raises(FileNotFoundError, match=r"model\.llm_path .*= '/no/such/llm': no such directory"):
        load_model("blip2_internlm", "tiny")


def test_label_positions(model):
    tok = model.llm_tokenizer
    prompts, targets = ["a photo of", ""], ["a red circle", "two blue squares and more"]
    query = model.encode_images(images(2))
    embeds, mask, labels = model.build_llm_inputs(query, prompts, targets)
    for i in range(2):
        prompt_ids = tok.encode(prompts[i])
        target_ids = tok.encode(targets[i], add_special_tokens=False) + [tok.eos_token_id]
        n = N_QUERY + len(prompt_ids) + len(target_ids)
        expected = [IGNORE_INDEX] * (N_QUERY + len(prompt_ids)) + target_ids + [IGNORE_INDEX] * (labels.shape[1] - n)
        assert labels[i].tolist() == expected
        assert mask[i].tolist() == [1] * n + [0] * (labels.shape[1] - n)
        assert prompt_ids[0] == tok.bos_token_id
    # the token embeddings follow the queries
    first_prompt_embed = model.llm.get_input_embeddings()(torch.tensor(tok.bos_token_id))
    assert torch.equal(embeds[0, N_QUERY], first_prompt_embed)
    assert torch.equal(embeds[0, :N_QUERY], query[0])


def test_left_padding_for_generation(model):
    query = model.encode_images(images(2))
    _, mask, _ = model.build_llm_inputs(query, ["a", "a longer prompt here"], padding_side="left")
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all()


def test_gradients_only_on_trainable(model):
    model.train()
    loss = model({"image": images(2), "text_input": ["a red circle", "a blue square"]})["loss"]
    loss.backward()
    for name, param in model.named_parameters():
        if name.startswith(("visual_encoder.", "llm.")):
            assert not param.requires_grad and param.grad is None, name
    assert model.query_tokens.grad.abs().sum() > 0 and model.llm_proj.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.startswith("qformer."))


def test_freeze_qformer_trains_only_projection(model):
    trainable = model.set_trainable(freeze_vit=True, freeze_llm=True, freeze_qformer=True)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"llm_proj.weight", "llm_proj.bias", "ln_vision.weight", "ln_vision.bias"}
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in names)


def force_token_at_step(model, token_id: int, step: int):
    """Make the LLM emit ``token_id`` at generation step ``step`` (0-based) via an lm_head hook."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        if calls["n"] == step:
            output[..., token_id] += 1e4
        calls["n"] += 1
        return output

    return model.llm.lm_head.register_forward_hook(hook)


def test_greedy_generate_stops_at_eos(model):
    sample = {"image": images(1)}
    two_tokens = model.generate(sample, num_beams=1, max_length=2, min_length=1)
    handle = force_token_at_step(model, model.llm_tokenizer.eos_token_id, step=2)
    try:
        stopped = model.generate(sample, num_beams=1, max_length=12, min_length=1)
    finally:
        handle.remove()
    unforced = model.generate(sample, num_beams=1, max_length=12, min_length=1)
    assert stopped == two_tokens
    assert len(model.llm_tokenizer.encode(unforced[0], add_special_tokens=False)) > 2


def test_chat_model_stops_at_im_end(model):
    model.config.use_chat_template = True
    model.stop_token_ids = model._stop_token_ids()
    im_end = model.llm_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.stop_token_ids
    sample = {"image": images(1), "text_input": ["what colour?"]}
    two_tokens = model.predict_answers(sample, num_beams=1, max_len=2)
    handle = force_token_at_step(model, im_end, step=2)
    try:
        stopped = model.predict_answers(sample, num_beams=1, max_len=12)
    finally:
        handle.remove()
    assert stopped == two_tokens


def test_batch_with_different_prompts_equals_one_at_a_time(model):
    image = images(3)
    prompts = ["a photo of", "Question: what is it? Short answer:", ""]
    batched = model.generate({"image": image, "prompt": prompts}, num_beams=1, max_length=6, min_length=1)
    single = [model.generate({"image": image[i:i + 1], "prompt": [prompts[i]]}, num_beams=1, max_length=6,
                             min_length=1)[0] for i in range(3)]
    assert batched == single


def test_beam_and_sampling_shapes(model):
    image = images(2)
    assert len(model.generate({"image": image}, num_beams=3, max_length=4, num_captions=2)) == 4
    torch.manual_seed(0)
    assert len(model.generate({"image": image}, use_nucleus_sampling=True, max_length=4, num_captions=3)) == 6


def test_predict_answers_one_per_question(model):
    answers = model.predict_answers({"image": images(3), "text_input": ["what?", "how many?", "which colour?"]},
                                    num_beams=2, max_len=4, min_len=1, length_penalty=-1)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_chat_template_prompt(model):
    model.config.use_chat_template = True
    assert model.format_question("what?", "Question: {} Short answer:") == (
        "<|im_start|>user\nQuestion: what? Short answer:<|im_end|>\n<|im_start|>assistant\n")


def trainable_state(model) -> dict:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in trainable}


def test_save_load_round_trip(model, tiny_model_env, tmp_path):
    with torch.no_grad():
        model.llm_proj.weight.add_(0.5)
        model.query_tokens.mul_(3.0)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": trainable_state(model)}, path)
    torch.manual_seed(0)  # the same random frozen parts as `model`
    reloaded = load_model("blip2_internlm", "tiny", is_eval=True)
    reloaded.load_checkpoint(str(path))
    sample = {"image": images(2), "text_input": ["a red circle", "two squares"]}
    assert torch.equal(model(sample)["loss"], reloaded(sample)["loss"])


def test_unexpected_key_in_checkpoint_is_refused(model, tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"model": {**trainable_state(model), "not_a_param": torch.zeros(1)}}, path)
    with pytest.raises(RuntimeError, match="not_a_param"):
        model.load_checkpoint(str(path))


def stage1_checkpoint(tmp_path, tiny_parts, arch: str = "blip2"):
    """A stage-1 checkpoint of the same tiny sizes, as LAVIS's runner writes it (buffers included)."""
    from omegaconf import OmegaConf
    from lavis_ext.tiny.blip2 import write_lavis_checkpoint

    cfg = OmegaConf.create(dict(vit_model="eva_clip_g", image_size=32, num_query_token=N_QUERY, vit_precision="fp32",
                                freeze_vit=True, load_finetuned=False, pretrained="", bert_path=str(tiny_parts["bert"]),
                                vit_path=str(tiny_parts["vit"])))
    stage1 = registry.get_model_class(arch).from_config(cfg)
    with torch.no_grad():
        stage1.query_tokens.add_(1.0)  # unlike any fresh initialisation
    return stage1, write_lavis_checkpoint(stage1, tmp_path / "stage1.pth")


@pytest.mark.parametrize("arch", ["blip2", "blip2_qformer_ext"])
def test_stage1_into_stage2(model, tiny_parts, tmp_path, arch):
    stage1, path = stage1_checkpoint(tmp_path, tiny_parts, arch)
    saved = torch.load(path)["model"]
    assert "Qformer.bert.embeddings.position_ids" in saved and "visual_encoder.pos_embed" not in saved
    model.load_from_pretrained(str(path))
    assert torch.equal(model.query_tokens, stage1.query_tokens)
    q1 = stage1.Qformer.bert.encoder.layer[0].crossattention.self.key.weight
    assert torch.equal(model.qformer.encoder.layer[0].crossattention.self.key.weight, q1)
    ffn = stage1.Qformer.bert.encoder.layer[1].output_query.dense.weight
    assert torch.equal(model.qformer.encoder.layer[1].output_query.dense.weight, ffn)


def test_stage1_with_foreign_keys_is_refused(model, tiny_parts, tmp_path):
    stage1, path = stage1_checkpoint(tmp_path, tiny_parts)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["model"]["opt_proj.weight"] = torch.zeros(2, 2)
    torch.save(checkpoint, path)
    with pytest.raises(RuntimeError, match="opt_proj.weight"):
        model.load_from_pretrained(str(path))


# --------------------------------------------------------------------------- loss, truncation, options


def test_loss_equals_the_llms_own_loss_with_labels(model):
    """forward's loss (LM head at target positions only) against transformers' shifted loss over all positions."""
    sample = {"image": images(2), "text_input": ["a red circle", "two blue squares and more"], "prompt": ["a photo of", ""]}
    embeds, mask, labels = model.build_llm_inputs(model.encode_images(sample["image"]), sample["prompt"],
                                                  sample["text_input"])
    reference = model.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(model(sample)["loss"], reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("room,kept", [(3, 3), (-2, 1)])  # max_txt_len - prompt tokens; a prompt too long keeps 1
def test_max_txt_len_truncates_the_target(model, room, kept):
    tok = model.llm_tokenizer
    prompt, target = "a photo of", "two blue squares and a red circle on the left"
    prompt_ids, target_ids = tok.encode(prompt), tok.encode(target, add_special_tokens=False)
    model.config.max_txt_len = len(prompt_ids) + room
    assert len(target_ids) > kept
    _, mask, labels = model.build_llm_inputs(model.encode_images(images(1)), [prompt], [target])
    assert [t for t in labels[0].tolist() if t != IGNORE_INDEX] == target_ids[:kept]  # cut, the EOS with it
    assert mask[0].sum() == N_QUERY + len(prompt_ids) + kept


def test_freeze_vit_false_trains_the_vision_encoder(tiny_model_env):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Blip2InternLM.default_config_path("tiny")).model
    cfg.freeze_vit = False
    model = Blip2InternLM.from_config(cfg)
    model.train()
    assert model.visual_encoder.training  # not pinned to eval as a frozen part is
    model({"image": images(2), "text_input": ["a red circle", "a blue square"]})["loss"].backward()
    vit = list(model.visual_encoder.parameters())
    assert all(p.requires_grad for p in vit) and all(p.grad is not None for p in vit)
    assert model.visual_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in model.llm.parameters())


def test_prompt_count_must_match_the_images(model):
    with pytest.raises(ValueError, match=r"samples\['prompt'\] has 1 prompts for 2 images"):
        model({"image": images(2), "text_input": ["a", "b"], "prompt": ["only one"]})


def test_only_generate_inference_is_supported(model):
    with pytest.raises(ValueError, match="blip2_internlm supports inference_method 'generate', got 'rank'"):
        model.predict_answers({"image": images(1), "text_input": ["what?"]}, inference_method="rank")


def test_lemmatizer_without_spacy_says_how_to_install(tiny_model_env):
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Blip2InternLM.default_config_path("tiny")).model
    cfg.apply_lemmatizer = True
    with pytest.raises(ModuleNotFoundError, match="spacy download en_core_web_sm"):
        Blip2InternLM.from_config(cfg)


class StandInSpacy:
    """A shortcut for spaCy's English pipeline (not installed here): every word but "a"/"the" is a noun
    whose lemma is the word without a final "s", marked with "~". Enough to see the wiring."""

    def pipe(self, texts):
        from types import SimpleNamespace

        for text in texts:
            yield [SimpleNamespace(text=w, lemma_=w.removesuffix("s") + "~", pos_="DET" if w in ("a", "the") else "NOUN")
                   for w in text.split()]


def test_apply_lemmatizer_lemmatises_the_answers_stand_in_spacy_shortcut(model, monkeypatch):
    import lavis_ext.text as text

    monkeypatch.setattr(text, "english_pipeline", lambda: StandInSpacy())
    assert text.lemmatize(["the dogs", "red"]) == ["the dog~", "red~"]
    sample = {"image": images(2), "text_input": ["what?", "how many?"]}
    raw = model.predict_answers(sample, num_beams=1, max_len=4)
    assert text.lemmatize(raw) != raw
    model.config.apply_lemmatizer = True
    assert model.predict_answers(sample, num_beams=1, max_len=4) == text.lemmatize(raw)


def test_vit_autocast_follows_its_stored_dtype(model, monkeypatch):
    """On CUDA the ViT runs in the dtype model.vit_precision stored it in, never a hard-coded one."""
    import contextlib
    import warnings

    monkeypatch.setattr(Blip2InternLM, "device", property(lambda self: torch.device("cuda")))
    assert isinstance(model.maybe_autocast(), contextlib.nullcontext)  # an fp32 ViT: no autocast
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available" on this machine; the dtype is what counts
        for dtype in (torch.float16, torch.bfloat16):
            model.visual_encoder.to(dtype)
            assert model.maybe_autocast().fast_dtype == dtype
