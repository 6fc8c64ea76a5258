"""``python -m lavis_ext.tools.export_hf``: a tiny trained model (base; chat with LoRA) exported to
HF ``Blip2ForConditionalGeneration`` and run by transformers alone in a fresh process.

Each variant is exported once (module fixtures) with ``--verify``, whose one subprocess
(``run_hf_export.py``, no ``lavis_ext``) gives pixels, logits, greedy captions, VQA answers and
token ids; the tests compare them with lavis-ext's.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lavis_ext import blip2_parts
from lavis_ext.models.blip2_models.blip2_internlm import Blip2InternLM
from lavis_ext.models.internlm2 import load_internlm2_llm, load_internlm2_tokenizer
from lavis_ext.tiny.internlm2 import make_tiny_internlm2
from lavis_ext.tools import export_hf

LORA_RANK = 4
VARIANTS = {  # name -> (model type, --options)
    "base": ("tiny", []),
    "chat_lora": ("pretrain_internlm2_chat_1_8b", [f"model.lora_rank={LORA_RANK}"]),
}


def write_vit_weights(vit_dir: Path, dst: Path) -> Path:
    """A tiny EVA-ViT directory with weights (``config.json`` + ``model.pth``), seeded, whose
    embeddings are scaled up 10x: a fresh init's residual stream has a std of ~0.3, where
    ``ln_vision``'s eps (1e-5 vs HF's 1e-6) moves the logits ~100x more than on the larger
    features of a trained ViT, enough to flip near-tied greedy tokens of a random LLM. The
    q and v biases (zero at init) get values, so that their place in ``qkv.bias`` matters."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(vit_dir / "config.json", dst / "config.json")
    torch.manual_seed(0)
    vit = blip2_parts.build_vision_encoder("eva_clip_g", str(vit_dir), img_size=224)
    with torch.no_grad():
        for param in (vit.patch_embed.proj.weight, vit.patch_embed.proj.bias, vit.pos_embed, vit.cls_token):
            param.mul_(10)
        for block in vit.blocks:
            block.attn.q_bias.normal_(std=0.5)
            block.attn.v_bias.normal_(std=0.5)
    torch.save(vit.state_dict(), dst / "model.pth")
    return dst


