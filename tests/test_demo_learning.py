"""The demo's parts and a shortened demo run: stage 0 round-trips through InternLM2's hub layout,
and stage 1 -> stage 2 through run_scripts/ teaches the model to describe held-out images, in English
and in Chinese."""
from __future__ import annotations

import torch

from lavis_ext.models.internlm2 import load_internlm2_llm
from lavis_ext.models.internlm2.conversion import split_wqkv
from lavis_ext.demo.pretrain_llm import pack_wqkv, pretrain_tiny_llm, save_internlm2_weights

# shortened demo: fewer images and steps than `make demo`, same code path
SHORT_WORLD = {"train": 2000, "val": 50, "test": 120}
SHORT_ASSETS = {"llm_steps": 300, "vit_steps": 80}
SHORT_STAGE1 = ["run.max_epoch=1", "run.max_iters=15"]
SHORT_STAGE2 = ["run.max_epoch=20", "run.max_iters=320", "run.warmup_steps=10"]  # 31 iterations an epoch


def test_pack_wqkv_inverts_split_wqkv():
    heads, kv_heads, head_dim, hidden = 8, 2, 4, 16
    q, k, v = (torch.randn(n * head_dim, hidden) for n in (heads, kv_heads, kv_heads))
    packed = pack_wqkv(q, k, v, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)
    assert packed.shape == ((heads + 2 * kv_heads) * head_dim, hidden)
    for part, again in zip((q, k, v), split_wqkv(packed, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)):
        assert torch.equal(part, again)


def test_saved_weights_load_back_with_identical_logits(tiny_llm, tmp_path):
    import shutil

    dst = shutil.copytree(tiny_llm, tmp_path / "llm")
    model = load_internlm2_llm(dst)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # weights no checkpoint on disk holds
    save_internlm2_weights(model, dst)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, load_internlm2_llm(dst)(ids).logits)
        assert not torch.allclose(model(ids).logits, load_internlm2_llm(tiny_llm)(ids).logits)


def test_stage0_learns_the_world_text(tmp_path):
    from lavis_ext.demo.world import make_world

    world = make_world(tmp_path / "world", sizes={"train": 100, "val": 2, "test": 2})
    result = pretrain_tiny_llm(world, tmp_path / "llm", steps=120, batch_size=16, warmup_steps=5)
    assert result["last_loss"] < 0.5 * result["first_loss"]
    assert (tmp_path / "llm" / "tokenizer.model").is_file()
    weights = load_internlm2_llm(tmp_path / "llm").state_dict()
    assert "model.layers.0.self_attn.q_proj.weight" in weights  # read through the packed-wqkv converter


def test_short_demo_learns_captions_and_zero_shot_vqa(tmp_path, monkeypatch):
    from lavis_ext.demo.pipeline import demo_env, evaluate, make_assets, train_stages

    assets = make_assets(tmp_path, world_sizes=SHORT_WORLD, **SHORT_ASSETS)
    env = demo_env(tmp_path, assets)
    jobs = train_stages(tmp_path, env, SHORT_STAGE1, SHORT_STAGE2)
    for name, value in env.items():  # the caption evaluation builds the model from the demo yaml, as the demo does
        monkeypatch.setenv(name, value)
    result = evaluate(tmp_path, env, assets["world"], jobs["stage2"])
    trained, untrained = result["trained"]["captions"], result["untrained"]["captions"]
    print({name: {k: result[name][k] for k in ("captions", "vqa") if k in result[name]} for name in result})
    assert trained["attribute"] > max(0.6, untrained["attribute"] + 0.3), result
    assert trained["colour_f1"] > 0.7 and trained["shape_f1"] > untrained["shape_f1"] + 0.2, result
    zh, zh_untrained = result["trained"]["captions_zh"], result["untrained"]["captions_zh"]  # the Chinese prompt
    assert zh["attribute"] > max(0.6, zh_untrained["attribute"] + 0.3), result
    assert zh["cider"] > zh_untrained["cider"] + 1.0, result
    vqa = {name: result[name]["vqa"] for name in result}
    for kind in ("overall", "other"):
        assert vqa["trained"][kind] > max(vqa["majority"][kind], vqa["untrained"][kind]) + 0.05, vqa
