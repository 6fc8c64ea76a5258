"""LoRA on blip2_internlm's LLM: where it goes, what trains, checkpoints, exact resume."""
from __future__ import annotations

import logging
import re

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, losses, run_python
from lavis_ext.models.blip2_models.blip2_internlm import Blip2InternLM
from lavis_ext.models.blip2_models.chat_format import ChatFormat
from lavis_ext.models.lora import DEFAULT_TARGET_MODULES

INSTRUCT_YAML = "lavis_ext/demo/projects/instruct_lora.yaml"
CONVERSATION = [{"role": "user", "content": "<image>\nWhat color is the car?"}, {"role": "assistant", "content": "red"},
                {"role": "user", "content": "Two cats?"}, {"role": "assistant", "content": "a dog"}]


def build(**overrides) -> Blip2InternLM:
    cfg = OmegaConf.load(Blip2InternLM.default_config_path("tiny")).model
    cfg.merge_with(overrides)
    torch.manual_seed(0)
    return Blip2InternLM.from_config(cfg)


def batch(model: Blip2InternLM) -> dict:
    tokens = ChatFormat(model.llm_tokenizer, 128).encode(CONVERSATION)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return {"image": images, "input_ids": [tokens.input_ids] * 2, "labels": [tokens.labels] * 2,
            "image_position": torch.tensor([tokens.image_position] * 2)}


def lora_modules(model) -> list[str]:
    return [name for name, module in model.named_modules() if hasattr(module, "lora_A")]


def test_lora_wraps_every_target_only_inside_the_llm(tiny_model_env):
    model = build(lora_rank=4)
    wrapped = lora_modules(model)
    layers = model.llm.config.num_hidden_layers
    assert len(wrapped) == layers * len(DEFAULT_TARGET_MODULES)
    assert all(name.startswith("llm.") for name in wrapped)
    assert {name.rsplit(".", 1)[-1] for name in wrapped} == set(DEFAULT_TARGET_MODULES)
    assert lora_modules(build(lora_rank=4, lora_target_modules=["q_proj", "v_proj"])) == [
        f"llm.base_model.model.model.layers.{i}.self_attn.{p}_proj" for i in range(layers) for p in "qv"]


def test_unknown_target_module_and_unfrozen_llm_are_refused(tiny_model_env):
    with pytest.raises(ValueError, match=r"\['query'\] are not modules of the LLM"):
        build(lora_rank=4, lora_target_modules=["q_proj", "query"])
    with pytest.raises(ValueError, match=r"freeze_llm True"):
        build(lora_rank=4, freeze_llm=False)


@pytest.mark.parametrize("freeze", [{}, {"freeze_qformer": True}, {"freeze_llm_proj": True}])
def test_only_lora_qformer_and_projection_get_gradients(tiny_model_env, freeze, caplog):
    with caplog.at_level(logging.INFO):
        model = build(lora_rank=4, **freeze)
    model.train()
    model(batch(model))["loss"].backward()
    got = {name for name, p in model.named_parameters() if p.grad is not None}
    assert got == {name for name, p in model.named_parameters() if p.requires_grad}
    lora = {name for name in got if ".lora_" in name}
    assert len(lora) == 2 * len(lora_modules(model))  # every A and B
    parts = {name.split(".", 1)[0] for name in got - lora}
    expected = {"qformer", "query_tokens", "ln_vision", "llm_proj"}
    if freeze.get("freeze_qformer"):
        expected -= {"qformer", "query_tokens"}
    if freeze.get("freeze_llm_proj"):
        expected -= {"llm_proj"}
    assert parts == expected
    lora_count = sum(p.numel() for name, p in model.named_parameters() if name in lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert re.search(rf"{trainable} trainable parameters of \d+ \(.*lora {lora_count}", caplog.text)


def trained_step(model: Blip2InternLM) -> None:
    """One SGD step, so that LoRA's B (zero at init) and the rest move away from their init."""
    model.train()
    model(batch(model))["loss"].backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad.sign() * 1e-2
                p.grad = None


def trainable_state(model) -> dict:
    """What runner_ext saves: every key that is not a frozen parameter."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k: v.clone() for k, v in model.state_dict().items() if k not in frozen}


def eval_loss(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(batch(model))["loss"]


def test_save_and_reload_give_an_identical_loss(tiny_model_env, tmp_path):
    model = build(lora_rank=4)
    trained_step(model)
    state = trainable_state(model)
    assert any(".lora_B." in k for k in state) and not any(k.startswith("llm.") and ".lora_" not in k for k in state)
    torch.save({"model": state}, tmp_path / "stage3.pth")
    reloaded = build(lora_rank=4, load_finetuned=True, finetuned=str(tmp_path / "stage3.pth"))
    assert torch.equal(eval_loss(reloaded), eval_loss(model))
    assert not torch.equal(eval_loss(build(lora_rank=4)), eval_loss(model))  # the weights matter


def test_stage2_checkpoint_starts_stage3_with_lora_as_identity(tiny_model_env, tmp_path):
    stage2 = build()
    trained_step(stage2)
    torch.save({"model": trainable_state(stage2)}, tmp_path / "stage2.pth")
    stage3 = build(lora_rank=4, pretrained=str(tmp_path / "stage2.pth"))
    assert torch.allclose(eval_loss(stage3), eval_loss(stage2), atol=1e-6)


def test_interrupted_and_resumed_stage3_has_identical_losses(tiny_env, tmp_path):
    """Bit for bit. The LLM's positions cover the conversations: beyond ``max_position_embeddings``,
    dynamic NTK (transformers' ``dynamic_rope_update``, like InternLM2's own cache) keeps the
    frequencies of the longest sequence the process has seen, so the losses would depend on it."""
    from lavis_ext.demo.world import make_world
    from lavis_ext.tiny.internlm2 import make_tiny_internlm2

    make_world(tmp_path / "data" / "synthetic", sizes={"train": 4, "val": 1, "test": 1})
    llm = make_tiny_internlm2(tmp_path / "llm", max_position_embeddings=256)
    env = {**tiny_env, "LAVIS_CACHE_ROOT": str(tmp_path / "data"), "LAVIS_EXT_TINY_LLM": str(llm)}
    env.pop("LAVIS_EXT_STAGE2_CKPT", None)

    def train(output, *extra):
        options = [f"run.output_dir={output}", "run.distributed=False", "run.batch_size_train=2", "run.max_epoch=2",
                   "run.warmup_steps=1", "model.lora_rank=4", *extra]
        result = run_python(["train.py", "--cfg-path", str(REPO / INSTRUCT_YAML), "--options", *options], env)
        assert result.returncode == 0, result.stderr[-4000:]
        return result

    full, parts = tmp_path / "full", tmp_path / "parts"
    train(full)
    reference = losses(full)
    assert len(reference) == 4  # 4 conversations / 2 per batch x 2 epochs
    (job,) = full.iterdir()
    saved = torch.load(job / "checkpoint_last.pth", weights_only=False)["model"]
    assert sum(".lora_A." in k for k in saved) == sum(".lora_B." in k for k in saved) > 0

    train(parts, "run.max_iters=1")
    assert len(losses(parts)) == 1
    assert "resumed from" in train(parts, "--resume", "auto").stderr
    assert losses(parts) == reference
