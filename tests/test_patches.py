"""Each patch is needed: its case passes with all patches (in this process, where conftest
applied them), and in a fresh process with that one patch skipped it fails with the very error the
patch fixes. A patch with nothing to fix on this machine (CUDA present, spaCy or torchvision's own
ops installed) says so, and its case passes without it too: the patch is a no-op here.

This module imports no lavis-ext or LAVIS at its top, so that its case functions can run in a
process where the patches have not been applied (:func:`fresh.run_in_fresh_process`).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import socket
import subprocess
import sys
import warnings

import pytest
import torch

from fresh import REPO, run_in_fresh_process

NO_CUDA = not torch.cuda.is_available()


class NothingToFixHere(UserWarning):
    """A patch whose upstream problem does not arise on this machine."""


def here(case, env: dict) -> None:
    """``case`` in this process, with all patches; the environment variables and the process
    group it sets are undone afterwards."""
    import torch.distributed as dist

    saved = dict(os.environ)
    os.environ.update(env)
    try:
        case()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


def fails_without(patch: str, case, error: str, env: dict, needed_here: bool = True) -> None:
    """With ``patch`` skipped, ``case`` fails in a fresh process with ``error`` (a regex on the
    exception it raises); where the patch has nothing to fix, it passes without it."""
    run = run_in_fresh_process(case, dict(env, LAVIS_EXT_SKIP_PATCHES=patch))
    if not needed_here:
        warnings.warn(f"{patch}: nothing to fix on this machine; {case.__name__} passes without it", NothingToFixHere)
        assert run.error is None, run.output
        return
    assert run.error is not None, f"{patch} skipped, yet {case.__name__} passed"
    assert re.search(error, run.error), f"{patch} skipped: not the error it fixes: {run.error}\n{run.output}"


def check_patch(patch: str, case, error: str, env: dict, needed_here: bool = True) -> None:
    here(case, env)
    fails_without(patch, case, error, env, needed_here)


def tiny_blip2(vit_precision="fp32", **paths):
    """Stock LAVIS ``blip2`` at tiny sizes; BERT and ViT from the config, by default the tiny parts."""
    from omegaconf import OmegaConf
    from lavis.common.registry import registry

    paths = {"bert_path": os.environ["LAVIS_EXT_BERT"], "vit_path": os.environ["LAVIS_EXT_VIT"], **paths}
    cfg = OmegaConf.create(dict(vit_model="eva_clip_g", image_size=32, num_query_token=4, vit_precision=vit_precision,
                                freeze_vit=True, load_finetuned=False, pretrained="", **paths))
    return registry.get_model_class("blip2").from_config(cfg)


def one_process_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)


def batch():
    torch.manual_seed(0)
    return {"image": torch.randn(2, 3, 32, 32), "text_input": ["a red circle", "a blue square"]}


def test_every_patch_has_its_test():
    import lavis_ext_patches as patches

    assert all(f"test_{name}" in globals() for name in patches.PATCHES)


# --------------------------------------------------------------------------- import


def case_import():
    import lavis_ext  # noqa: F401
    import lavis  # noqa: F401


def torchvision_ops_load() -> bool:
    """Whether torchvision imports on its own here (its C++ ops load), without lavis-ext."""
    result = subprocess.run([sys.executable, "-c", "import torchvision"], cwd=REPO, capture_output=True)
    return result.returncode == 0


def spacy_installed() -> bool:
    try:
        importlib.metadata.version("spacy")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_torchvision_cpu(tiny_env):
    check_patch("torchvision_cpu", case_import, r"operator torchvision::nms does not exist", tiny_env,
                needed_here=not torchvision_ops_load())


def test_transformers_qformer_imports(tiny_env):
    check_patch("transformers_qformer_imports", case_import, r"cannot import name 'apply_chunking_to_forward'",
                tiny_env)


def test_spacy_stub(tiny_env):
    check_patch("spacy_stub", case_import, r"No module named 'spacy'", tiny_env, needed_here=not spacy_installed())


def test_spacy_stub_hints_at_the_install():
    import lavis_ext  # noqa: F401
    import spacy

    if spacy_installed():
        pytest.skip("spaCy is installed: the stand-in is not used")
    with pytest.raises((OSError, ImportError), match="pip install spacy"):
        spacy.load("en_core_web_sm")


# --------------------------------------------------------------------------- building and generating


def case_greedy_generate():
    import lavis_ext  # noqa: F401

    model = tiny_blip2().eval()
    captions = model.generate(batch(), num_beams=1, max_length=6, min_length=2)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_qformer_generation_mixin(tiny_env):
    check_patch("qformer_generation_mixin", case_greedy_generate,
                r"'BertLMHeadModel' object has no attribute 'generate'", tiny_env)


def case_beam_generate():
    import lavis_ext  # noqa: F401

    model = tiny_blip2().eval()
    assert len(model.generate(batch(), num_beams=3, max_length=6, min_length=2)) == 2


def test_qformer_beam_search(tiny_env):
    check_patch("qformer_beam_search", case_beam_generate, r"Sizes of tensors must match except in dimension 1",
                tiny_env)


def case_offline_build():
    """The parts come from the config's paths; a second config with other paths gets its own."""
    import lavis_ext  # noqa: F401
    from lavis_ext import blip2_parts
    from lavis_ext import local_paths

    model = tiny_blip2()
    assert model.Qformer.config.hidden_size == 32 and model.visual_encoder.num_features == 32
    with pytest.raises(local_paths.LocalPathError, match=r"model\.bert_path .*= '/no/such/bert': no such directory"):
        tiny_blip2(bert_path="/no/such/bert")
    assert blip2_parts.weights_in_build().bert_path == os.environ["LAVIS_EXT_BERT"]  # nothing left from those builds


