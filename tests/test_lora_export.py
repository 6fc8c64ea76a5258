"""export_adapter: the PEFT adapter and the merged Llama load without lavis-ext and give lavis-ext's logits."""
from __future__ import annotations

import json

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import run_python
from lavis_ext.models.internlm2.convert import main as convert
from lavis_ext.tools.export_adapter import BLIP2_WEIGHTS, main as export_adapter
from test_lora import build, trainable_state, trained_step

# Runs in a fresh interpreter: only transformers and peft, never lavis_ext. The one patch applied is
# the environment's: the CPU torch here cannot import the CUDA torchvision wheel without it.
LOAD_SCRIPT = """
import json, sys, torch
import lavis_ext_patches.torchvision_cpu
lavis_ext_patches.torchvision_cpu.apply()
from peft import PeftModel
from transformers import LlamaForCausalLM
converted, adapter, merged, ids_file = sys.argv[1:]
ids = torch.load(ids_file)
with torch.no_grad():
    base = LlamaForCausalLM.from_pretrained(converted, torch_dtype=torch.float32).eval()
    base_logits = base(input_ids=ids).logits
    with_adapter = PeftModel.from_pretrained(base, adapter).eval()(input_ids=ids).logits
    plain = LlamaForCausalLM.from_pretrained(merged, torch_dtype=torch.float32).eval()(input_ids=ids).logits
torch.save({"base": base_logits, "adapter": with_adapter, "merged": plain}, ids_file + ".out.pt")
print(json.dumps({"lavis_ext imported": any(m == "lavis_ext" or m.startswith("lavis_ext.") for m in sys.modules)}))
"""


def test_exported_adapter_and_merged_llm_match_lavis_ext(tiny_model_env, tiny_llm, tmp_path):
    model = build(lora_rank=4, lora_target_modules=["q_proj", "v_proj", "down_proj"])
    trained_step(model)  # LoRA's B moves away from zero
    cfg = OmegaConf.merge(OmegaConf.load(model.default_config_path("tiny")).model,
                          {"lora_rank": 4, "lora_target_modules": ["q_proj", "v_proj", "down_proj"]})
    checkpoint = tmp_path / "stage3.pth"
    torch.save({"model": trainable_state(model), "config": {"model": OmegaConf.to_container(cfg, resolve=True)}},
               checkpoint)
    export_adapter([str(checkpoint), str(tmp_path / "adapter")])
    export_adapter([str(checkpoint), str(tmp_path / "merged"), "--merge"])
    convert([str(tiny_llm), str(tmp_path / "converted")])

    ids = torch.tensor([model.llm_tokenizer.encode("a red circle and two blue squares")])
    torch.save(ids, tmp_path / "ids.pt")
    model.eval()
    with torch.no_grad():
        reference = model.llm(input_ids=ids).logits
    result = run_python(["-c", LOAD_SCRIPT, str(tmp_path / "converted"), str(tmp_path / "adapter"),
                         str(tmp_path / "merged"), str(tmp_path / "ids.pt")], {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {"lavis_ext imported": False}
    logits = torch.load(tmp_path / "ids.pt.out.pt")
    assert (logits["base"] - reference).abs().max() > 1e-3  # the adapter changes the LLM
    assert (logits["adapter"] - reference).abs().max() < 1e-5
    assert (logits["merged"] - reference).abs().max() < 1e-5

    adapter_keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.model.layers.") and ".default." not in k for k in adapter_keys)
    blip2 = load_file(tmp_path / "adapter" / BLIP2_WEIGHTS)
    assert {k.split(".", 1)[0] for k in blip2} == {"query_tokens", "ln_vision", "qformer", "llm_proj"}
    assert torch.equal(blip2["llm_proj.weight"], model.llm_proj.weight.detach())
