"""Bad input, as a new user would give it, gets one clear line: ``error: <message naming the file or key>``,
exit code 2, no traceback unless ``--debug``; checkpoints never run code; and what worked keeps working.

Most cases call ``lavis_ext.cli.main`` in this process (what ``train.py``/``evaluate.py`` run); a
few run the real scripts in subprocesses (one process, and under torchrun).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, losses, run_python, torchrun
from PIL import Image

from lavis_ext.checkpoint import atomic_save, load_checkpoint_file
from lavis_ext.cli import EXIT_BAD_INPUT, main
from lavis_ext.datasets.base import DataError, to_rgb
from lavis_ext.datasets.caption import CaptionDatasetExt
from lavis_ext.datasets.vqa import VQAEvalDatasetExt
from lavis_ext.errors import CheckpointError
from lavis_ext.local_paths import LocalPathError

SIZE = 32
PROCESSORS = {"vis_processor": {"train": {"name": "blip2_image_train", "image_size": SIZE}},
              "text_processor": {"train": {"name": "blip_caption"}}}
RUN = {"runner": "runner_ext", "task": "image_text_pretrain", "lr_sched": "linear_warmup_cosine_lr", "init_lr": 1e-3,
       "min_lr": 1e-5, "warmup_lr": 1e-6, "warmup_steps": 1, "weight_decay": 0.05, "max_epoch": 1,
       "batch_size_train": 2, "batch_size_eval": 2, "num_workers": 0, "seed": 42, "amp": False,
       "resume_ckpt_path": None, "evaluate": False, "train_splits": ["train"], "device": "cpu", "world_size": 1,
       "dist_url": "env://", "distributed": False, "max_iters": 2}
STAGE1_MODEL = {"arch": "blip2_qformer_ext", "model_type": "pretrain", "load_finetuned": False, "pretrained": "",
                "image_size": SIZE, "num_query_token": 4, "vit_precision": "fp32", "freeze_vit": True,
                "embed_dim": 32}
STAGE2_MODEL = {"arch": "blip2_internlm", "model_type": "tiny", "load_finetuned": False, "pretrained": "",
                "image_size": SIZE, "num_query_token": 4, "vit_precision": "fp32", "llm_dtype": "fp32"}


class Marker:
    """Unpickling this runs a shell command that creates ``path``: a crafted checkpoint's payload."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


# --------------------------------------------------------------------------- helpers


def write_project(path: Path, model: dict, ann: Path, images: Path, output: Path, **run) -> Path:
    """A project yaml: ``model``, one ``coco_caption_ext`` train split, runner_ext settings."""
    datasets = {"coco_caption_ext": {**PROCESSORS, "build_info": {"annotations": {"train": {"storage": str(ann)}},
                                                                  "images": {"storage": str(images)}}}}
    project = {"model": model, "datasets": datasets, "run": {**RUN, "output_dir": str(output), **run}}
    path.write_text(yaml.safe_dump(project))
    return path


def fails_with_one_line(capfd, argv: list[str], *names: str, evaluate: bool = False) -> str:
    """``main(argv)`` exits 2 with one ``error:`` line on stderr naming each of ``names``, and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv, evaluate)
    err = capfd.readouterr().err
    assert exit_info.value.code == EXIT_BAD_INPUT, err
    return one_error_line(err, *names)


def one_error_line(err: str, *names: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    for name in names:
        assert str(name) in lines[0], lines[0]
    assert "Traceback" not in err, err[-3000:]
    return lines[0]


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    """A ``.pth`` in LAVIS's layout whose pickle would create ``marker`` when loaded unsafely."""
    torch.save({"model": {}, "epoch": 0, "payload": Marker(marker)}, path)
    return path


@pytest.fixture
def paths_env(monkeypatch, tiny_parts, tiny_llm):
    """The tiny parts' paths in the environment."""
    for name, value in (("LAVIS_EXT_BERT", tiny_parts["bert"]), ("LAVIS_EXT_VIT", tiny_parts["vit"]),
                        ("LAVIS_EXT_TINY_LLM", tiny_llm)):
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("LAVIS_EXT_STAGE1_CKPT", raising=False)
    monkeypatch.delenv("LAVIS_EXT_DEBUG", raising=False)


@pytest.fixture
def stage1(tmp_path, tiny_coco, paths_env) -> Path:
    return write_project(tmp_path / "stage1.yaml", STAGE1_MODEL, tiny_coco, tiny_coco.parent / "images",
                         tmp_path / "out")


