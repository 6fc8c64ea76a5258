"""``run.data_parallel: fsdp`` (FSDP2) against DDP on 2 CPU gloo ranks, through train.py.

One torchrun launch runs every configuration in turn (``python tests/test_fsdp.py RUNS.json``, the
``__main__`` below), as each launch costs seconds of imports per rank: stage 3 (LoRA) and a fully
trainable LLM under DDP and FSDP, an FSDP run stopped after 3 steps and resumed, stage 1
(whose ITC temperature is a 0-dim parameter that FSDP leaves whole), and steps of a model whose
LLM and ViT train in bf16 beside the fp32 Q-Former side.
"""
from __future__ import annotations

import ast
import json
import os
import re
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from conftest import losses, torchrun
from lavis_ext.errors import ConfigError
from lavis_ext.run_options import RunOptions

INSTRUCT_YAML = "lavis_ext/demo/projects/instruct_lora.yaml"
STAGE1_YAML = "lavis_ext/projects/blip2/train/pretrain_stage1.yaml"
# 20 conversations / (2 per batch x 2 ranks) x 2 epochs = 10 steps
INSTRUCT = ["run.batch_size_train=2", "run.max_epoch=2", "run.warmup_steps=1", "model.image_size=32",
            "datasets.llava_conversation.vis_processor.train.image_size=32"]
LORA = ["model.lora_rank=4"]
FULL_LLM = ["model.lora_rank=0", "model.freeze_llm=False"]
BYTES_LINE = re.compile(r"fsdp: units (\{.*?\}) and the root; parameter bytes per rank: (\d+) of (\d+) "
                        r"\(ranks: \[(\d+), (\d+)\]\)")
LOSS_TOLERANCE = 1e-5


