"""lavis-ext: BLIP-2 x InternLM2 on salesforce-lavis 1.0.2.

Install with ``make test`` (or ``make venv``): torch is pinned by ``constraints.txt`` and
salesforce-lavis is installed with ``--no-deps``, because its own pins
(transformers<4.27, timm 0.4.12) predate Llama.
"""
from pathlib import Path

from setuptools import find_packages, setup


def pinned_requirements() -> list[str]:
    lines = Path(__file__).with_name("requirements.txt").read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="lavis-ext",
    version="0.1.0",
    description="BLIP-2 with InternLM2 language models, as an extension of Salesforce LAVIS 1.0.2",
    # the fixes to LAVIS live in patches/ and install as lavis_ext_patches, not under a name any project may use
    packages=[*find_packages(include=["lavis_ext", "lavis_ext.*"]), "lavis_ext_patches"],
    package_dir={"lavis_ext_patches": "patches"},
    package_data={"lavis_ext": ["configs/**/*.yaml", "projects/**/*.yaml", "demo/projects/*.yaml"]},
    python_requires=">=3.10",
    install_requires=["torch==2.13.0", "salesforce-lavis==1.0.2", *pinned_requirements()],
)