@pytest.fixture
def stage2(tmp_path, tiny_coco, paths_env) -> Path:
    return write_project(tmp_path / "stage2.yaml", STAGE2_MODEL, tiny_coco, tiny_coco.parent / "images",
                         tmp_path / "out")


def images_dataset(tmp_path: Path, images: dict[str, Image.Image], captions: list[str] | None = None,
                   **kwargs) -> CaptionDatasetExt:
    """A caption dataset over ``images`` (file name -> image), saved under ``tmp_path/images``."""
    from lavis.processors.blip_processors import BlipCaptionProcessor, BlipImageEvalProcessor

    root = tmp_path / "images"
    root.mkdir(exist_ok=True)
    for name, image in images.items():
        image.save(root / name)
    captions = captions or ["a red circle"] * len(images)
    records = [{"image": name, "caption": caption, "image_id": str(i)}
               for i, (name, caption) in enumerate(zip(images, captions))]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(records, ensure_ascii=False))
    return CaptionDatasetExt(BlipImageEvalProcessor(image_size=SIZE), BlipCaptionProcessor(max_words=10_000),
                             str(root), [str(ann)], **kwargs)


# --------------------------------------------------------------------------- checkpoints never run code


def test_crafted_pickle_as_model_pretrained_is_refused(stage2, tmp_path, capfd):
    marker = tmp_path / "marker"
    evil = crafted_checkpoint(tmp_path / "stage1.pth", marker)
    fails_with_one_line(capfd, ["--cfg-path", str(stage2), "--options", f"model.pretrained={evil}"],
                        "model.pretrained", evil, "posix.system")
    assert not marker.exists()


def test_crafted_pickle_as_model_finetuned_is_refused(stage2, tmp_path, capfd):
    marker = tmp_path / "marker"
    evil = crafted_checkpoint(tmp_path / "stage2.pth", marker)
    fails_with_one_line(capfd, ["--cfg-path", str(stage2), "--options", "model.load_finetuned=True",
                                 f"model.finetuned={evil}"], "model.finetuned", evil, evaluate=True)
    assert not marker.exists()


def test_crafted_pickle_to_resume_is_refused_by_train_py(stage1, tmp_path, tiny_env):
    """The real script, one process: refused with the path, one line, exit 2, no traceback."""
    marker = tmp_path / "marker"
    evil = crafted_checkpoint(tmp_path / "checkpoint_last.pth", marker)
    result = run_python(["train.py", "--cfg-path", str(stage1), "--resume", str(evil)], tiny_env)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr[-3000:]
    one_error_line(result.stderr, "--resume", evil, "refused")
    assert not marker.exists()


def test_crafted_pickle_is_refused_by_the_loader(tmp_path):
    marker = tmp_path / "marker"
    with pytest.raises(CheckpointError, match=r"model.pretrained = .*evil.pth: refused: .*posix.system"):
        load_checkpoint_file(crafted_checkpoint(tmp_path / "evil.pth", marker), "model.pretrained")
    assert not marker.exists()


def test_lavis_and_runner_ext_checkpoints_still_load(tmp_path):
    """LAVIS runner_base's layout (model, optimizer, config dict, scaler, epoch) and runner_ext's
    (plus position and every rank's RNG state, numpy's included) load weights-only."""
    from lavis_ext.runners.runner_ext import rng_state

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    lavis = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": {"run": {"lr": 1e-4}},
             "scaler": None, "epoch": 3}
    ours = {**lavis, "scaler": torch.amp.GradScaler("cpu").state_dict(), "next_iter": 2, "global_step": 9,
            "rng_states": [rng_state(), rng_state()]}
    for name, checkpoint in (("lavis.pth", lavis), ("ours.pth", ours)):
        torch.save(checkpoint, tmp_path / name)
        loaded = load_checkpoint_file(tmp_path / name, "model.pretrained")
        assert torch.equal(loaded["model"]["weight"], model.weight) and loaded["epoch"] == 3
    assert np.array_equal(loaded["rng_states"][1]["numpy"][1], ours["rng_states"][1]["numpy"][1])


# --------------------------------------------------------------------------- checkpoints and weights


def test_truncated_checkpoint_names_the_file(stage2, tmp_path, capfd):
    good = tmp_path / "good.pth"
    torch.save({"model": {"llm_proj.weight": torch.zeros(4, 4)}}, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:200])
    fails_with_one_line(capfd, ["--cfg-path", str(stage2), "--options", f"model.pretrained={cut}"],
                        "model.pretrained", cut, "truncated")