def mixed_dtype_steps(steps: int = 2) -> dict:
    """Steps of the tiny stage-2 model sharded with its LLM and ViT trainable in bf16 (what
    ``model.llm_dtype``/``model.vit_precision`` give on CUDA; on CPU the model loads them in fp32)
    beside the fp32 Q-Former side, under bf16 autocast (``run.amp: bf16``). Returns the losses and
    the parameters left gathered (not DTensor shards) after the first forward."""
    from torch.distributed.tensor import DTensor

    from lavis_ext.models.blip2_models.blip2_internlm import Blip2InternLM
    from lavis_ext.runners.fsdp import shard_model

    cfg = OmegaConf.load(Blip2InternLM.default_config_path("tiny")).model
    cfg.merge_with({"freeze_llm": False, "freeze_vit": False})
    torch.manual_seed(0)
    model = Blip2InternLM.from_config(cfg)
    model.llm.to(torch.bfloat16)
    model.visual_encoder.to(torch.bfloat16)
    shard_model(model, torch.device("cpu"), dist.get_world_size())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    result = {"losses": []}
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model({"image": images, "text_input": ["a red cross", "two blue squares"]})["loss"]
        result.setdefault("gathered_after_forward",
                          sorted(name for name, p in model.named_parameters() if not isinstance(p, DTensor)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        result["losses"].append(loss.item())
    return result


def probe_main(runs_file: str) -> None:
    """Each run of ``runs_file`` (``[name, train.py argv]`` pairs) through lavis_ext.cli.run, in one
    process group; :func:`mixed_dtype_steps`; then runner_ext's ``close()`` on a sharded model,
    with the real teardown. Lines for the test go to stdout (LAVIS's ``print`` is silent on rank 1)."""
    from torch.distributed.fsdp import fully_shard

    from lavis_ext.cli import run
    from lavis_ext.runners.runner_ext import RunnerExt

    destroy = dist.destroy_process_group
    dist.destroy_process_group = lambda *args, **kwargs: None  # the next run needs the group close() would end
    for name, argv in json.loads(Path(runs_file).read_text()):
        if os.environ["RANK"] == "0":  # rank 0's log is the one the test reads
            print(f"probe run: {name}", file=sys.stderr, flush=True)
        run(argv, evaluate=False)
    try:  # FSDP checks the dtypes before any collective, on every rank alike: the other checks still run
        mixed = mixed_dtype_steps()
    except Exception as exc:
        mixed = {"error": repr(exc)}
    sys.stdout.write(f"mixed dtypes, rank {dist.get_rank()}: {json.dumps(mixed)}\n")

    runner = RunnerExt.__new__(RunnerExt)  # only what close() uses
    runner._model = runner._wrapped_model = fully_shard(torch.nn.Linear(2, 2))
    runner._optimizer = torch.optim.AdamW(runner._model.parameters())
    runner._lr_sched = None
    sharded = weakref.ref(runner._model)

    def checked_destroy():
        sys.stdout.write(f"rank {dist.get_rank()}: sharded model alive at destroy: {sharded() is not None}\n")
        sys.stdout.flush()
        destroy()

    dist.destroy_process_group = checked_destroy
    runner.close()


@pytest.fixture(scope="module")
def fsdp_runs(tiny_env, tiny_coco, tmp_path_factory):
    """The launch; returns its output root, the log of each run (by name) and the tiny LLM.

    The LLM's positions cover the conversations (queries + 112 text tokens): beyond
    ``max_position_embeddings`` dynamic NTK would make a resumed run's losses depend on history.
    """
    from lavis_ext.demo.world import make_world
    from lavis_ext.tiny.data import make_vg_caption_data
    from lavis_ext.tiny.internlm2 import make_tiny_internlm2
    from test_pretrain_pipeline import TINY_RUN, data_options

    root = tmp_path_factory.mktemp("fsdp")
    make_world(root / "data" / "synthetic", sizes={"train": 20, "val": 1, "test": 1})
    llm = make_tiny_internlm2(root / "llm", max_position_embeddings=256)
    env = {**tiny_env, "LAVIS_CACHE_ROOT": str(root / "data"), "LAVIS_EXT_TINY_LLM": str(llm)}
    env.pop("LAVIS_EXT_STAGE1_CKPT", None)
    env.pop("LAVIS_EXT_STAGE2_CKPT", None)
    stage1 = [*data_options(tiny_coco, make_vg_caption_data(root / "vg", num_images=4)), *TINY_RUN]

    def instruct(name, *extra, resume=()):
        return [name, ["--cfg-path", INSTRUCT_YAML, *resume, "--options", *INSTRUCT, *extra,
                       f"run.output_dir={root / name}"]]

    runs = [instruct("ddp_lora", *LORA), instruct("fsdp_lora", *LORA, "run.data_parallel=fsdp"),
            instruct("ddp_full", *FULL_LLM), instruct("fsdp_full", *FULL_LLM, "run.data_parallel=fsdp"),
            instruct("fsdp_part", *LORA, "run.data_parallel=fsdp", "run.max_iters=3"),
            instruct("fsdp_part", *LORA, "run.data_parallel=fsdp", resume=["--resume", "auto"]),
            ["stage1_ddp", ["--cfg-path", STAGE1_YAML, "--options", *stage1, f"run.output_dir={root / 'stage1_ddp'}"]],
            ["stage1_fsdp", ["--cfg-path", STAGE1_YAML, "--options", *stage1, "run.data_parallel=fsdp",
                             f"run.output_dir={root / 'stage1_fsdp'}"]]]
    runs_file = root / "runs.json"
    runs_file.write_text(json.dumps(runs))
    result = torchrun([str(Path(__file__).resolve()), str(runs_file)], env, timeout=240)
    assert result.returncode == 0, result.stderr[-6000:]
    logs: dict[str, str] = {}
    for part in result.stderr.split("probe run: ")[1:]:
        name, log = part.split("\n", 1)
        logs[name] = logs.get(name, "") + log
    return SimpleNamespace(root=root, logs=logs, stdout=result.stdout, llm=llm)


def checkpoint(output_dir: Path) -> dict:
    (path,) = output_dir.glob("*/checkpoint_last.pth")
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("case", ["lora", "full", "stage1"])
def test_fsdp_losses_equal_ddp(fsdp_runs, case):
    """Stage 3 with LoRA (trainable A/B beside frozen weights in each decoder layer's unit), the LLM
    fully trainable, and stage 1 (its Q-Former layers run several times per forward)."""
    ddp_name, fsdp_name = ("stage1_ddp", "stage1_fsdp") if case == "stage1" else (f"ddp_{case}", f"fsdp_{case}")
    ddp, fsdp = losses(fsdp_runs.root / ddp_name), losses(fsdp_runs.root / fsdp_name)
    assert len(ddp) == len(fsdp) == 10
    assert max(abs(a - b) for a, b in zip(ddp, fsdp)) <= LOSS_TOLERANCE, (ddp, fsdp)
    assert ddp[-1] < ddp[0]  # it trains


@pytest.mark.parametrize("case", ["lora", "full"])
def test_fsdp_checkpoint_has_the_ddp_format(fsdp_runs, case):
    """Full trainable weights under the model's names (stage 2 and evaluate.py load them without FSDP),
    and the optimizer state numbered as ``optimizer.state_dict()`` numbers it."""
    ddp, fsdp = checkpoint(fsdp_runs.root / f"ddp_{case}"), checkpoint(fsdp_runs.root / f"fsdp_{case}")
    assert list(fsdp["model"]) == list(ddp["model"])
    if case == "lora":
        assert any(".lora_B." in k for k in fsdp["model"]) and not any(".base_layer." in k for k in fsdp["model"])
    for key, tensor in fsdp["model"].items():
        assert type(tensor) is torch.Tensor and tensor.shape == ddp["model"][key].shape, key
        assert torch.allclose(tensor, ddp["model"][key], atol=LOSS_TOLERANCE), key
    assert fsdp["optimizer"]["param_groups"] == ddp["optimizer"]["param_groups"]
    assert list(fsdp["optimizer"]["state"]) == list(ddp["optimizer"]["state"])
    for number, state in fsdp["optimizer"]["state"].items():
        for key, tensor in state.items():
            assert type(tensor) is torch.Tensor, (number, key)
            assert torch.allclose(tensor, ddp["optimizer"]["state"][number][key], atol=LOSS_TOLERANCE), (number, key)


def test_fsdp_resume_is_exact(fsdp_runs):
    assert "at epoch 0, iteration 3" in fsdp_runs.logs["fsdp_part"]  # stopped after step 3 of 5
    assert losses(fsdp_runs.root / "fsdp_part") == losses(fsdp_runs.root / "fsdp_lora")


def test_parameter_bytes_per_rank_are_about_half(fsdp_runs, tiny_parts):
    # units: each layer or block; the LLM's embeddings, decoder (final norm) and LM head; the ViT around its blocks
    layers = {"llm": json.loads((fsdp_runs.llm / "config.json").read_text())["num_hidden_layers"] + 3,
              "vit": json.loads((tiny_parts["vit"] / "config.json").read_text())["depth"] + 1,
              "qformer": json.loads((tiny_parts["bert"] / "config.json").read_text())["num_hidden_layers"]}
    for name in ("fsdp_lora", "fsdp_full", "stage1_fsdp"):
        (line,) = BYTES_LINE.findall(fsdp_runs.logs[name])
        units, local, full, rank0, rank1 = ast.literal_eval(line[0]), *map(int, line[1:])
        expected = {k: v for k, v in layers.items() if k != "llm" or name != "stage1_fsdp"}
        assert units == expected, (name, line)
        assert local == rank0 and 0 <= rank0 + rank1 - full <= 4, (name, line)  # stage 1's 0-dim temp: on both
        assert abs(rank0 / full - 0.5) < 0.05 and abs(rank1 / full - 0.5) < 0.05, (name, line)


def mixed_dtype_results(stdout: str) -> list[dict]:
    return [json.loads(line) for line in re.findall(r"^mixed dtypes, rank \d: (.*)$", stdout, re.MULTILINE)]


def test_llm_and_vit_train_in_bf16_beside_the_fp32_qformer(fsdp_runs):
    """FSDP2 reduce-scatters a unit's gradients in one dtype: the parts of another dtype need units of their own."""
    rank0, rank1 = mixed_dtype_results(fsdp_runs.stdout)
    assert "error" not in rank0 and "error" not in rank1, (rank0, rank1)
    assert rank0["losses"] == rank1["losses"] and len(rank0["losses"]) == 2
    assert all(0 < value < 100 for value in rank0["losses"])


def test_units_are_freed_after_their_forward(fsdp_runs):
    """Between forward and backward only the root's parameters and the input embeddings (gathered
    once for all samples) stay gathered; every layer, block and the LM head is back to its shards."""
    for result in mixed_dtype_results(fsdp_runs.stdout):
        gathered = result["gathered_after_forward"]
        assert "llm.model.embed_tokens.weight" in gathered and "query_tokens" in gathered, gathered
        assert not [name for name in gathered if re.search(r"\.(layers|blocks|layer)\.|lm_head|model\.norm", name)], \
            gathered


def test_close_frees_the_sharded_model_before_the_group(fsdp_runs):
    for rank in (0, 1):
        assert f"rank {rank}: sharded model alive at destroy: False" in fsdp_runs.stdout


def test_bad_data_parallel_is_refused():
    assert RunOptions.from_run_cfg({}).data_parallel == "ddp"
    with pytest.raises(ConfigError, match=r"run\.data_parallel = 'zero3': expected one of ddp, fsdp"):
        RunOptions.from_run_cfg({"data_parallel": "zero3"})


@pytest.mark.parametrize(("run", "refused"), [
    ({"valid_splits": ["val"]}, r"run\.valid_splits = \['val'\]"),
    ({"test_splits": ["test"]}, r"run\.test_splits = \['test'\]"),
    ({"evaluate": True, "test_splits": ["test"]}, None),  # evaluate.py: the model is not sharded
    ({"data_parallel": "ddp", "valid_splits": ["val"]}, None),
])
def test_fsdp_training_with_evaluation_splits_is_refused(run, refused):
    from lavis_ext.runners.runner_ext import RunnerExt

    runner = RunnerExt.__new__(RunnerExt)  # only what the check reads: the run config
    runner.config = SimpleNamespace(run_cfg=OmegaConf.create({"data_parallel": "fsdp", "evaluate": False, **run}))
    if refused is None:
        runner._refuse_sharded_evaluation()
        return
    with pytest.raises(ConfigError, match=rf"run\.data_parallel = 'fsdp' with {refused}.*evaluate\.py"):
        runner._refuse_sharded_evaluation()


if __name__ == "__main__":
    probe_main(sys.argv[1])
