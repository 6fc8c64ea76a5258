"""One small program per patch, run in a subprocess by tests/test_patches.py.

``python tests/patch_cases.py CASE`` exits 0 when the behaviour the patch provides holds.
The test runs each case with all patches, and again with ``LAVIS_EXT_SKIP_PATCHES=<patch>``,
where it must fail.
"""
from __future__ import annotations

import os
import sys

import torch


def tiny_blip2(vit_precision="fp32"):
    from omegaconf import OmegaConf
    from lavis.common.registry import registry
    from lavis_ext import offline

    offline.configure({"bert_path": os.environ["LAVIS_EXT_BERT"], "vit_path": os.environ["LAVIS_EXT_VIT"]})
    cfg = OmegaConf.create(dict(vit_model="eva_clip_g", image_size=32, num_query_token=4, vit_precision=vit_precision,
                                freeze_vit=True, load_finetuned=False, pretrained=""))
    return registry.get_model_class("blip2").from_config(cfg)


def one_process_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)


def batch():
    torch.manual_seed(0)
    return {"image": torch.randn(2, 3, 32, 32), "text_input": ["a red circle", "a blue square"]}


def case_import():
    import lavis_ext  # noqa: F401
    import lavis  # noqa: F401


def case_spacy_hint():
    import lavis_ext  # noqa: F401
    import spacy

    try:
        spacy.load("en_core_web_sm")
    except (OSError, ImportError) as e:
        assert "pip install spacy" in str(e), e
    else:
        raise AssertionError("stub spacy.load should raise")


def case_greedy_generate():
    import lavis_ext  # noqa: F401

    model = tiny_blip2().eval()
    captions = model.generate(batch(), num_beams=1, max_length=6, min_length=2)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def case_beam_generate():
    import lavis_ext  # noqa: F401

    model = tiny_blip2().eval()
    assert len(model.generate(batch(), num_beams=3, max_length=6, min_length=2)) == 2


def case_offline_build():
    import lavis_ext  # noqa: F401

    model = tiny_blip2()
    assert model.Qformer.config.hidden_size == 32 and model.visual_encoder.num_features == 32


def tiny_base_model():
    """A LAVIS BaseModel with one layer; stage-1 loading as Blip2Base does it (blip2.py: load_from_pretrained)."""
    from lavis.models.base_model import BaseModel

    class Tiny(BaseModel):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(2, 1)

        def load_from_pretrained(self, url_or_filename):
            return self.load_checkpoint(url_or_filename)

    return Tiny()


def case_empty_pretrained():
    import lavis_ext  # noqa: F401
    from omegaconf import OmegaConf

    assert tiny_base_model().load_checkpoint_from_config(OmegaConf.create({"load_finetuned": False, "pretrained": ""})) is None


def case_cache_root():
    import lavis_ext  # noqa: F401
    from lavis.common.registry import registry

    assert not registry.get_path("cache_root").startswith("/export"), registry.get_path("cache_root")


def case_fp16_vit_on_cpu():
    """vit_precision fp16 trains: on CPU with a fp32 ViT (the patch), on CUDA with fp16 weights (as upstream)."""
    import lavis_ext  # noqa: F401

    one_process_group()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_blip2(vit_precision="fp16").to(device)
    model({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch().items()}).loss.backward()
    expected = torch.float16 if device == "cuda" else torch.float32
    assert model.visual_encoder.patch_embed.proj.weight.dtype == expected


def case_forward_without_process_group():
    import lavis_ext  # noqa: F401

    model = tiny_blip2()
    model(batch()).loss.backward()


def case_dist_init_cpu():
    import lavis_ext  # noqa: F401
    from argparse import Namespace
    from lavis.common.dist_utils import init_distributed_mode
    import torch.distributed as dist

    import socket

    with socket.socket() as probe:  # a free port: other tests' jobs may run beside this one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    args = Namespace(dist_url="env://")
    init_distributed_mode(args)
    assert args.distributed and dist.get_backend() == ("nccl" if torch.cuda.is_available() else "gloo")


def case_prefetch_loader():
    import lavis_ext  # noqa: F401
    from lavis.runners import runner_base
    from torch.utils.data import DataLoader

    loader = runner_base.PrefetchLoader(DataLoader(list(range(6)), batch_size=2))
    assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4, 5]]


def case_logger_sync():
    import lavis_ext  # noqa: F401
    from lavis.common.logger import SmoothedValue

    one_process_group()
    value = SmoothedValue()
    value.update(2.0)
    value.update(4.0)
    value.synchronize_between_processes()
    assert value.count == 2 and value.global_avg == 3.0


def case_model_type_option():
    import argparse

    import lavis_ext  # noqa: F401
    from lavis.common.config import Config

    args = argparse.Namespace(cfg_path="lavis_ext/projects/blip2/train/pretrain_stage2_internlm2_1_8b.yaml",
                              options=["model.model_type=pretrain_internlm2_chat_1_8b"])
    assert Config(args).model_cfg.use_chat_template is True, "--options model.model_type=... was ignored"


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}

if __name__ == "__main__":
    CASES[sys.argv[1]]()
    print("CASE OK")
