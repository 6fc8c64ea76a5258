"""``make demo``: stage 1 -> stage 2 on tiny, generated parts and data, through run_scripts/.

    python -m lavis_ext.demo [--output output/demo]

It builds a tiny BERT Q-Former dir, a tiny EVA config, a tiny InternLM2-format checkpoint and
small COCO- and VG-format caption sets, then runs ``run_scripts/blip2/train/pretrain_stage1.sh``
and ``pretrain_stage2_internlm.sh`` (2 CPU processes, gloo) with ``--options`` pointing at
them, and prints the loss of each stage. The tiny LLM is random: the demo shows that the real
code paths run end to end and that the trainable parts learn, not that captions are good.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
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


def make_assets(root: Path) -> dict[str, Path]:
    from lavis_ext.tiny.blip2 import make_tiny_bert, make_tiny_vit
    from lavis_ext.tiny.data import make_caption_data, make_vg_caption_data
    from lavis_ext.tiny.internlm2 import make_tiny_internlm2

    return {"bert": make_tiny_bert(root / "bert"), "vit": make_tiny_vit(root / "vit"),
            "llm": make_tiny_internlm2(root / "llm"), "coco": make_caption_data(root / "coco", num_images=16),
            "vg": make_vg_caption_data(root / "vg", num_images=8)}


def run_script(script: str, options: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``run_scripts/blip2/train/<script> --options ...``; raise with its stderr tail on failure."""
    env = {**os.environ, "PYTHON": sys.executable, **env}
    result = subprocess.run(["bash", f"run_scripts/blip2/train/{script}", "--options", *options], cwd=REPO, env=env,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{script} failed:\n{result.stderr[-4000:]}")
    return result


def losses(output_dir: Path) -> list[float]:
    (metrics,) = output_dir.glob("*/metrics.jsonl")
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]


def run_pipeline(root: Path, env: dict[str, str] | None = None) -> dict[str, list[float]]:
    """Stage 1 then stage 2 into ``root``; returns each stage's per-iteration losses."""
    assets = make_assets(root / "assets")
    env = {"LAVIS_EXT_BERT": str(assets["bert"]), "LAVIS_EXT_VIT": str(assets["vit"]), "NPROC_PER_NODE": "2",
           "OMP_NUM_THREADS": "1", **(env or {})}
    data = data_options(assets["coco"], assets["vg"])
    run_script("pretrain_stage1.sh", [*data, *TINY_RUN, f"run.output_dir={root / 'stage1'}"], env)
    (stage1_checkpoint,) = (root / "stage1").glob("*/checkpoint_1.pth")
    run_script("pretrain_stage2_internlm.sh", [
        *data, *TINY_RUN, f"model.llm_path={assets['llm']}", "model.llm_dtype=fp32",
        f"model.pretrained={stage1_checkpoint}", "run.max_epoch=3", f"run.output_dir={root / 'stage2'}"], env)
    return {stage: losses(root / stage) for stage in ("stage1", "stage2")}


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="output/demo", help="where assets, checkpoints and logs go")
    args = parser.parse_args(argv)
    result = run_pipeline(Path(args.output).absolute())
    print(f"\n{'stage':<8}{'iterations':>12}{'first loss':>12}{'last loss':>12}")
    for stage, values in result.items():
        print(f"{stage:<8}{len(values):>12}{values[0]:>12.4f}{values[-1]:>12.4f}")
    print(f"\noutputs: {Path(args.output).absolute()}")
    return result


if __name__ == "__main__":
    main()
