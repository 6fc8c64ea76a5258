"""Blip2QformerIds (``blip2_qformer_ext``): image-id-aware ITC targets and ITM negatives."""
from __future__ import annotations

import json
import math
import os
import re
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import run_python, torchrun
from lavis_ext.models.blip2_models import blip2_qformer_ids as qids
from lavis_ext.models.blip2_models.blip2_qformer_ids import (
    NO_ID,
    Blip2QformerIds,
    image_ids_to_tensor,
    itc_targets,
    itm_negative_weights,
    positive_mask,
    sample_negatives,
    soft_cross_entropy,
)

SHARED = ["coco_1", "coco_1", "vg_2", "coco_3"]  # captions 0 and 1 show the same image
TEXTS = ["a red circle", "a picture of a red circle", "a blue square", "a green triangle"]
# hand-computed ITC targets for SHARED: rows 0 and 1 split their mass between columns 0 and 1
SHARED_TARGETS = [[0.5, 0.5, 0.0, 0.0],
                  [0.5, 0.5, 0.0, 0.0],
                  [0.0, 0.0, 1.0, 0.0],
                  [0.0, 0.0, 0.0, 1.0]]
HASHED = ["coco_123456", "vg_1", "coco_1", "coco_7", "éclair_1"]


def tiny_cfg(**overrides):
    from omegaconf import OmegaConf

    cfg = dict(vit_model="eva_clip_g", image_size=32, num_query_token=4, vit_precision="fp32", freeze_vit=True,
               load_finetuned=False, pretrained="")
    return OmegaConf.create({**cfg, **overrides})


@pytest.fixture(scope="module")
def build(tiny_parts):
    from lavis.common.registry import registry

    def build(name="blip2_qformer_ext", **overrides):
        torch.manual_seed(0)
        paths = {"bert_path": str(tiny_parts["bert"]), "vit_path": str(tiny_parts["vit"])}
        return registry.get_model_class(name).from_config(tiny_cfg(**paths, **overrides))

    return build


@pytest.fixture(scope="module")
def model(build):
    return build()


def batch(image_id=None, n=4):
    torch.manual_seed(1)
    samples = {"image": torch.randn(n, 3, 32, 32), "text_input": TEXTS[:n]}
    if image_id is not None:
        samples["image_id"] = image_id
    return samples


# --------------------------------------------------------------------------- ids


def test_registered_next_to_stock():
    from lavis.common.registry import registry
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

    assert registry.get_model_class("blip2_qformer_ext") is Blip2QformerIds
    assert registry.get_model_class("blip2") is Blip2Qformer
    assert Blip2QformerIds.PRETRAINED_MODEL_CONFIG_DICT == Blip2Qformer.PRETRAINED_MODEL_CONFIG_DICT


def test_image_ids_to_tensor_values():
    ids = image_ids_to_tensor([5, "42", "007", "coco_123456", "vg_1", "coco_1", "coco_1", None], torch.device("cpu"))
    assert ids.dtype == torch.long and ids.shape == (8,)
    assert ids[:3].tolist() == [5, 42, 7]
    assert (ids[3:7] >= 0).all()
    assert ids[5] == ids[6]  # equal strings, equal ids
    assert ids[4] != ids[5]  # vg_1 != coco_1: the prefix is hashed too
    assert ids[3] != 123456 and ids[5] != 1  # a prefixed id is not the bare number
    assert ids[7] == NO_ID
    assert image_ids_to_tensor(torch.tensor([[3], [4]])).tolist() == [3, 4]
    assert image_ids_to_tensor("coco_1").tolist() == image_ids_to_tensor(["coco_1"]).tolist()
    assert image_ids_to_tensor([torch.tensor(9), "9"]).tolist() == [9, 9]
    assert image_ids_to_tensor(["99999999999999999999"]).item() >= 0  # > int64: hashed, not overflowed
    with pytest.raises(ValueError):
        image_ids_to_tensor([-3])
    with pytest.raises(TypeError):
        image_ids_to_tensor([1.5])


