"""``RunOptions``: the one home of the run options lavis-ext reads, and what is checked against it."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from conftest import REPO
from lavis_ext.errors import ConfigError
from lavis_ext.run_options import RunOptions, nearest, option_table


def test_readme_table_is_the_dataclass():
    assert option_table() in (REPO / "README.md").read_text(encoding="utf-8")


def test_defaults_and_types():
    options = RunOptions.from_run_cfg(OmegaConf.create({"seed": "7", "amp": False, "lr_sched": "linear_warmup"}))
    assert options == RunOptions(seed=7)
    assert RunOptions.from_run_cfg({"amp": True}).amp == "fp16"  # LAVIS's `amp: True`
    assert RunOptions.from_run_cfg({"amp": "BF16", "length_penalty": 0}).amp == "bf16"


@pytest.mark.parametrize(("run", "message"), [
    ({"amp": "fp8"}, r"run\.amp = 'fp8': expected one of bf16, fp16, false"),
    ({"seed": "abc"}, r"run\.seed = 'abc': expected int"),
    ({"find_unused_parameters": "yes"}, r"run\.find_unused_parameters = 'yes': expected true or false"),
    ({"accum_grad_iters": 0}, r"run\.accum_grad_iters = 0: expected 1 or more"),
    ({"segmenter": "spacy"}, r"run\.segmenter = 'spacy'"),
])
def test_bad_values_name_the_key(run, message):
    with pytest.raises(ConfigError, match=message):
        RunOptions.from_run_cfg(run)


def test_nearest_keys():
    assert nearest("run.max_iter", ["run.max_iters", "run.max_epoch", "model.image_size"]) == \
        " (nearest: run.max_iters, run.max_epoch)"
    assert nearest("zzz", ["run.max_iters"]) == ""


def test_unknown_option_names_the_nearest_keys():
    from argparse import Namespace

    from lavis.common.config import Config

    from lavis_ext.cli import OptionsError, check_options

    cfg = Config(Namespace(cfg_path=str(REPO / "lavis_ext/demo/projects/pretrain_stage2.yaml"), options=[]))
    check_options(cfg, ["run.max_iters=3", "run.seed=1", "run.init_lr=1e-4", "model.bert_path=x"])
    with pytest.raises(OptionsError, match=r"'run\.max_iter': no such key .*nearest: run\.max_iters"):
        check_options(cfg, ["run.max_iter=3"])