def test_checkpoint_of_another_shape_names_the_file(stage2, tmp_path, capfd):
    other = tmp_path / "other.pth"
    torch.save({"model": {"Qformer.bert.embeddings.LayerNorm.weight": torch.ones(7)}}, other)
    fails_with_one_line(capfd, ["--cfg-path", str(stage2), "--options", f"model.pretrained={other}"],
                        "model.pretrained", other, "size mismatch")


def test_truncated_safetensors_names_the_llm_path(stage2, tmp_path, tiny_llm, capfd):
    import shutil

    llm = shutil.copytree(tiny_llm, tmp_path / "llm")
    weights = sorted(llm.glob("*.safetensors"))[0]
    weights.write_bytes(weights.read_bytes()[:100])
    fails_with_one_line(capfd, ["--cfg-path", str(stage2), "--options", f"model.llm_path={llm}"],
                        "model.llm_path", llm)


def test_tokenizer_larger_than_the_embedding_is_refused(stage2, tmp_path, tiny_llm, capfd):
    """An LLM whose embedding has fewer rows than the tokenizer has pieces (it failed with an
    IndexError at the first step)."""
    import shutil

    from lavis_ext.models.internlm2 import load_internlm2_tokenizer

    llm = shutil.copytree(tiny_llm, tmp_path / "llm")
    config = json.loads((llm / "config.json").read_text())
    pieces = len(load_internlm2_tokenizer(llm))
    rows = pieces - 8
    config["vocab_size"] = rows
    (llm / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    for shard in llm.glob("*.safetensors"):  # the embedding and output rows past `rows` go
        weights = {k: (v[:rows].clone() if v.shape[0] == pieces else v) for k, v in load_file(shard).items()}
        save_file(weights, shard, metadata={"format": "pt"})
    line = fails_with_one_line(capfd, ["--cfg-path", str(stage2), "--options", f"model.llm_path={llm}"],
                               "model.llm_path", llm)
    assert f"{pieces} pieces" in line and f"{rows} rows" in line


# --------------------------------------------------------------------------- config


def test_unknown_model_type_lists_the_valid_ones(stage2, capfd):
    line = fails_with_one_line(capfd, ["--cfg-path", str(stage2), "--options", "model.model_type=tiny_typo"],
                               "model.model_type", "tiny_typo", "pretrain_internlm2_1_8b")
    assert "'tiny'" in line


def test_unknown_arch_is_named(stage2, capfd):
    fails_with_one_line(capfd, ["--cfg-path", str(stage2), "--options", "model.arch=blip3"], "model.arch", "blip3")


def test_unknown_option_key_is_one_line(stage1, capfd):
    fails_with_one_line(capfd, ["--cfg-path", str(stage1), "--options", "run.max_epochs=3"], "run.max_epochs")


def test_missing_project_yaml_is_named(tmp_path, capfd):
    fails_with_one_line(capfd, ["--cfg-path", str(tmp_path / "nope.yaml")], tmp_path / "nope.yaml")


def test_processor_image_size_other_than_the_model_is_refused_at_build(stage1, capfd):
    fails_with_one_line(capfd, ["--cfg-path", str(stage1), "--options",
                                 "datasets.coco_caption_ext.vis_processor.train.image_size=48"],
                        "datasets.coco_caption_ext.vis_processor.train.image_size", "model.image_size = 32")


def test_output_dir_that_cannot_be_created_is_refused_before_training(stage1, tmp_path, capfd):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    fails_with_one_line(capfd, ["--cfg-path", str(stage1), "--options", f"run.output_dir={blocker / 'out'}"],
                        "run.output_dir", blocker)


def test_missing_llm_path_names_key_and_variable(stage2, monkeypatch, capfd):
    monkeypatch.delenv("LAVIS_EXT_TINY_LLM")
    fails_with_one_line(capfd, ["--cfg-path", str(stage2)], "model.llm_path", "LAVIS_EXT_TINY_LLM")


def test_python_users_of_load_model_learn_the_variable(paths_env, monkeypatch):
    """``load_model`` outside train.py: the message names the key and the variable that sets it."""
    from lavis.models import load_model

    monkeypatch.delenv("LAVIS_EXT_BERT")  # the tiny ViT stays: the full EVA ViT-g would take seconds to build
    with pytest.raises(LocalPathError, match=r"model.bert_path \(env LAVIS_EXT_BERT\) is not set"):
        load_model("blip2_internlm", "pretrain_internlm2_1_8b")


def test_url_checkpoint_is_refused(stage2, capfd):
    fails_with_one_line(capfd, ["--cfg-path", str(stage2), "--options", "model.pretrained=https://x.org/a.pth"],
                        "model.pretrained", "https://x.org/a.pth")


def test_missing_resume_file_is_named(stage1, tmp_path, capfd):
    fails_with_one_line(capfd, ["--cfg-path", str(stage1), "--resume", str(tmp_path / "none.pth")],
                        "--resume", tmp_path / "none.pth")


def test_debug_flag_and_variable_show_the_traceback(stage1, tmp_path, monkeypatch, capfd):
    argv = ["--cfg-path", str(stage1), "--resume", str(tmp_path / "none.pth")]
    for extra, env in ((["--debug"], None), ([], "1")):
        if env:
            monkeypatch.setenv("LAVIS_EXT_DEBUG", env)
        with pytest.raises(SystemExit) as exit_info:
            main(argv + extra, False)
        err = capfd.readouterr().err
        assert exit_info.value.code == EXIT_BAD_INPUT
        assert "Traceback" in err and "load_checkpoint_file" in err and "error: run.resume_ckpt_path" in err


# --------------------------------------------------------------------------- data


def test_malformed_annotation_json_names_the_file(tmp_path, tiny_coco, paths_env, capfd):
    ann = tmp_path / "bad.json"
    ann.write_text('[{"image": "train/0.jpg", "caption": "a red circle"},')
    project = write_project(tmp_path / "p.yaml", STAGE1_MODEL, ann, tiny_coco.parent / "images", tmp_path / "out")
    fails_with_one_line(capfd, ["--cfg-path", str(project)], ann, "malformed JSON")


def test_missing_image_names_its_path(tmp_path, tiny_coco, paths_env, capfd):
    records = json.loads(tiny_coco.read_text())
    records[0]["image"] = "train/missing.jpg"
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(records))
    project = write_project(tmp_path / "p.yaml", STAGE1_MODEL, ann, tiny_coco.parent / "images", tmp_path / "out")
    fails_with_one_line(capfd, ["--cfg-path", str(project)], "train/missing.jpg", ann)


