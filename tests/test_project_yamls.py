"""Every project yaml under ``lavis_ext/projects/`` and ``lavis_ext/demo/projects/`` through LAVIS's real config path.

Each one resolves, starts with a header comment giving its launch command, has only keys its
model knows, writes to its own ``run.output_dir`` and feeds its model images of the model's size.
"""
from __future__ import annotations

import dataclasses
from argparse import Namespace
from collections import Counter
from pathlib import Path

import pytest
from lavis.common.config import Config
from omegaconf import OmegaConf

from conftest import REPO
from lavis_ext.cli import model_image_size
from lavis_ext.models.blip2_models.blip2_internlm import Blip2InternLMConfig
from lavis_ext.run_options import RunOptions

PROJECTS = sorted([*(REPO / "lavis_ext" / "projects").rglob("*.yaml"), *(REPO / "lavis_ext" / "demo" / "projects").glob("*.yaml")])
LAUNCHERS = ("bash run_scripts/", "python train.py", "python evaluate.py", "python -m lavis_ext")


def load(path: Path) -> Config:
    return Config(Namespace(cfg_path=str(path), options=[]))


def processor_sizes(config: Config) -> dict[str, int]:
    """``datasets.<name>.vis_processor.<split>.image_size`` -> value, for every processor that sets one."""
    sizes = {}
    for name, dataset in config.datasets_cfg.items():
        for split, processor in dataset.get("vis_processor", {}).items():
            if "image_size" in processor:
                sizes[f"datasets.{name}.vis_processor.{split}.image_size"] = processor.image_size
    return sizes


def image_size_mismatches(config: Config) -> list[str]:
    model_size = model_image_size(config.model_cfg)
    return [f"{key} = {size} but model.image_size = {model_size}"
            for key, size in processor_sizes(config).items() if size != model_size]


@pytest.mark.parametrize("path", PROJECTS, ids=lambda p: str(p.relative_to(REPO / "lavis_ext")))
def test_project_yaml(path: Path) -> None:
    header = path.read_text(encoding="utf-8").split("\n\n", 1)[0]
    assert header.startswith("#") and any(launch in header for launch in LAUNCHERS), \
        f"{path}: the header comment must give the launch command"
    config = load(path)
    OmegaConf.to_container(config.config, resolve=True)  # every interpolation resolves
    if config.model_cfg.arch == "blip2_internlm":
        Blip2InternLMConfig.from_lavis(config.model_cfg)  # unknown model keys raise
    assert image_size_mismatches(config) == []


def test_no_two_projects_share_an_output_dir() -> None:
    output_dirs = Counter(load(path).run_cfg.output_dir for path in PROJECTS)
    assert [d for d, n in output_dirs.items() if n > 1] == []


def test_a_processor_of_another_size_is_found(tmp_path: Path) -> None:
    source = REPO / "lavis_ext" / "projects" / "blip2" / "train" / "pretrain_stage2_internlm2_1_8b.yaml"
    project = OmegaConf.load(source)
    first = next(iter(project.datasets))
    project.datasets[first].vis_processor.train.image_size = 364
    changed = tmp_path / "other_size.yaml"
    OmegaConf.save(project, changed)
    assert image_size_mismatches(load(changed)) == [
        f"datasets.{first}.vis_processor.train.image_size = 364 but model.image_size = 224"]


MODEL_YAMLS = sorted((REPO / "lavis_ext" / "configs" / "models").rglob("*internlm*.yaml"))


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=lambda p: p.name)
def test_model_yaml_sets_only_what_differs_from_the_dataclass(path: Path) -> None:
    """Defaults live in ``Blip2InternLMConfig``; a model yaml repeating one would be a second copy to drift."""
    model = OmegaConf.load(path).model
    defaults = Blip2InternLMConfig()
    repeated = [key for key in model if hasattr(defaults, key) and key not in ("llm_path", "bert_path", "vit_path")
                and model[key] == getattr(defaults, key)]
    assert repeated == [], f"{path.name} repeats the defaults of {repeated}"


@pytest.mark.parametrize("path", PROJECTS, ids=lambda p: str(p.relative_to(REPO / "lavis_ext")))
def test_project_run_section_sets_only_what_differs_from_run_options(path: Path) -> None:
    """``RunOptions`` holds each run option's default once; a yaml repeating one would be a second copy."""
    run = OmegaConf.load(path).get("run", {})
    defaults = {f.name: f.default for f in dataclasses.fields(RunOptions)}
    repeated = [key for key in run if key in defaults and run[key] == defaults[key]]
    assert repeated == [], f"{path.name} repeats the run option defaults of {repeated}"
