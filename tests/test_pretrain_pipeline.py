"""The main job on tiny parts: stage 1 (COCO + VG) -> stage 2 (InternLM2) through run_scripts/."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from conftest import REPO, run_python

TINY_MODEL = ["model.image_size=32", "model.vit_precision=fp32", "run.batch_size_train=2", "run.max_epoch=2",
              "run.warmup_steps=2", "run.num_workers=0", "run.amp=false", "run.init_lr=1e-3", "run.save_every_iters=0"]


def data_options(coco: Path, vg: Path) -> list[str]:
    options = []
    for name, ann, images in (("coco_caption_ext", coco, coco.parent / "images"), ("vg_caption_ext", vg, vg.parent / "images")):
        options += [f"datasets.{name}.build_info.annotations.train.storage={ann}",
                    f"datasets.{name}.build_info.images.storage={images}",
                    f"datasets.{name}.vis_processor.train.image_size=32"]
    return options


def run_script(script: str, env: dict, options: list[str]) -> subprocess.CompletedProcess:
    env = dict(env, NPROC_PER_NODE="2", MASTER_PORT="29641", PYTHON=run_python.__globals__["sys"].executable)
    result = subprocess.run(["bash", f"run_scripts/blip2/train/{script}", "--options", *options], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses(output_dir: Path) -> list[float]:
    (metrics,) = output_dir.glob("*/metrics.jsonl")
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]


def test_stage1_then_stage2(tiny_env, tiny_llm, tiny_coco, tmp_path):
    from lavis_ext.tiny.data import make_vg_caption_data

    data = data_options(tiny_coco, make_vg_caption_data(tmp_path / "vg"))
    stage1_out, stage2_out = tmp_path / "stage1", tmp_path / "stage2"
    run_script("pretrain_stage1.sh", tiny_env, [*data, *TINY_MODEL, "model.num_query_token=4",
                                               f"run.output_dir={stage1_out}"])
    stage1 = losses(stage1_out)
    (checkpoint,) = stage1_out.glob("*/checkpoint_1.pth")
    assert sum(stage1[-3:]) < sum(stage1[:3])

    env = dict(tiny_env, LAVIS_EXT_TINY_LLM=str(tiny_llm))
    run_script("pretrain_stage2_internlm.sh", env, [
        *data, *TINY_MODEL, f"model.llm_path={tiny_llm}", "model.num_query_token=4", "model.llm_dtype=fp32",
        f"model.pretrained={checkpoint}", "run.max_epoch=3",
        f"run.output_dir={stage2_out}"])
    stage2 = losses(stage2_out)
    assert sum(stage2[-3:]) < sum(stage2[:3])
    assert list(stage2_out.glob("*/checkpoint_2.pth"))


def test_stage2_single_process_two_iterations(tiny_env, tiny_llm, tiny_coco, tmp_path):
    from lavis_ext.tiny.data import make_vg_caption_data

    env = dict(tiny_env, LAVIS_EXT_TINY_LLM=str(tiny_llm))
    result = run_python(["train.py", "--cfg-path", "lavis_ext/projects/blip2/train/pretrain_stage2_internlm2_1_8b.yaml",
                         "--options", *data_options(tiny_coco, make_vg_caption_data(tmp_path / "vg")), *TINY_MODEL,
                         f"model.llm_path={tiny_llm}", "model.num_query_token=4", "model.llm_dtype=fp32",
                         "model.pretrained=", "run.distributed=False", "run.max_iters=2",
                         f"run.output_dir={tmp_path / 'out'}"], env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(losses(tmp_path / "out")) == 2