def test_offline_blip2(tiny_env):
    check_patch("offline_blip2", case_offline_build, r"requires the protobuf library|offline mode|couldn't connect",
                tiny_env)


def case_fp16_vit_on_cpu():
    """vit_precision fp16 trains: on CPU with a fp32 ViT (the patch), on CUDA with fp16 weights (as upstream)."""
    import lavis_ext  # noqa: F401

    one_process_group()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_blip2(vit_precision="fp16").to(device)
    model({k: v.to(device) if torch.is_tensor(v) else v for k, v in batch().items()}).loss.backward()
    expected = torch.float16 if device == "cuda" else torch.float32
    assert model.visual_encoder.patch_embed.proj.weight.dtype == expected


def test_cpu_fp16(tiny_env):
    check_patch("cpu_fp16", case_fp16_vit_on_cpu, r"Input type \(float\) and bias type \(c10::Half\)", tiny_env,
                needed_here=NO_CUDA)


# --------------------------------------------------------------------------- checkpoints and paths


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


def test_offline_checkpoints(tiny_env):
    check_patch("offline_checkpoints", case_empty_pretrained, r"checkpoint url or path is invalid", tiny_env)


def case_cache_root():
    import lavis_ext  # noqa: F401
    from lavis.common.registry import registry

    assert not registry.get_path("cache_root").startswith("/export"), registry.get_path("cache_root")


def test_cache_root(tiny_env):
    check_patch("cache_root", case_cache_root, r"AssertionError: /export/home/\.cache/lavis", tiny_env)


def case_model_type_option():
    import argparse

    import lavis_ext  # noqa: F401
    from lavis.common.config import Config

    args = argparse.Namespace(cfg_path=str(REPO / "lavis_ext/projects/blip2/train/pretrain_stage2_internlm2_1_8b.yaml"),
                              options=["model.model_type=pretrain_internlm2_chat_1_8b"])
    assert Config(args).model_cfg.get("use_chat_template") is True, "--options model.model_type=... was ignored"


def test_model_type_option(tiny_env):
    check_patch("model_type_option", case_model_type_option, r"--options model\.model_type=\.\.\. was ignored",
                tiny_env)


# --------------------------------------------------------------------------- single process and CPU


def case_forward_without_process_group():
    import lavis_ext  # noqa: F401

    model = tiny_blip2()
    model(batch()).loss.backward()


def test_single_process(tiny_env):
    check_patch("single_process", case_forward_without_process_group,
                r"Default process group has not been initialized", tiny_env)


def case_dist_init_cpu():
    from argparse import Namespace

    import lavis_ext  # noqa: F401
    import torch.distributed as dist
    from lavis.common.dist_utils import init_distributed_mode

    with socket.socket() as probe:  # a free port: other tests' jobs may run beside this one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    args = Namespace(dist_url="env://")
    init_distributed_mode(args)
    assert args.distributed and dist.get_backend() == ("nccl" if torch.cuda.is_available() else "gloo")


def test_dist_init_gloo(tiny_env):
    check_patch("dist_init_gloo", case_dist_init_cpu, r"_cuda_setDevice|Torch not compiled with CUDA enabled",
                tiny_env, needed_here=NO_CUDA)


def case_prefetch_loader():
    import lavis_ext  # noqa: F401
    from lavis.runners import runner_base
    from torch.utils.data import DataLoader

    loader = runner_base.PrefetchLoader(DataLoader(list(range(6)), batch_size=2))
    assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4, 5]]


def test_prefetch_loader_cpu(tiny_env):
    check_patch("prefetch_loader_cpu", case_prefetch_loader, r"torch\.cuda\.Stream requires CUDA support", tiny_env,
                needed_here=NO_CUDA)


