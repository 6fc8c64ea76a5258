"""The pretraining pipeline on tiny parts: stage 1 (COCO + VG) -> stage 2 (InternLM2) through run_scripts/."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from conftest import REPO, losses, run_python

from lavis_ext.tiny.blip2 import make_tiny_bert, make_tiny_vit
from lavis_ext.tiny.data import make_caption_data, make_vg_caption_data
from lavis_ext.tiny.internlm2 import make_tiny_internlm2

# what turns the real project yamls into tiny runs (paths come from data_options / model options)
TINY_RUN = ["model.image_size=32", "model.vit_precision=fp32", "model.num_query_token=4", "run.batch_size_train=2",
            "run.max_epoch=2", "run.warmup_steps=2", "run.num_workers=0", "run.amp=false", "run.init_lr=1e-3",
            "run.save_every_iters=0"]


def data_options(coco_ann: Path, vg_ann: Path) -> list[str]:
    """``--options`` that point both caption builders at local annotation files and images."""
    options = []
    for name, ann in (("coco_caption_ext", coco_ann), ("vg_caption_ext", vg_ann)):
        options += [f"datasets.{name}.build_info.annotations.train.storage={ann}",
                    f"datasets.{name}.build_info.images.storage={ann.parent / 'images'}",
                    f"datasets.{name}.vis_processor.train.image_size=32"]
    return options


def run_script(script: str, options: list[str], env: dict[str, str]) -> None:
    env = {**os.environ, "PYTHON": sys.executable, **env}
    result = subprocess.run(["bash", f"run_scripts/blip2/train/{script}", "--options", *options], cwd=REPO, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, f"{script} failed:\n{result.stderr[-4000:]}"


def test_stage1_then_stage2_through_run_scripts(tmp_path):
    assets = tmp_path / "assets"
    env = {"LAVIS_EXT_BERT": str(make_tiny_bert(assets / "bert")), "LAVIS_EXT_VIT": str(make_tiny_vit(assets / "vit")),
           "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1"}
    data = data_options(make_caption_data(assets / "coco", num_images=16), make_vg_caption_data(assets / "vg", num_images=8))
    run_script("pretrain_stage1.sh", [*data, *TINY_RUN, f"run.output_dir={tmp_path / 'stage1'}"], env)
    (stage1_checkpoint,) = (tmp_path / "stage1").glob("*/checkpoint_1.pth")
    run_script("pretrain_stage2_internlm.sh", [
        *data, *TINY_RUN, f"model.llm_path={make_tiny_internlm2(assets / 'llm')}", "model.llm_dtype=fp32",
        f"model.pretrained={stage1_checkpoint}", "run.max_epoch=3", f"run.output_dir={tmp_path / 'stage2'}"], env)
    for stage in ("stage1", "stage2"):
        values = losses(tmp_path / stage)
        assert sum(values[-3:]) < sum(values[:3]), f"{stage} loss did not decrease: {values}"
    assert list((tmp_path / "stage2").glob("*/checkpoint_2.pth"))


def test_stage2_single_process_two_iterations(tiny_env, tiny_llm, tiny_coco, tmp_path):
    result = run_python(["train.py", "--cfg-path", "lavis_ext/projects/blip2/train/pretrain_stage2_internlm2_1_8b.yaml",
                         "--options", *data_options(tiny_coco, make_vg_caption_data(tmp_path / "vg")), *TINY_RUN,
                         f"model.llm_path={tiny_llm}", "model.llm_dtype=fp32", "model.pretrained=",
                         "run.distributed=False", "run.max_iters=2", f"run.output_dir={tmp_path / 'out'}"], tiny_env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(losses(tmp_path / "out")) == 2


SCRIPTS = sorted((REPO / "run_scripts" / "blip2").glob("*/*.sh"))
RENDEZVOUS = '--rdzv-endpoint="${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-0}"'


def test_every_script_launches_on_a_free_port_with_a_yaml_that_exists():
    """Each script runs torchrun with a port-0 rendezvous, or hands over to a script that does; its
    default project yaml exists."""
    assert {"pretrain_stage1.sh", "pretrain_stage2_internlm.sh"} <= {script.name for script in SCRIPTS}
    for script in SCRIPTS:
        text = script.read_text()
        launches = text.count("-m torch.distributed.run")
        handed_to = re.findall(r'exec bash "\$\(dirname "\$0"\)/([\w.]+)"', text)
        assert (launches == 1 and RENDEZVOUS in text) or (not launches and handed_to), script.name
        for name in handed_to:
            assert RENDEZVOUS in (script.parent / name).read_text(), f"{script.name} -> {name}"
        (default_yaml,) = re.findall(r"CFG_PATH:-([^}]+)}", text)
        assert (REPO / default_yaml).is_file(), f"{script.name}: {default_yaml}"


def test_scripts_launch_together_beside_a_job_on_the_usual_port():
    """Jobs sharing a machine: each script's rendezvous takes a free port (torchrun's usual 29500 is
    held). The two pretraining scripts and a script that hands over to another start at once."""
    env = {**os.environ, "PYTHON": sys.executable, "NPROC_PER_NODE": "1"}
    scripts = [REPO / "run_scripts/blip2/train/pretrain_stage1.sh", REPO / "run_scripts/blip2/train/pretrain_stage2_internlm.sh",
               REPO / "run_scripts/blip2/eval/caption_coco_cn_internlm2.sh"]
    with socket.socket() as other_job:
        try:
            other_job.bind(("127.0.0.1", 29500))
            other_job.listen()
        except OSError:
            pass  # another job holds it already: the same situation
        launches = [subprocess.Popen(["bash", str(script), "--help"], cwd=REPO, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE) for script in scripts]
        results = [(script.name, launch.communicate(timeout=300), launch.returncode)
                   for script, launch in zip(scripts, launches)]
    for name, (stdout, stderr), returncode in results:
        assert returncode == 0 and "--cfg-path" in stdout, f"{name}:\n{stderr[-3000:]}"
