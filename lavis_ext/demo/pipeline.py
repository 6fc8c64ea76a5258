"""``make demo``: a tiny BLIP-2 x InternLM2 that visibly learns a synthetic world, on 2 CPU processes.

    python -m lavis_ext.demo [--output output/demo] [--instruct]

1. the world (:mod:`lavis_ext.demo.world`) and the tiny parts: a BERT Q-Former dir, an
   EVA-ViT briefly pretrained to tag grid cells (:mod:`lavis_ext.demo.pretrain_vit`), and stage 0,
   a tiny InternLM2 trained on the world's text (:mod:`lavis_ext.demo.pretrain_llm`);
2. stage 1 and stage 2 (with ``--instruct`` also stage 3: instruction tuning with LoRA on the
   world's LLaVA-format conversations) through ``run_scripts/`` and ``train.py`` with the demo
   yamls (``lavis_ext/demo/projects/``), exactly as real runs go;
3. held-out test images: caption attribute accuracy (colour F1, shape F1, object count) in English
   and in Chinese (stage 2 trains on both, each with its dataset's prompt; Chinese also CIDEr) and
   zero-shot VQA through ``evaluate.py`` (``run_scripts/blip2/eval/`` with the demo VQA yaml, the
   official VQA accuracy by answer type) of the trained model, against an untrained control (same
   parts, Q-Former and projection as initialised) and the chance and majority-answer baselines;
   with ``--instruct``, the instruction-tuned model's VQA in the chat format, through ``evaluate.py`` too;
4. a summary table, sample captions beside the truth, and the stages' loss curves in
   ``<output>/loss_curves.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from lavis_ext.runners.runner_ext import METRICS_FILE

REPO = Path(__file__).resolve().parents[2]
PROJECT_DIR = Path(__file__).resolve().parent / "projects"
STAGE1_YAML = PROJECT_DIR / "pretrain_stage1.yaml"
STAGE2_YAML = PROJECT_DIR / "pretrain_stage2.yaml"
VQA_YAML = PROJECT_DIR / "vqa_zeroshot_eval.yaml"
INSTRUCT_YAML = PROJECT_DIR / "instruct_lora.yaml"
VQA_INSTRUCT_YAML = PROJECT_DIR / "vqa_instruct_eval.yaml"
BERT_SIZES = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 256}
LLM_STEPS = 1000
VIT_STEPS = 200
EVAL_BATCH = 100
PROCESSES = {"NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1"}  # 2 CPU processes, one thread each
NUM_SAMPLES = 6  # sample captions shown beside the truth
ATTRIBUTE_GOAL = 0.8  # mean of colour F1, shape F1 and count accuracy on held-out images (each language)
OTHER_GOAL = 1.5  # VQA "other" accuracy over the majority baseline's
INSTRUCT_GOAL = 0.85  # instruction-tuned VQA accuracy, overall and on yes/no


# --------------------------------------------------------------------------- steps 1-2: parts and training


@contextmanager
def timed(timings: dict[str, float], name: str):
    """Record the wall time of the ``with`` block as ``timings[name]`` (seconds)."""
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


def make_assets(root: Path, llm_steps: int = LLM_STEPS, vit_steps: int = VIT_STEPS,
                world_sizes: dict[str, int] | None = None, chat_llm: bool = False) -> dict:
    """World under ``root/data/synthetic`` (the yamls' ``$LAVIS_CACHE_ROOT/synthetic``), then the parts;
    with ``chat_llm`` stage 0 also learns the chat template (for stage 3, as InternLM2-Chat knows it)."""
    from lavis_ext.demo.world import make_world
    from lavis_ext.tiny.blip2 import make_tiny_bert
    from lavis_ext.demo.pretrain_llm import pretrain_tiny_llm, stage0_examples, world_texts
    from lavis_ext.demo.pretrain_vit import pretrain_tiny_vit

    timings, results = {}, {}
    with timed(timings, "world"):
        world = make_world(root / "data" / "synthetic", sizes=world_sizes)
        bert = make_tiny_bert(root / "bert", texts=world_texts(stage0_examples(world)), **BERT_SIZES)
    with timed(timings, "vit"):
        results["vit"] = pretrain_tiny_vit(world, root / "vit", steps=vit_steps)
    with timed(timings, "stage0"):
        results["stage0"] = pretrain_tiny_llm(world, root / "llm", steps=llm_steps, chat=chat_llm)
    return {"world": world, "bert": bert, "vit": root / "vit", "llm": root / "llm", "timings": timings,
            "results": results}


def demo_env(root: Path, assets: dict) -> dict[str, str]:
    """The variables the demo yamls and the tiny model yaml read."""
    return {"LAVIS_CACHE_ROOT": str(root / "data"), "LAVIS_EXT_OUTPUT": str(root), "LAVIS_EXT_BERT": str(assets["bert"]),
            "LAVIS_EXT_VIT": str(assets["vit"]), "LAVIS_EXT_TINY_LLM": str(assets["llm"])}


def run_script(script: str, cfg_path: Path, options: list[str], env: dict[str, str], log: Path,
               output_dir: Path, progress: bool = False) -> Path:
    """Run ``run_scripts/blip2/<script>`` with ``CFG_PATH``, its output into ``log``; raise with the log's tail
    on failure. Returns the job dir the run made under its ``output_dir`` (earlier runs' job dirs stay
    beside it). With ``progress``, a progress bar counts the run's logged iterations."""
    env = {**os.environ, "PYTHON": sys.executable, "CFG_PATH": str(cfg_path), **env}
    command = ["bash", f"run_scripts/blip2/{script}"] + (["--options", *options] if options else [])
    print(f"running {command[1]} with {cfg_path.name} (log: {log})", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    earlier = job_dirs(output_dir)
    with open(log, "w") as out, tqdm(desc=f"{cfg_path.stem}: iterations", unit="it", disable=not progress) as bar:
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        while child.poll() is None:
            time.sleep(1.0)
            if progress:
                bar.update(sum(logged_iterations(job) for job in job_dirs(output_dir) - earlier) - bar.n)
    if child.returncode != 0:
        raise RuntimeError(f"{script} (CFG_PATH={cfg_path}) failed; the end of {log}:\n{log.read_text()[-4000:]}")
    new = job_dirs(output_dir) - earlier
    if len(new) != 1:
        raise RuntimeError(f"{script} (CFG_PATH={cfg_path}): expected one new job dir under {output_dir}, "
                           f"found {sorted(map(str, new))}")
    return new.pop()


def job_dirs(output_dir: Path) -> set[Path]:
    """The job dirs (``<job_id>/``) under a run's ``output_dir``."""
    return {p for p in output_dir.glob("*") if p.is_dir()}


def logged_iterations(job: Path) -> int:
    """Lines in the job's ``metrics.jsonl`` (runner_ext logs one per iteration)."""
    metrics = job / METRICS_FILE
    return len(metrics.read_bytes().splitlines()) if metrics.is_file() else 0


def train_stages(root: Path, env: dict[str, str], stage1_options: list[str] = (), stage2_options: list[str] = (),
                 instruct_options: list[str] | None = None, timings: dict[str, float] | None = None) -> dict[str, Path]:
    """Stage 1, stage 2 and, when ``instruct_options`` is given, stage 3 (2 CPU processes unless
    ``NPROC_PER_NODE`` says otherwise), each with its ``--options``; returns their job dirs. Each
    stage's wall time goes into ``timings`` when given."""
    env = {**PROCESSES, **env}
    timings = {} if timings is None else timings
    with timed(timings, "stage1"):
        stage1 = run_script("train/pretrain_stage1.sh", STAGE1_YAML, list(stage1_options), env,
                            root / "logs" / "stage1.log", root / "demo" / "pretrain_stage1", progress=True)
    with timed(timings, "stage2"):
        stage2 = run_script("train/pretrain_stage2_internlm.sh", STAGE2_YAML, list(stage2_options),
                            {**env, "LAVIS_EXT_STAGE1_CKPT": str(stage1 / "checkpoint_last.pth")},
                            root / "logs" / "stage2.log", root / "demo" / "pretrain_stage2", progress=True)
    jobs = {"stage1": stage1, "stage2": stage2}
    if instruct_options is not None:
        with timed(timings, "stage3"):
            jobs["stage3"] = run_script("train/instruct_internlm2_lora.sh", INSTRUCT_YAML, list(instruct_options),
                                        {**env, "LAVIS_EXT_STAGE2_CKPT": str(stage2 / "checkpoint_last.pth")},
                                        root / "logs" / "stage3.log", root / "demo" / "instruct_lora", progress=True)
    return jobs


# --------------------------------------------------------------------------- step 3: held-out evaluation


def load_demo_model(checkpoint: Path | None):
    """The demo's stage-2 model as the demo yaml builds it (paths from the environment), with the
    trainable weights of ``checkpoint``, or as initialised when ``None`` (the untrained control)."""
    from lavis.common.registry import registry
    from omegaconf import OmegaConf

    model_cls = registry.get_model_class("blip2_internlm")
    project = OmegaConf.load(STAGE2_YAML).model
    cfg = OmegaConf.merge(OmegaConf.load(model_cls.default_config_path(project.model_type)).model, project)
    cfg.pretrained = ""
    if checkpoint is not None:
        cfg.finetuned, cfg.load_finetuned = str(checkpoint), True
    torch.manual_seed(0)
    return model_cls.from_config(cfg).eval()


def split_images(world: Path, split: str, captions: str = "{split}.json") -> tuple[torch.Tensor, list[dict]]:
    """The split's images ``[N, 3, S, S]`` (eval processing) and caption records (file ``captions``), both by image id."""
    from lavis_ext.demo.world import read_world_file
    from lavis_ext.demo.pretrain_vit import load_split

    images, _, _ = load_split(world, split)
    return images, sorted(read_world_file(world, captions.format(split=split)), key=lambda r: r["image_id"])


def caption_scores(model, world: Path, split: str = "test",
                   language: str = "en") -> tuple[dict[str, float], list[tuple[str, str]]]:
    """Greedy captions of the split's images in ``language`` (``en``, or ``zh``: the Chinese prompt, as the
    ``synthetic_caption_zh`` set trains it); attribute scores (Chinese: also CIDEr, jieba-segmented) and
    ``(generated, truth)`` pairs."""
    from lavis_ext.demo.world import attribute_scores, parse_caption, parse_caption_zh
    from lavis_ext.tasks.captioning import score_captions
    from lavis_ext.text_zh import CAPTION_PROMPT_ZH

    prompt, captions, parse = ("", "{split}.json", parse_caption) if language == "en" else (
        CAPTION_PROMPT_ZH, "{split}_zh.json", parse_caption_zh)
    images, records = split_images(world, split, captions)
    truth = [r["caption"][0] for r in records]
    generated = []
    for i in range(0, len(images), EVAL_BATCH):
        batch = images[i:i + EVAL_BATCH]
        generated += model.generate({"image": batch, "prompt": [prompt] * len(batch)}, num_beams=1, max_length=20)
    scores = attribute_scores(generated, truth, parse)
    if language == "zh":
        scores["cider"] = score_captions(dict(enumerate(generated)), dict(enumerate(r["caption"] for r in records)),
                                         "jieba")[0]["CIDEr"]
    return scores, list(zip(generated, truth))


def vqa_accuracy(root: Path, env: dict[str, str], name: str, checkpoint: Path | None,
                 yaml: Path = VQA_YAML, checkpoint_variable: str = "LAVIS_EXT_STAGE2_CKPT") -> dict[str, float]:
    """VQA of the test split through ``evaluate.py``, as real evaluations run: ``yaml`` (zero-shot, or
    the instruction-tuned model's chat format) with ``run_scripts/blip2/eval/vqav2_zeroshot_internlm2.sh``
    on 2 processes. ``checkpoint`` None evaluates the untrained control. Returns the official VQA
    accuracy per answer type, as a fraction."""
    from lavis_ext.demo.world import ANSWER_TYPES

    output = root / "demo" / f"vqa_{name}"
    job = run_script("eval/vqav2_zeroshot_internlm2.sh", yaml, [f"run.output_dir={output}"],
                     {**PROCESSES, **env, checkpoint_variable: str(checkpoint or "")},
                     root / "logs" / f"vqa_{name}.log", output)
    metrics = json.loads((job / "test_metrics.json").read_text())
    return {"overall": metrics["agg_metrics"] / 100, **{t: metrics[t] / 100 for t in ANSWER_TYPES}}


def evaluate(root: Path, env: dict[str, str], world: Path, stage2: Path, stage3: Path | None = None) -> dict:
    """Trained model vs untrained control on the test split, and the chance and majority baselines;
    with ``stage3``, also the instruction-tuned model's VQA (``instruction-tuned``)."""
    from lavis_ext.demo.world import chance_baseline, majority_baseline, read_annotations

    train, test = read_annotations(world, "train"), read_annotations(world, "test")
    result = {"chance": {"vqa": chance_baseline(train, test)}, "majority": {"vqa": majority_baseline(train, test)}}
    for name, checkpoint in (("untrained", None), ("trained", stage2 / "checkpoint_last.pth")):
        model = load_demo_model(checkpoint)
        scores, samples = caption_scores(model, world)
        scores_zh, samples_zh = caption_scores(model, world, language="zh")
        result[name] = {"captions": scores, "samples": samples[:NUM_SAMPLES], "captions_zh": scores_zh,
                        "samples_zh": samples_zh[:NUM_SAMPLES], "vqa": vqa_accuracy(root, env, name, checkpoint)}
    if stage3 is not None:
        result["instruction-tuned"] = {"vqa": vqa_accuracy(root, env, "instruct", stage3 / "checkpoint_last.pth",
                                                           VQA_INSTRUCT_YAML, "LAVIS_EXT_STAGE3_CKPT")}
    return result


# --------------------------------------------------------------------------- step 4: report


def goals(result: dict) -> dict[str, bool]:
    """What the demo sets out to show, each true or false."""
    trained, untrained, majority = result["trained"], result["untrained"], result["majority"]
    met = {f"caption attribute accuracy >= {ATTRIBUTE_GOAL}": trained["captions"]["attribute"] >= ATTRIBUTE_GOAL,
           f"Chinese caption attribute accuracy >= {ATTRIBUTE_GOAL}, CIDEr above the untrained control's": (
               trained["captions_zh"]["attribute"] >= ATTRIBUTE_GOAL
               and trained["captions_zh"]["cider"] > untrained["captions_zh"]["cider"])}
    for kind in ("overall", "other"):
        met[f"VQA {kind} beats the majority baseline and the untrained control"] = (
            trained["vqa"][kind] > max(majority["vqa"][kind], untrained["vqa"][kind]))
    met[f"VQA other >= {OTHER_GOAL}x the majority baseline"] = (
        trained["vqa"]["other"] >= OTHER_GOAL * majority["vqa"]["other"])
    if "instruction-tuned" in result:
        instructed = result["instruction-tuned"]["vqa"]
        met[f"instruction-tuned VQA overall and yes/no >= {INSTRUCT_GOAL}"] = (
            instructed["overall"] >= INSTRUCT_GOAL and instructed["yes/no"] >= INSTRUCT_GOAL)
    return met


def summary(stages: dict[str, dict], result: dict) -> str:
    """Tables of the stages (seconds, steps, first and last loss) and of the held-out scores, samples and goals."""
    lines = ["", f"{'stage':<10}{'seconds':>9}{'steps':>8}{'first loss':>12}{'last loss':>12}"]
    for name, stage in stages.items():
        losses_cells = (f"{stage['steps']:>8}{stage['first_loss']:>12.4f}{stage['last_loss']:>12.4f}"
                        if "steps" in stage else "")
        lines.append(f"{name:<10}{stage['seconds']:>9.0f}{losses_cells}")
    lines.append(f"{'total':<10}{sum(stage['seconds'] for stage in stages.values()):>9.0f}")
    lines += ["", "held-out test images (trained: stage 2, VQA zero-shot; instruction-tuned: stage 3, VQA in the "
              "chat format)", f"{'model':<18}{'attribute':>10}{'colour F1':>10}{'shape F1':>10}"
              f"{'count':>7}{'VQA y/n':>9}{'number':>8}{'other':>7}{'overall':>9}"]
    for name in [n for n in ("chance", "majority", "untrained", "trained", "instruction-tuned") if n in result]:
        captions, vqa = result[name].get("captions"), result[name]["vqa"]
        caption_cells = (f"{captions['attribute']:>10.3f}{captions['colour_f1']:>10.3f}{captions['shape_f1']:>10.3f}"
                         f"{captions['count_acc']:>7.3f}" if captions else f"{'':>37}")
        lines.append(f"{name:<18}{caption_cells}{vqa['yes/no']:>9.3f}{vqa['number']:>8.3f}{vqa['other']:>7.3f}"
                     f"{vqa['overall']:>9.3f}")
    lines += ["", "held-out test images, Chinese captions (prompt '一张图片的描述：'; CIDEr on jieba-segmented text)",
              f"{'model':<18}{'attribute':>10}{'colour F1':>10}{'shape F1':>10}{'count':>7}{'CIDEr':>8}"]
    for name in ("untrained", "trained"):
        zh = result[name]["captions_zh"]
        lines.append(f"{name:<18}{zh['attribute']:>10.3f}{zh['colour_f1']:>10.3f}{zh['shape_f1']:>10.3f}"
                     f"{zh['count_acc']:>7.3f}{zh['cider']:>8.3f}")
    for key, language in (("samples", "English"), ("samples_zh", "Chinese")):
        lines += ["", f"sample captions, {language} (trained | truth)"]
        lines += [f"  {generated!r:<45} | {truth!r}" for generated, truth in result["trained"][key]]
    lines += ["", "goals"] + [f"  [{'x' if met else ' '}] {goal}" for goal, met in goals(result).items()]
    return "\n".join(lines)


def run_demo(root: Path, instruct: bool = False) -> dict:
    """Everything above into ``root`` (stage 3 with ``instruct``); returns the stages, the evaluation
    and the plot's path."""
    from lavis_ext.tools.plot_log import plot_stages, read_job

    assets = make_assets(root, chat_llm=instruct)
    env = demo_env(root, assets)
    os.environ.update(env)  # the in-process evaluation builds the model from the same yaml
    timings = dict(assets["timings"])
    jobs = train_stages(root, env, instruct_options=[] if instruct else None, timings=timings)
    with timed(timings, "evaluate"):
        result = evaluate(root, env, assets["world"], jobs["stage2"], jobs.get("stage3"))
    stages = {name: {"seconds": seconds} for name, seconds in timings.items()}
    stages["vit"].update(steps=VIT_STEPS, **assets["results"]["vit"])
    stages["stage0"].update(steps=LLM_STEPS, **assets["results"]["stage0"])
    for name, job in jobs.items():
        values = read_job(job).series["loss"]
        stages[name].update(steps=len(values), first_loss=values[0], last_loss=values[-1])
    names = {"stage1": "stage 1", "stage2": "stage 2", "stage3": "stage 3 (LoRA)"}
    plot = plot_stages({names[stage]: job for stage, job in jobs.items()}, root / "loss_curves.png")
    return {"stages": stages, "evaluation": result, "plot": plot}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m lavis_ext.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="output/demo", help="where data, parts, checkpoints and logs go")
    parser.add_argument("--instruct", action="store_true",
                        help="stage 0 also learns the chat template; then stage 3 (LoRA instruction tuning) "
                             "and its VQA row; about 4 more minutes")
    args = parser.parse_args(argv)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(2)  # the machine budget: 2 CPU cores
    root = Path(args.output).absolute()
    report = run_demo(root, instruct=args.instruct)
    print(summary(report["stages"], report["evaluation"]))
    print(f"\nloss curves: {report['plot']}\noutputs: {root}")
    (root / "summary.json").write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
