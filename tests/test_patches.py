"""Each patch is needed: its case passes with all patches, and with that one skipped it fails with the
very error the patch fixes. A patch with nothing to fix on this machine (CUDA present, spaCy or
torchvision's own ops installed) says so, and its case passes without it too: the patch is a no-op here."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass

import pytest
import torch

from conftest import REPO, run_python
from patch_cases import tiny_base_model

NO_CUDA = not torch.cuda.is_available()


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


@dataclass(frozen=True)
class PatchCase:
    case: str  # the case in tests/patch_cases.py that needs the patch
    error: str  # regex: what the case fails with when the patch is skipped
    needed_here: bool = True  # False: the upstream code works on this machine


@pytest.fixture(scope="session")
def patch_cases() -> dict[str, PatchCase]:
    return {
        "torchvision_cpu": PatchCase("import", r"operator torchvision::nms does not exist", not torchvision_ops_load()),
        "transformers_qformer_imports": PatchCase("import", r"cannot import name 'apply_chunking_to_forward'"),
        "spacy_stub": PatchCase("import", r"No module named 'spacy'", not spacy_installed()),
        "qformer_generation_mixin": PatchCase("greedy_generate", r"'BertLMHeadModel' object has no attribute 'generate'"),
        "offline_blip2": PatchCase("offline_build", r"requires the protobuf library|offline mode|couldn't connect"),
        "offline_checkpoints": PatchCase("empty_pretrained", r"checkpoint url or path is invalid"),
        "cache_root": PatchCase("cache_root", r"AssertionError: /export/home/\.cache/lavis"),
        "cpu_fp16": PatchCase("fp16_vit_on_cpu", r"Input type \(float\) and bias type \(c10::Half\)", NO_CUDA),
        "qformer_beam_search": PatchCase("beam_generate", r"Sizes of tensors must match except in dimension 1"),
        "single_process": PatchCase("forward_without_process_group", r"Default process group has not been initialized"),
        "dist_init_gloo": PatchCase("dist_init_cpu", r"_cuda_setDevice|Torch not compiled with CUDA enabled", NO_CUDA),
        "prefetch_loader_cpu": PatchCase("prefetch_loader", r"torch\.cuda\.Stream requires CUDA support", NO_CUDA),
        "logger_cpu_sync": PatchCase("logger_sync", r"Torch not compiled with CUDA enabled", NO_CUDA),
        "model_type_option": PatchCase("model_type_option", r"--options model\.model_type=\.\.\. was ignored"),
    }


PATCHES = ("torchvision_cpu", "transformers_qformer_imports", "spacy_stub", "qformer_generation_mixin", "offline_blip2",
           "offline_checkpoints", "cache_root", "cpu_fp16", "qformer_beam_search", "single_process", "dist_init_gloo",
           "prefetch_loader_cpu", "logger_cpu_sync", "model_type_option")
CASES = ("import", "greedy_generate", "offline_build", "empty_pretrained", "cache_root", "fp16_vit_on_cpu",
         "beam_generate", "forward_without_process_group", "dist_init_cpu", "prefetch_loader", "logger_sync",
         "model_type_option", "spacy_hint")


class NothingToFixHere(UserWarning):
    """A patch whose upstream problem does not arise on this machine."""


def test_every_patch_has_a_case(patch_cases):
    import patches

    assert set(patch_cases) == set(PATCHES) == set(patches.PATCHES)
    assert {c.case for c in patch_cases.values()} | {"spacy_hint"} == set(CASES)


def run_case(case: str, env: dict, skip: str = ""):
    env = dict(env, LAVIS_EXT_SKIP_PATCHES=skip)
    return run_python(["tests/patch_cases.py", case], env, timeout=120)


@pytest.mark.parametrize("case", CASES)
def test_case_passes_with_all_patches(case, tiny_env):
    result = run_case(case, tiny_env)
    assert result.returncode == 0 and "CASE OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("patch", PATCHES)
def test_case_fails_without_its_patch(patch, patch_cases, tiny_env):
    expected = patch_cases[patch]
    result = run_case(expected.case, tiny_env, skip=patch)
    if not expected.needed_here:
        warnings.warn(f"{patch}: nothing to fix on this machine; its case passes without it", NothingToFixHere)
        assert result.returncode == 0 and "CASE OK" in result.stdout, result.stderr[-3000:]
        return
    assert result.returncode != 0, f"{patch} skipped, yet case {expected.case!r} passed"
    tail = result.stderr[-3000:]
    assert re.search(expected.error, tail), f"{patch} skipped: not the error it fixes:\n{tail}"


def test_spacy_stub_answers_find_spec():
    """The usual probe for an optional package must not raise on the stand-in (transformers does it on import)."""
    import lavis_ext  # noqa: F401

    importlib.util.find_spec("spacy")


def test_patches_are_idempotent():
    import lavis_ext  # noqa: F401
    import patches
    from lavis.common import dist_utils
    from lavis.common.config import Config
    from lavis.common.logger import SmoothedValue
    from lavis.models import base_model, eva_vit
    from lavis.models.base_model import BaseModel
    from lavis.models.blip2_models import blip2
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer
    from lavis.models.blip2_models.Qformer import BertLMHeadModel
    from lavis.runners import runner_base
    from patches import qformer_beam_search

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
    import patches

    monkeypatch.setenv("LAVIS_EXT_SKIP_PATCHES", "no_such_patch")
    with pytest.raises(ValueError, match="no_such_patch"):
        patches.skipped()


# --------------------------------------------------------------------------- offline_checkpoints


def checkpoint_cfg(**cfg):
    from omegaconf import OmegaConf

    return OmegaConf.create(cfg)


def test_offline_checkpoints_refuse_a_url():
    import lavis_ext  # noqa: F401
    from lavis_ext.offline import LocalPathError

    url = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/blip2_pretrained.pth"
    with pytest.raises(LocalPathError, match=r"model\.pretrained = 'https://.*' is a URL; lavis-ext never downloads"):
        tiny_base_model().load_checkpoint_from_config(checkpoint_cfg(load_finetuned=False, pretrained=url))


def test_offline_checkpoints_name_a_missing_file(tmp_path):
    import lavis_ext  # noqa: F401
    from lavis_ext.offline import LocalPathError

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


TORCHVISION_OPS_LOAD = '''
import torch
registered = []


def load_library(path):  # what torchvision/_C.so does where it loads: define the torchvision namespace
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    registered.append((path, library))


torch.ops.load_library = load_library
from patches import torchvision_cpu

torchvision_cpu.apply()
torchvision_cpu.apply()
assert torchvision_cpu._library is None, "the patch defined the torchvision namespace a second time"
assert len(registered) == 1 and registered[0][0].endswith(".so"), registered
print("CASE OK")
'''


def test_torchvision_cpu_leaves_loadable_ops_alone(tiny_env):
    """Where torchvision's own ops library loads (a CUDA machine), the patch must not define the
    namespace itself: torchvision's registration of it would then fail."""
    result = run_python(["-c", TORCHVISION_OPS_LOAD], tiny_env, timeout=120)
    assert result.returncode == 0 and "CASE OK" in result.stdout, result.stderr[-3000:]