def case_logger_sync():
    import lavis_ext  # noqa: F401
    from lavis.common.logger import SmoothedValue

    one_process_group()
    value = SmoothedValue()
    value.update(2.0)
    value.update(4.0)
    value.synchronize_between_processes()
    assert value.count == 2 and value.global_avg == 3.0


def test_logger_cpu_sync(tiny_env):
    check_patch("logger_cpu_sync", case_logger_sync, r"Torch not compiled with CUDA enabled", tiny_env,
                needed_here=NO_CUDA)


# --------------------------------------------------------------------------- every patch


def test_spacy_stub_answers_find_spec():
    """The usual probe for an optional package must not raise on the stand-in (transformers does it on import)."""
    import lavis_ext  # noqa: F401

    importlib.util.find_spec("spacy")


def test_patches_are_idempotent():
    import lavis_ext  # noqa: F401
    import lavis_ext_patches as patches
    from lavis.common import dist_utils
    from lavis.common.config import Config
    from lavis.common.logger import SmoothedValue
    from lavis.models import base_model, eva_vit
    from lavis.models.base_model import BaseModel
    from lavis.models.blip2_models import blip2
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer
    from lavis.models.blip2_models.Qformer import BertLMHeadModel
    from lavis.runners import runner_base
    from lavis_ext_patches import qformer_beam_search

    def patched():
        return (BertLMHeadModel.__bases__, blip2.Blip2Base.__dict__["init_tokenizer"], blip2.create_eva_vit_g,
                BaseModel.load_checkpoint_from_config, eva_vit.convert_weights_to_fp16, base_model.all_gather_with_grad,
                dist_utils.init_distributed_mode, runner_base.PrefetchLoader, SmoothedValue.synchronize_between_processes,
                Config.__dict__["build_model_config"])

    before = patched()
    patches.apply_all()
    patches.apply_all()
    assert all(a is b or a == b for a, b in zip(patched(), before))
    # re-applied, generate is re-wrapped once: no_grad around the patch's function, not around an older wrapper
    assert Blip2Qformer.generate.__wrapped__ is qformer_beam_search.generate


def test_unknown_skip_name_is_refused(monkeypatch):
    import lavis_ext_patches as patches

    monkeypatch.setenv("LAVIS_EXT_SKIP_PATCHES", "no_such_patch")
    with pytest.raises(ValueError, match="no_such_patch"):
        patches.skipped()


# --------------------------------------------------------------------------- offline_checkpoints


def checkpoint_cfg(**cfg):
    from omegaconf import OmegaConf

    return OmegaConf.create(cfg)


def test_offline_checkpoints_refuse_a_url():
    import lavis_ext  # noqa: F401
    from lavis_ext.local_paths import LocalPathError

    url = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/blip2_pretrained.pth"
    with pytest.raises(LocalPathError, match=r"model\.pretrained = 'https://.*' is a URL; lavis-ext never downloads"):
        tiny_base_model().load_checkpoint_from_config(checkpoint_cfg(load_finetuned=False, pretrained=url))


def test_offline_checkpoints_name_a_missing_file(tmp_path):
    import lavis_ext  # noqa: F401
    from lavis_ext.local_paths import LocalPathError

    missing = tmp_path / "checkpoint_9.pth"
    with pytest.raises(LocalPathError, match=rf"model\.finetuned .*= '{missing}': no such file"):
        tiny_base_model().load_checkpoint_from_config(checkpoint_cfg(load_finetuned=True, finetuned=str(missing)))


def test_offline_checkpoints_load_a_local_file(tmp_path):
    import lavis_ext  # noqa: F401

    source = tiny_base_model()
    torch.save({"model": source.state_dict()}, tmp_path / "ok.pth")
    model = tiny_base_model()
    model.load_checkpoint_from_config(checkpoint_cfg(load_finetuned=True, finetuned=str(tmp_path / "ok.pth")))
    assert torch.equal(model.proj.weight, source.proj.weight)


def case_torchvision_ops_load():
    """Where torchvision's own ops library loads (a CUDA machine), the patch must not define the
    namespace itself: torchvision's registration of it would then fail."""
    registered = []

    def load_library(path):  # what torchvision/_C.so does where it loads: define the torchvision namespace
        library = torch.library.Library("torchvision", "DEF")
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        registered.append((path, library))

    torch.ops.load_library = load_library
    from lavis_ext_patches import torchvision_cpu

    torchvision_cpu.apply()
    torchvision_cpu.apply()
    assert torchvision_cpu._library is None, "the patch defined the torchvision namespace a second time"
    assert len(registered) == 1 and registered[0][0].endswith(".so"), registered


def test_torchvision_cpu_leaves_loadable_ops_alone(tiny_env):
    run = run_in_fresh_process(case_torchvision_ops_load, tiny_env)
    assert run.error is None, run.output