def test_image_past_the_pixel_limit_is_a_bad_image(stage1, tiny_coco, capfd):
    """PIL's DecompressionBombError was raw, without the path; now it is a bad image, named and counted."""
    fails_with_one_line(capfd, ["--cfg-path", str(stage1), "--options", "run.max_image_pixels=600"],
                        "run.max_image_pixels = 600", tiny_coco.parent / "images", "max_bad_image_fraction")


@pytest.mark.parametrize("side", [45, 80])  # 2025 px: PIL warns (above the limit); 6400 px: PIL errors (2x)
def test_too_large_image_is_skipped_and_counted(tmp_path, side):
    small = Image.new("RGB", (SIZE, SIZE), "red")
    dataset = images_dataset(tmp_path, {"0.png": small, "big.png": Image.new("RGB", (side, side)), "2.png": small},
                             max_bad_image_fraction=0.5)
    dataset.max_image_pixels = 2000
    assert torch.equal(dataset[1]["image"], dataset[2]["image"])  # replaced by the next valid sample
    assert dataset.bad_images == 1


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    gradient = (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(gradient).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as image:
        assert image.mode == "I;16"
        rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (SIZE, SIZE, 3)
    assert np.array_equal(rgb[..., 0], np.rint(gradient / 257).astype(np.uint8))
    assert abs(rgb.mean() - 127) < 2  # clipped, it was ~254 (almost white)


def test_duplicate_question_id_with_other_content_names_both_records(tmp_path):
    records = [{"question_id": 7, "question": "is it red?", "image": "0.jpg"},
               {"question_id": 8, "question": "how many?", "image": "0.jpg"},
               {"question_id": 7, "question": "is it blue?", "image": "1.jpg"}]
    ann = tmp_path / "vqa.json"
    ann.write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"question_id 7 .*/vqa\.json record 0 and .*/vqa\.json record 2"):
        VQAEvalDatasetExt(None, None, str(tmp_path), [str(ann)])


