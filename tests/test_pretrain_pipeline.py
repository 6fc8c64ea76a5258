"""The main job on tiny parts: stage 1 (COCO + VG) -> stage 2 (InternLM2) through run_scripts/."""
from __future__ import annotations

from conftest import run_python

from lavis_ext.demo import TINY_RUN, data_options, losses, run_pipeline


def test_stage1_then_stage2_through_run_scripts(tmp_path):
    result = run_pipeline(tmp_path)
    for stage in ("stage1", "stage2"):
        values = result[stage]
        assert sum(values[-3:]) < sum(values[:3]), f"{stage} loss did not decrease: {values}"
    assert list((tmp_path / "stage1").glob("*/checkpoint_1.pth"))
    assert list((tmp_path / "stage2").glob("*/checkpoint_2.pth"))


def test_stage2_single_process_two_iterations(tiny_env, tiny_llm, tiny_coco, tmp_path):
    from lavis_ext.tiny.data import make_vg_caption_data

    result = run_python(["train.py", "--cfg-path", "lavis_ext/projects/blip2/train/pretrain_stage2_internlm2_1_8b.yaml",
                         "--options", *data_options(tiny_coco, make_vg_caption_data(tmp_path / "vg")), *TINY_RUN,
                         f"model.llm_path={tiny_llm}", "model.llm_dtype=fp32", "model.pretrained=",
                         "run.distributed=False", "run.max_iters=2", f"run.output_dir={tmp_path / 'out'}"], tiny_env)
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(losses(tmp_path / "out")) == 2
