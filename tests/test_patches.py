"""Each patch is needed: its case passes with all patches and fails with that one skipped."""
from __future__ import annotations

import pytest

from conftest import run_python

# patch name -> the case in tests/patch_cases.py that needs it
PATCH_CASES = {
    "torchvision_cpu": "import",
    "transformers_qformer_imports": "import",
    "spacy_stub": "import",
    "qformer_generation_mixin": "greedy_generate",
    "offline_blip2": "offline_build",
    "offline_checkpoints": "empty_pretrained",
    "cache_root": "cache_root",
    "cpu_fp16": "fp16_vit_on_cpu",
    "qformer_beam_search": "beam_generate",
    "single_process": "forward_without_process_group",
    "dist_init_gloo": "dist_init_cpu",
    "prefetch_loader_cpu": "prefetch_loader",
    "logger_cpu_sync": "logger_sync",
    "model_type_option": "model_type_option",
}


def test_every_patch_has_a_case():
    import patches

    assert set(PATCH_CASES) == set(patches.PATCHES)


def run_case(case: str, env: dict, skip: str = ""):
    env = dict(env, LAVIS_EXT_SKIP_PATCHES=skip)
    return run_python(["tests/patch_cases.py", case], env, timeout=120)


@pytest.mark.parametrize("case", sorted(set(PATCH_CASES.values()) | {"spacy_hint"}))
def test_case_passes_with_all_patches(case, tiny_env):
    result = run_case(case, tiny_env)
    assert result.returncode == 0 and "CASE OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("patch", sorted(PATCH_CASES))
def test_case_fails_without_its_patch(patch, tiny_env):
    result = run_case(PATCH_CASES[patch], tiny_env, skip=patch)
    assert result.returncode != 0, f"{patch} skipped, yet case {PATCH_CASES[patch]!r} passed"


def test_patches_are_idempotent():
    import lavis_ext  # noqa: F401
    import patches
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer
    from lavis.models.blip2_models.Qformer import BertLMHeadModel

    bases = BertLMHeadModel.__bases__
    generate = Blip2Qformer.generate
    patches.apply_all()
    patches.apply_all()
    assert BertLMHeadModel.__bases__ == bases
    assert Blip2Qformer.generate.__code__ is generate.__code__


def test_unknown_skip_name_is_refused(monkeypatch):
    import patches

    monkeypatch.setenv("LAVIS_EXT_SKIP_PATCHES", "no_such_patch")
    with pytest.raises(ValueError, match="no_such_patch"):
        patches.skipped()
