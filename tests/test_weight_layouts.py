"""Loading the shared parts' weights from files in their real layouts: a single-file EVA-ViT state
dict (position embeddings interpolated, the extra last block ignored, missing keys refused) and a
``bert-base-uncased``-layout directory with weights (``BertLMHeadModel.from_pretrained``)."""
from __future__ import annotations

import json
import shutil
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file

from lavis.common.registry import registry
from lavis_ext import blip2_parts
from lavis_ext.tiny.blip2 import make_tiny_vit, write_bert_base_uncased_layout, write_eva_vit_state_dict

PRETRAIN_SIZE, BUILD_SIZE = 32, 48  # patch 8: a 4x4 grid in the file, 6x6 in the model


@pytest.fixture
def eva_file(tmp_path):
    vit_dir = make_tiny_vit(tmp_path / "vit")
    return vit_dir, write_eva_vit_state_dict(tmp_path / "eva_vit_g.pth", vit_dir, PRETRAIN_SIZE)


def interpolated(pos_embed: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """The [CLS] position kept, the old x old grid resized bicubically to new x new (as EVA/DeiT do)."""
    grid = pos_embed[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)], dim=1)


def assert_loaded(vit, saved: dict):
    state = vit.state_dict()
    assert saved["pos_embed"].shape[1] == 1 + 4 * 4 and state["pos_embed"].shape[1] == 1 + 6 * 6
    torch.testing.assert_close(state["pos_embed"], interpolated(saved["pos_embed"], 4, 6))
    for key, value in state.items():
        if key != "pos_embed":
            assert torch.equal(value, saved[key]), key
    depth = len(vit.blocks)
    assert any(k.startswith(f"blocks.{depth}.") for k in saved)  # the file's extra block, ignored


def test_eva_vit_directory_with_model_pth_loads_and_interpolates(eva_file):
    vit_dir, pth = eva_file
    shutil.copy(pth, vit_dir / "model.pth")
    vit = blip2_parts.build_vision_encoder("eva_clip_g", str(vit_dir), BUILD_SIZE)
    assert_loaded(vit, torch.load(pth))


def test_eva_vit_single_file_path_tiny_arch_shortcut(eva_file, monkeypatch):
    """``vit_path`` = the .pth file itself builds the stock ViT-g (1B parameters); the shortcut gives
    the stock factory the tiny architecture, and the file goes through the single-file path."""
    vit_dir, pth = eva_file
    arch = json.loads((vit_dir / "config.json").read_text())
    monkeypatch.setitem(blip2_parts.VISION_ARCHS, "eva_clip_g", partial(blip2_parts.VISION_ARCHS["eva_clip_g"], **arch))
    vit = blip2_parts.build_vision_encoder("eva_clip_g", str(pth), BUILD_SIZE)
    assert_loaded(vit, torch.load(pth))


def test_eva_vit_file_with_missing_keys_is_refused(eva_file):
    vit_dir, pth = eva_file
    state = torch.load(pth)
    del state["blocks.1.mlp.fc1.weight"]
    torch.save(state, vit_dir / "model.pth")
    with pytest.raises(RuntimeError, match=r"model\.vit_path = .*model\.pth: not a eva_clip_g checkpoint; "
                                           r"missing keys \['blocks\.1\.mlp\.fc1\.weight'\]"):
        blip2_parts.build_vision_encoder("eva_clip_g", str(vit_dir), BUILD_SIZE)


def test_bert_base_uncased_layout_loads_into_the_qformer(tmp_path, tiny_parts):
    """Stage 1 from a BERT directory with weights: the Q-Former holds BERT's weights, and its query
    FFNs start as copies of the text FFNs (``Blip2Qformer.__init__``); cross-attention is new."""
    bert = write_bert_base_uncased_layout(tmp_path / "bert")
    assert json.loads((bert / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    tokenizer = blip2_parts.build_bert_tokenizer(str(bert))
    assert tokenizer.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [0, 100, 101, 102, 103]
    saved = load_file(bert / "model.safetensors")
    cfg = OmegaConf.create(dict(vit_model="eva_clip_g", image_size=32, num_query_token=4, vit_precision="fp32",
                                freeze_vit=True, load_finetuned=False, pretrained="", bert_path=str(bert),
                                vit_path=str(tiny_parts["vit"])))
    qformer = registry.get_model_class("blip2").from_config(cfg).Qformer.state_dict()
    for key in ("bert.encoder.layer.1.attention.self.query.weight", "bert.encoder.layer.0.output.dense.bias",
                "bert.embeddings.LayerNorm.weight", "cls.predictions.transform.dense.weight"):
        assert torch.equal(qformer[key], saved[key]), key
    vocab = saved["bert.embeddings.word_embeddings.weight"]
    assert torch.equal(qformer["bert.embeddings.word_embeddings.weight"][:len(vocab)], vocab)  # + [DEC]
    query_ffn = qformer["bert.encoder.layer.0.intermediate_query.dense.weight"]
    assert torch.equal(query_ffn, saved["bert.encoder.layer.0.intermediate.dense.weight"])
    assert "bert.encoder.layer.0.crossattention.self.key.weight" in qformer
    assert not any("crossattention" in k for k in saved)