@pytest.fixture(scope="module")
def env(tiny_parts, tiny_llm, tmp_path_factory):
    """The tiny parts for both model types (the chat type gets a tiny chat checkpoint), with a ViT of fixed weights."""
    chat_llm = make_tiny_internlm2(tmp_path_factory.mktemp("export-chat-llm"), chat=True)
    vit = write_vit_weights(tiny_parts["vit"], tmp_path_factory.mktemp("export-vit"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAVIS_EXT_BERT", str(tiny_parts["bert"]))
        mp.setenv("LAVIS_EXT_VIT", str(vit))
        mp.setenv("LAVIS_EXT_TINY_LLM", str(tiny_llm))
        mp.setenv("LAVIS_EXT_INTERNLM2_CHAT_1_8B", str(chat_llm))
        mp.delenv("LAVIS_EXT_STAGE1_CKPT", raising=False)
        yield {"tiny": tiny_llm, "pretrain_internlm2_chat_1_8b": chat_llm}


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("export-cfg") / "export.yaml"
    path.write_text("model:\n  arch: blip2_internlm\n  model_type: tiny\n")
    return path


def options_of(variant: str) -> list[str]:
    model_type, options = VARIANTS[variant]
    return [f"model.model_type={model_type}", *options]


def trained_checkpoint(cfg_path: Path, options: list[str], path: Path, seed: int = 1) -> Path:
    """A runner_ext-layout checkpoint: every trainable parameter moved away from its
    initialisation (LoRA's B starts at zero, so the adapters change the LLM), plus a training config."""
    model = Blip2InternLM.from_config(export_hf.model_config(str(cfg_path), options))
    generator = torch.Generator().manual_seed(seed)
    weights = {name: p.detach() + 0.05 * torch.randn(p.shape, generator=generator)
               for name, p in model.named_parameters() if p.requires_grad}
    config = {"run": {"task": "captioning", "max_epoch": 3, "batch_size_train": 8, "init_lr": 1e-4,
                      "lr_sched": "linear_warmup_cosine_lr", "weight_decay": 0.05, "amp": "bf16"},
              "datasets": {"coco_caption_ext": {}}}
    torch.save({"model": weights, "config": config, "epoch": 2}, path)
    return path


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def exported(request, env, cfg_path, tmp_path_factory):
    """One export per variant with ``--verify``: its directory, report, checkpoint and printed output."""
    variant = request.param
    work = tmp_path_factory.mktemp(f"export-{variant}")
    checkpoint = trained_checkpoint(cfg_path, options_of(variant), work / "checkpoint_2.pth")
    out = work / "hf"
    report = export_hf.run(export_hf.parse_args(["--cfg-path", str(cfg_path), "--checkpoint", str(checkpoint),
                                                 "--out", str(out), "--verify", "--options", *options_of(variant)]))
    llm_path = env[VARIANTS[variant][0]]
    return {"variant": variant, "out": out, "report": report, "checkpoint": checkpoint, "llm_path": llm_path}


def test_transformers_alone_reproduces_lavis_ext(exported):
    report = exported["report"]
    assert report.imported == []  # the HF process never imported lavis_ext or lavis
    assert report.pixel_max_diff == 0.0  # BlipImageProcessor == LAVIS's blip_image_eval
    assert report.logit_cases >= 4  # front prompts (caption, plain, VQA) and one <image> inside the text
    assert report.logits_max_diff <= 1e-4, report.format()
    # what is left besides the post-layernorm eps is float rounding
    assert report.logits_max_diff_same_eps <= 2e-6, report.format()
    assert report.captions and all(lavis == hf for lavis, hf in report.captions), report.format()
    assert report.answers and all(lavis == hf for lavis, hf in report.answers), report.format()
    assert report.hf_decode_mismatches == [], report.format()
    assert report.ok


def test_tokenizers_give_the_same_ids(exported):
    report = exported["report"]
    assert report.probes >= 30
    assert report.token_mismatches == [] and report.decode_mismatches == [], report.format()
    # transformers' slow LlamaTokenizer reads the same files (tokenizer.model) to the same ids
    from transformers import LlamaTokenizer

    slow = LlamaTokenizer.from_pretrained(exported["out"])
    ours = load_internlm2_tokenizer(exported["llm_path"])
    texts = list(export_hf.TOKEN_PROBES)
    assert [slow(t)["input_ids"] for t in texts] == [ours.encode(t) for t in texts]


def test_config_and_generation_config(exported):
    out = exported["out"]
    config = json.loads((out / "config.json").read_text())
    tokenizer = load_internlm2_tokenizer(exported["llm_path"])
    n_pieces = len(tokenizer)
    assert config["model_type"] == "blip-2" and config["text_config"]["model_type"] == "llama"
    assert config["image_token_index"] == n_pieces and config["text_config"]["vocab_size"] == n_pieces + 1
    assert config["num_query_tokens"] == (4 if exported["variant"] == "base" else 32)
    assert config["vision_config"]["layer_norm_eps"] == 1e-6  # the ViT layers' eps (exact)
    assert str(exported["llm_path"]) not in (out / "config.json").read_text()  # no machine paths
    processor = json.loads((out / "processor_config.json").read_text())
    assert processor["num_query_tokens"] == config["num_query_tokens"]
    added = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert added[str(n_pieces)]["content"] == "<image>" and added[str(n_pieces)]["special"]
    assert {added[str(tokenizer.convert_tokens_to_ids(t))]["content"] for t in ("<|im_start|>", "<|im_end|>")} == {
        "<|im_start|>", "<|im_end|>"}
    generation = json.loads((out / "generation_config.json").read_text())
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert generation["eos_token_id"] == (2 if exported["variant"] == "base" else [2, im_end])
    assert generation["suppress_tokens"] == [n_pieces]
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()


def test_weights_are_renamed_and_lora_merged(exported):
    weights = load_file(str(exported["out"] / "model.safetensors"))
    assert not [k for k in weights if "lora" in k or k.startswith(("visual_encoder.", "llm.", "Qformer"))]
    qkv_bias = weights["vision_model.encoder.layers.0.self_attn.qkv.bias"]
    width = qkv_bias.numel() // 3
    assert torch.equal(qkv_bias[width:2 * width], torch.zeros(width))  # EVA has no k bias
    assert not torch.equal(qkv_bias[:width], torch.zeros(width))
    embed = weights["language_model.model.embed_tokens.weight"]
    assert torch.equal(embed[-1], torch.zeros(embed.shape[1]))  # the <image> row
    base = load_internlm2_llm(exported["llm_path"]).state_dict()["model.layers.0.self_attn.q_proj.weight"]
    merged = weights["language_model.model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(merged, base) == (exported["variant"] == "base")  # LoRA changed q_proj, merged in


def test_model_card(exported):
    card = (exported["out"] / "README.md").read_text()
    assert "Blip2ForConditionalGeneration.from_pretrained" in card and "Blip2Processor.from_pretrained" in card
    assert "checkpoint_2.pth" in card and "coco_caption_ext" in card and "epochs: `3`" in card
    assert 'from_pretrained("hf"' in card  # the export's own name
    assert ("apply_chat_template" in card) == (exported["variant"] == "chat_lora")
    assert (f"LoRA rank {LORA_RANK}" in card) == (exported["variant"] == "chat_lora")


# --------------------------------------------------------------------------- bad input


def error_of(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        export_hf.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_checkpoint_is_one_clear_error(env, cfg_path, tmp_path, capsys):
    bad = tmp_path / "checkpoint.pth"
    bad.write_bytes(b"not a checkpoint")
    err = error_of(["--cfg-path", str(cfg_path), "--checkpoint", str(bad), "--out", str(tmp_path / "hf")], capsys)
    assert err.startswith("error: --checkpoint") and str(bad) in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists()


def test_checkpoint_of_another_architecture_is_refused(env, cfg_path, tmp_path, capsys):
    """A checkpoint with 8 queries against the yaml's 4, and a LoRA checkpoint without lora_rank."""
    eight = trained_checkpoint(cfg_path, ["model.num_query_token=8"], tmp_path / "eight.pth")
    err = error_of(["--cfg-path", str(cfg_path), "--checkpoint", str(eight), "--out", str(tmp_path / "a")], capsys)
    assert "does not match the model" in err and "query_tokens" in err and str(cfg_path) in err
    lora = trained_checkpoint(cfg_path, [f"model.lora_rank={LORA_RANK}"], tmp_path / "lora.pth")
    err = error_of(["--cfg-path", str(cfg_path), "--checkpoint", str(lora), "--out", str(tmp_path / "b")], capsys)
    assert "unexpected keys" in err and "lora_A" in err


def test_out_dir_must_be_empty_unless_overwrite(env, cfg_path, tmp_path, capsys):
    checkpoint = trained_checkpoint(cfg_path, options_of("base"), tmp_path / "checkpoint.pth")
    argv = ["--cfg-path", str(cfg_path), "--checkpoint", str(checkpoint)]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    err = error_of([*argv, "--out", str(busy)], capsys)
    assert "exists and is not empty" in err and "--overwrite" in err
    err = error_of([*argv, "--out", str(busy), "--overwrite"], capsys)  # not an earlier export: left alone
    assert "left alone" in err and (busy / "notes.txt").read_text() == "mine"
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "config.json").write_text("{}")  # an earlier export
    assert export_hf.main([*argv, "--out", str(tmp_path / "again"), "--overwrite"]) is None
    assert json.loads((tmp_path / "again" / "config.json").read_text())["model_type"] == "blip-2"


def test_unknown_option_is_refused(env, cfg_path, tmp_path, capsys):
    err = error_of(["--cfg-path", str(cfg_path), "--checkpoint", str(tmp_path / "x.pth"), "--out", str(tmp_path / "o"),
                    "--options", "run.max_epoch=2"], capsys)
    assert "run.max_epoch" in err and "model.<key>=value" in err