def test_hashed_ids_same_in_fresh_process():
    code = ("import json; from lavis_ext.models.blip2_models.blip2_qformer_ids import image_ids_to_tensor; "
            f"print('IDS', json.dumps(image_ids_to_tensor({HASHED!r}).tolist()))")
    env = dict(os.environ, PYTHONHASHSEED="12345")  # Python's hash() would change with this
    result = run_python(["-c", code], env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    fresh = json.loads(re.search(r"^IDS (.*)$", result.stdout, re.M).group(1))
    assert fresh == image_ids_to_tensor(HASHED).tolist()
    assert len(set(fresh)) == len(HASHED)


# --------------------------------------------------------------------------- targets, losses, negatives


def test_itc_targets_shared_image():
    ids = image_ids_to_tensor(SHARED)
    assert itc_targets(ids, ids).tolist() == SHARED_TARGETS
    # as rank 1 of 2: the other rank's copy of coco_1 (column 0) is a positive too
    other = image_ids_to_tensor(["coco_1", "vg_9", "coco_8", "coco_5"])
    targets = itc_targets(ids, torch.cat([other, ids]), rank=1)
    assert targets[0].tolist() == pytest.approx([1 / 3, 0, 0, 0, 1 / 3, 1 / 3, 0, 0])
    assert targets[2].tolist() == [0, 0, 0, 0, 0, 0, 1, 0]


def test_itc_targets_without_ids_are_stock_diagonal():
    none = Blip2QformerIds.batch_image_ids({}, 4, torch.device("cpu"))
    assert none.tolist() == [NO_ID] * 4
    assert torch.equal(itc_targets(none, none), torch.eye(4))
    # rank 1 of 2: identity at column offset rank * bs, as stock's linspace targets
    assert torch.equal(itc_targets(none, torch.cat([none, none]), rank=1), torch.cat([torch.zeros(4, 4), torch.eye(4)], 1))
    # None entries are positive only with themselves, even next to one another
    partial = image_ids_to_tensor(["coco_1", None, "coco_1", None])
    assert positive_mask(partial, partial).int().tolist() == [[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]]


def test_soft_cross_entropy_equals_stock_with_one_hot():
    torch.manual_seed(0)
    logits = torch.randn(4, 8)
    labels = torch.tensor([4, 5, 6, 7])
    one_hot = F.one_hot(labels, 8).float()
    expected = F.cross_entropy(logits, labels, label_smoothing=0.1)
    assert torch.allclose(soft_cross_entropy(logits, one_hot, 0.1), expected, atol=1e-6)
    # upstream HEAD's form: 0.9 * targets + 0.1 / n
    targets = torch.tensor(SHARED_TARGETS)
    head = -(F.log_softmax(logits[:, :4], 1) * (0.9 * targets + 0.1 / 4)).sum(1).mean()
    assert torch.allclose(soft_cross_entropy(logits[:, :4], targets, 0.1), head, atol=1e-6)


def test_itm_negatives_never_share_the_image_id():
    torch.manual_seed(0)
    ids = image_ids_to_tensor(SHARED)
    pos = positive_mask(ids, ids)
    sim = torch.randn(4, 4)
    sim[0, 1] = sim[1, 0] = 50.0  # the same-image caption is by far the "hardest" negative
    weights = itm_negative_weights(sim, pos)
    assert torch.equal(weights == 0, pos)  # exactly the same-id pairs are zeroed, not just the diagonal
    draws = torch.stack([sample_negatives(weights) for _ in range(200)], 1)  # [4, 200]
    assert not pos.gather(1, draws).any()
    assert set(draws[0].tolist()) <= {2, 3} and set(draws[1].tolist()) <= {2, 3}


def test_itm_negatives_fall_back_when_every_sample_is_one_image():
    ids = image_ids_to_tensor(["coco_1"] * 3)
    weights = itm_negative_weights(torch.zeros(3, 6), positive_mask(ids, torch.cat([ids, ids]), rank=1), rank=1)
    # no other image anywhere: only the sample's own column (rank * bs + i) is excluded
    assert (weights == 0).nonzero().tolist() == [[0, 3], [1, 4], [2, 5]]


# --------------------------------------------------------------------------- the model


COCO_VG_TARGETS = [[0.5, 0.0, 0.5, 0.0],  # coco_9 at 0 and 2; vg_9 is another image
                   [0.0, 1.0, 0.0, 0.0],
                   [0.5, 0.0, 0.5, 0.0],
                   [0.0, 0.0, 0.0, 1.0]]
EYE = [[float(i == j) for j in range(4)] for i in range(4)]


@pytest.mark.parametrize("image_id,expected", [
    pytest.param(SHARED, SHARED_TARGETS, id="string-ids"),
    pytest.param([11, 11, 12, 13], SHARED_TARGETS, id="int-ids"),
    pytest.param(torch.tensor([11, 11, 12, 13]), SHARED_TARGETS, id="tensor-ids"),
    pytest.param(["coco_9", "vg_9", "coco_9", "vg_3"], COCO_VG_TARGETS, id="coco+vg"),
    pytest.param(None, EYE, id="no-ids"),
])
def test_forward_backward(model, image_id, expected):
    model.zero_grad(set_to_none=True)
    out = model(batch(image_id))
    for name in ("loss", "loss_itc", "loss_itm", "loss_lm"):
        assert math.isfinite(out[name].item()), name
    out.loss.backward()
    assert model.query_tokens.grad is not None and model.query_tokens.grad.abs().sum() > 0
    qformer_grads = [p.grad for p in model.Qformer.parameters() if p.grad is not None]
    assert qformer_grads and any(g.abs().sum() > 0 for g in qformer_grads)
    assert all(p.grad is None for p in model.visual_encoder.parameters())  # frozen ViT
    assert out.sims.sim_i2t_targets.tolist() == expected  # hand-written targets


def test_forward_uses_shared_image_targets(model):
    out = model(batch(SHARED))
    assert out.sims.sim_i2t_targets.tolist() == SHARED_TARGETS
    assert model(batch(["coco_9", "vg_9", "coco_9", "vg_3"])).sims.sim_t2i_targets.tolist() == COCO_VG_TARGETS


def test_forward_samples_itm_negatives_from_other_images(model, monkeypatch):
    seen = []

    def spy(weights):
        seen.append(weights.clone())
        return sample_negatives(weights)

    monkeypatch.setattr(qids, "sample_negatives", spy)
    model(batch(SHARED))
    pos = torch.tensor(SHARED_TARGETS) > 0
    assert len(seen) == 2  # negative images for texts, negative texts for images
    assert all(torch.equal(w == 0, pos) for w in seen)


def test_without_ids_itc_and_lm_equal_stock(build, model):
    stock = build("blip2")
    stock.load_state_dict(model.state_dict())
    ours, theirs = model(batch()), stock(batch())
    assert torch.allclose(ours.loss_itc, theirs.loss_itc, atol=1e-6)
    assert torch.allclose(ours.loss_lm, theirs.loss_lm, atol=1e-6)


def test_from_config_passes_embed_dim(build):
    assert build(embed_dim=16).vision_proj.out_features == 16
    assert build().text_proj.out_features == 256


def test_wrong_number_of_ids_raises(model):
    with pytest.raises(ValueError, match="3 ids for a batch of 4"):
        model(batch(["coco_1", "coco_2", "coco_3"]))


# --------------------------------------------------------------------------- two ranks

DDP_SCRIPT = textwrap.dedent('''
    import json, os, sys, torch, torch.distributed as dist
    import lavis_ext  # patches first: before anything imports lavis
    from omegaconf import OmegaConf
    from lavis.common.registry import registry
    from lavis_ext.models.blip2_models.blip2_qformer_ids import itm_negative_weights

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the tiny BERT and ViT: LAVIS_EXT_BERT/LAVIS_EXT_VIT, the paths' defaults
    cfg = OmegaConf.create(dict(vit_model="eva_clip_g", image_size=32, num_query_token=4, vit_precision="fp32",
                                freeze_vit=True, load_finetuned=False, pretrained=""))
    model = registry.get_model_class("blip2_qformer_ext").from_config(cfg)
    torch.manual_seed(rank)
    ids = [["coco_7", "coco_1"], ["vg_3", "coco_7"]][rank]
    samples = {"image": torch.randn(2, 3, 32, 32), "text_input": ["a red circle", "a blue square"], "image_id": ids}
    out = model(samples)
    out.loss.backward()
    targets = out.sims.sim_i2t_targets
    weights = itm_negative_weights(out.sims.sim_t2i, targets > 0, rank)
    result = {"TARGETS": targets.tolist(), "ITM_ZERO": (weights == 0).nonzero().tolist(), "LOSS": out.loss.item()}
    # rank 1's batch has no ids (e.g. VG): both ranks still gather, nobody hangs
    if rank == 1:
        del samples["image_id"]
    out = model(samples)
    out.loss.backward()
    result["MIXED"] = out.sims.sim_i2t_targets.tolist()
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:  # one file per rank: stdout interleaves
        json.dump(result, f)
    dist.destroy_process_group()
''')


def test_two_ranks_share_positives(tiny_env, tmp_path):
    script = tmp_path / "ids_two_ranks.py"
    script.write_text(DDP_SCRIPT)
    result = torchrun([str(script), str(tmp_path)], tiny_env, nproc=2, timeout=120)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])

    def line(rank, key):
        return json.loads((tmp_path / f"rank{rank}.json").read_text())[key]

    # global ids: [coco_7, coco_1 | vg_3, coco_7]; coco_7 sits at column 0 (rank 0) and 3 (rank 1)
    assert line(0, "TARGETS") == [[0.5, 0, 0, 0.5], [0, 1, 0, 0]]
    assert line(1, "TARGETS") == [[0, 0, 1, 0], [0.5, 0, 0, 0.5]]
    # ITM: each rank zeroes the other rank's coco_7 as well as its own column
    assert line(0, "ITM_ZERO") == [[0, 0], [0, 3], [1, 1]]
    assert line(1, "ITM_ZERO") == [[0, 2], [1, 0], [1, 3]]
    for rank in (0, 1):
        assert math.isfinite(line(rank, "LOSS"))
    # rank 1 without ids: stock diagonal there, and rank 0's coco_7 no longer matches column 3
    assert line(0, "MIXED") == [[1, 0, 0, 0], [0, 1, 0, 0]]
    assert line(1, "MIXED") == [[0, 0, 1, 0], [0, 0, 0, 1]]