def test_exact_duplicate_question_is_kept_once(tmp_path):
    records = [{"question_id": 7, "question": "is it red?", "image": "0.jpg"}] * 2
    ann = tmp_path / "vqa.json"
    ann.write_text(json.dumps(records))
    assert len(VQAEvalDatasetExt(None, None, str(tmp_path), [str(ann)])) == 1


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P"])
def test_image_modes_decode_to_rgb(tmp_path, mode):
    image = Image.new("RGB", (SIZE, SIZE), (200, 40, 10)).convert(mode)
    dataset = images_dataset(tmp_path, {f"0.{'jpg' if mode == 'CMYK' else 'png'}": image})
    assert dataset[0]["image"].shape == (3, SIZE, SIZE)


def test_odd_captions_and_image_modes_train(tmp_path, paths_env, capfd):
    """Empty, 20k-character and Chinese+emoji captions; L, RGBA, CMYK and 16-bit images: training runs."""
    root = tmp_path / "images"
    root.mkdir()
    red = Image.new("RGB", (SIZE, SIZE), (200, 40, 10))
    files = {"l.png": red.convert("L"), "rgba.png": red.convert("RGBA"), "cmyk.jpg": red.convert("CMYK"),
             "g16.png": Image.fromarray(np.full((SIZE, SIZE), 40000, dtype=np.uint16))}
    for name, image in files.items():
        image.save(root / name)
    captions = ["", "a red circle " * 1540, "两个红色圆形和一个蓝色方形 🙂🚀", "a grey square"]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": n, "caption": c, "image_id": str(i)}
                               for i, (n, c) in enumerate(zip(files, captions))], ensure_ascii=False))
    project = write_project(tmp_path / "p.yaml", STAGE1_MODEL, ann, root, tmp_path / "out")
    main(["--cfg-path", str(project)], False)
    assert "Traceback" not in capfd.readouterr().err
    assert len(losses(tmp_path / "out")) == 2 and all(np.isfinite(losses(tmp_path / "out")))


# --------------------------------------------------------------------------- training failures


def test_nan_similarities_reach_the_loss_not_multinomial(tiny_parts, paths_env):
    """Stage 1 with a diverged (NaN) Q-Former: the ITM negative sampling must not fail in
    torch.multinomial before runner_ext sees the loss; the loss is NaN and the policy applies."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    paths = {"bert_path": str(tiny_parts["bert"]), "vit_path": str(tiny_parts["vit"])}
    model = registry.get_model_class("blip2_qformer_ext").from_config(OmegaConf.create({**STAGE1_MODEL, **paths}))
    with torch.no_grad():
        model.query_tokens.fill_(float("nan"))
    out = model({"image": torch.randn(4, 3, SIZE, SIZE), "text_input": ["a red circle", "a blue square"] * 2})
    assert torch.isnan(out["loss"])


def test_stage1_non_finite_losses_abort_by_the_policy(stage1, tmp_path, tiny_parts, capfd):
    """A ViT with NaN weights: every stage-1 loss is NaN; run.max_nonfinite_steps ends the run, one line."""
    from lavis_ext.blip2_parts import build_vision_encoder

    vit = tmp_path / "nan_vit"
    vit.mkdir()
    (vit / "config.json").write_text((tiny_parts["vit"] / "config.json").read_text())
    encoder = build_vision_encoder("eva_clip_g", str(tiny_parts["vit"]), SIZE)
    torch.save({k: torch.full_like(v, float("nan")) for k, v in encoder.state_dict().items()}, vit / "model.pth")
    fails_with_one_line(capfd, ["--cfg-path", str(stage1), "--options", f"model.vit_path={vit}",
                                 "run.max_nonfinite_steps=2"], "run.max_nonfinite_steps")


def test_resume_leaves_a_clean_job_dir(stage1, tmp_path, capfd):
    """After a run stopped between saves, resume auto: each step once in metrics.jsonl, no stale .tmp."""
    output = tmp_path / "out"
    main(["--cfg-path", str(stage1), "--options", "run.max_iters=2"], False)
    (job,) = output.iterdir()
    metrics = job / "metrics.jsonl"
    first = metrics.read_text().splitlines()
    lost = dict(json.loads(first[-1]), step=3, iter=2)  # logged, then the run died before the next save
    metrics.write_text("\n".join(first + [json.dumps(lost), '{"step": 4, "lo']) + "\n")
    (job / ".checkpoint_last.pth.tmp12345").write_bytes(b"half a checkpoint")
    main(["--cfg-path", str(stage1), "--options", "run.max_iters=4", "--resume", "auto"], False)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]
    assert not list(job.glob(".*.tmp*"))
    assert "Traceback" not in capfd.readouterr().err


# --------------------------------------------------------------------------- crashes (what worked keeps working)


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    """SIGKILL in the middle of a checkpoint write (the writer kills itself half-way, so the kill
    surely lands inside it): the previous checkpoint loads, and a resume's clean-up removes the rest."""
    from lavis_ext.checkpoint import remove_stale_temporaries

    target = tmp_path / "checkpoint_last.pth"
    atomic_save({"model": {"w": torch.ones(3)}, "epoch": 1}, target)
    dies_mid_write = (
        "import os, pathlib, signal, torch\n"
        "from lavis_ext.checkpoint import atomic_save\n"
        "def half_a_save(obj, f):\n"
        "    f.write(b'PK' * 4096); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = half_a_save\n"
        f"atomic_save({{'model': {{'w': torch.zeros(3)}}, 'epoch': 2}}, pathlib.Path({str(target)!r}))\n")
    writer = subprocess.run([sys.executable, "-c", dies_mid_write], cwd=REPO, capture_output=True)
    assert writer.returncode == -signal.SIGKILL, writer.stderr[-2000:]
    (partial,) = tmp_path.glob(".checkpoint_last.pth.tmp*")
    assert load_checkpoint_file(target, "--resume")["epoch"] == 1
    assert remove_stale_temporaries(tmp_path) == [partial] and not partial.exists()


