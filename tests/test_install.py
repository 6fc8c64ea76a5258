"""The environment `make` builds: torch held at 2.13.0, no CUDA packages on a CPU build."""
from __future__ import annotations

from importlib import metadata

import torch


def test_torch_is_pinned():
    assert torch.__version__.split("+")[0] == "2.13.0"


def test_no_cuda_packages_with_cpu_torch():
    if torch.version.cuda is not None:  # a GPU machine legitimately has them
        return
    names = {dist.metadata["Name"].lower() for dist in metadata.distributions()}
    assert not {n for n in names if n.startswith("nvidia-")}


def test_lavis_is_the_pinned_release():
    assert metadata.version("salesforce-lavis") == "1.0.2"
    assert metadata.version("transformers") == "4.57.6"


def test_installed_top_level_names_are_lavis_exts_own():
    """The fixes in patches/ install as ``lavis_ext_patches``: a top-level ``patches`` could be any project's."""
    import subprocess
    import sys

    probe = ("import importlib.util, lavis_ext, lavis_ext_patches; "
             "print(importlib.util.find_spec('patches') is None, lavis_ext_patches.__file__)")
    result = subprocess.run([sys.executable, "-c", probe], cwd="/", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    no_patches, location = result.stdout.split()
    assert no_patches == "True" and location.endswith("patches/__init__.py")