def test_torchrun_reports_bad_input_once(stage1, tmp_path, tiny_env):
    """Both ranks hit the same bad input; one line, from rank 0, and no worker traceback."""
    result = torchrun(["train.py", "--cfg-path", str(stage1), "--options", "run.distributed=True",
                       "--resume", str(tmp_path / "none.pth")], tiny_env, timeout=120)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count("error: ") == 1, output[-4000:]
    assert "error: run.resume_ckpt_path (--resume)" in output and str(tmp_path / "none.pth") in output
    assert "lavis_ext/" not in output.split("error: ")[0]  # no worker frames before it


def test_killed_rank_ends_torchrun_quickly(stage1, tmp_path, tiny_env):
    """One rank killed mid-training: torchrun stops the other and exits non-zero within seconds."""
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                                "train.py", "--cfg-path", str(stage1), "--options", "run.distributed=True",
                                "run.max_iters=100000", "run.max_epoch=100000"],
                               cwd=REPO, env=tiny_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list((tmp_path / "out").glob("*/metrics.jsonl")) and time.time() < deadline:
            time.sleep(0.2)
        from conftest import child_pids

        workers = child_pids(process.pid)
        assert len(workers) == 2, "both ranks should be training"
        os.kill(max(workers), signal.SIGKILL)
        killed = time.time()
        process.wait(timeout=30)
        assert process.returncode != 0
        assert time.time() - killed < 5
    finally:
        if process.poll() is None:
            process.kill()


def test_demo_runs_again_beside_earlier_runs(tmp_path):
    """`make demo` again in the same checkout (or after an interrupted run): each stage's job dir is
    the new run's, not an earlier one beside it (taking an earlier one would stop the run after stage 1)."""
    from lavis_ext.demo.pipeline import demo_env, make_assets, train_stages

    assets = make_assets(tmp_path, llm_steps=2, vit_steps=2, world_sizes={"train": 64, "val": 2, "test": 4})
    env = {**demo_env(tmp_path, assets), "NPROC_PER_NODE": "1"}
    earlier = {"stage1": tmp_path / "demo" / "pretrain_stage1" / "20000101000000",  # interrupted: no checkpoint
               "stage2": tmp_path / "demo" / "pretrain_stage2" / "20000101000000"}  # finished
    for job in earlier.values():
        job.mkdir(parents=True)
        (job / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (earlier["stage2"] / "checkpoint_last.pth").write_bytes(b"")
    short = ["run.max_epoch=1", "run.max_iters=1", "run.warmup_steps=0", "run.batch_size_train=4"]
    jobs = train_stages(tmp_path, env, short, short)
    for stage, job in jobs.items():
        assert job != earlier[stage] and job.parent == earlier[stage].parent
        assert (job / "checkpoint_last.pth").is_file()
    assert str(jobs["stage1"] / "checkpoint_last.pth") in (tmp_path / "logs" / "stage2.log").read_text()
