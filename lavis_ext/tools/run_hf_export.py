"""Run an exported BLIP-2 with transformers alone, for ``lavis_ext.tools.export_hf --verify``.

    python lavis_ext/tools/run_hf_export.py CASES.json RESULTS_DIR

Run as a file, never as ``-m lavis_ext...``: this process must not import ``lavis_ext`` or
``lavis`` (it records in ``results.json`` whether either got imported). It loads the export
with ``Blip2ForConditionalGeneration.from_pretrained`` and ``Blip2Processor.from_pretrained``
only, as a user of the published directory would, and writes what they would get:

- ``tensors.safetensors``: ``pixel_values.{i}`` of each image (``[3, H, W]``) and
  ``logits.{j}`` of each logits case (``[T, vocab]``, the full sequence: image tokens, bos, prompt);
- ``results.json``: token ids of each tokenizer probe and their decoded text, and greedy
  captions and VQA answers (new ids up to the first stop id, and their decoded text).

CASES.json (written by ``export_hf``) holds the export directory, image files, logits cases
(``layout: "front"``: the processor prepends the image tokens; ``"inline"``: the text holds
``<image>`` where the image goes), captions and answers to generate (``items``: image and text,
put into ``template``, then into the chat template when ``chat``) and the tokenizer probes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# This repository's venv pairs a CPU torch with a CUDA torchvision wheel that cannot import
# there; transformers' image utilities import torchvision. The repository's fix defines the two
# missing op schemas and nothing else (a no-op where torchvision loads); it is not lavis_ext.
import lavis_ext_patches.torchvision_cpu  # noqa: E402

lavis_ext_patches.torchvision_cpu.apply()

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import Blip2ForConditionalGeneration, Blip2Processor  # noqa: E402


def cut_at_stop(ids: list[int], stop_ids: set[int]) -> list[int]:
    for i, token_id in enumerate(ids):
        if token_id in stop_ids:
            return ids[:i]
    return ids


def greedy(model, processor, images: list, prompts: list[str], max_new_tokens: int,
           add_special_tokens: bool) -> list[dict]:
    """Greedy generation for a batch (left padding); per row the new ids up to the first stop id."""
    inputs = processor(images=images, text=prompts, padding=True, add_special_tokens=add_special_tokens,
                       return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                min_new_tokens=1)
    eos = model.generation_config.eos_token_id
    stop_ids = set(eos if isinstance(eos, list) else [eos])
    rows = []
    for row in output[:, inputs["input_ids"].shape[1]:].tolist():
        ids = cut_at_stop(row, stop_ids)
        rows.append({"ids": ids, "text": processor.decode(ids, skip_special_tokens=True)})
    return rows


def main(cases_file: str, results_dir: str) -> None:
    cases = json.loads(Path(cases_file).read_text(encoding="utf-8"))
    out = Path(results_dir)
    model = Blip2ForConditionalGeneration.from_pretrained(cases["export_dir"]).eval()
    processor = Blip2Processor.from_pretrained(cases["export_dir"])
    tokenizer = processor.tokenizer
    images = [Image.open(path).convert("RGB") for path in cases["images"]]
    tensors = {f"pixel_values.{i}": processor.image_processor(image, return_tensors="pt")["pixel_values"][0]
               for i, image in enumerate(images)}

    n_query = model.config.num_query_tokens
    for j, case in enumerate(cases["logit_cases"]):
        image = images[case["image"]]
        if case["layout"] == "front":
            inputs = processor(images=image, text=case["text"], return_tensors="pt")
        else:  # the text marks the image's place with one <image>; the model needs one per query
            text = case["text"].replace("<image>", "<image>" * n_query)
            inputs = dict(tokenizer(text, return_tensors="pt"), **processor.image_processor(image, return_tensors="pt"))
        with torch.no_grad():
            tensors[f"logits.{j}"] = model(**inputs).logits[0].contiguous()
    save_file(tensors, str(out / "tensors.safetensors"))

    tokenizer.padding_side = "left"
    generated = {}
    for kind in ("captions", "answers"):
        spec = cases[kind]
        prompts = [spec["template"].format(text) for _, text in spec["items"]]
        if spec["chat"]:  # the chat template starts with the bos token itself
            prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                     tokenize=False) for p in prompts]
        generated[kind] = greedy(model, processor, [images[i] for i, _ in spec["items"]], prompts,
                                 spec["max_new_tokens"], add_special_tokens=not spec["chat"])

    token_ids = []
    for probe in cases["token_probes"]:
        if "messages" in probe:
            token_ids.append(tokenizer.apply_chat_template(probe["messages"], add_generation_prompt=True,
                                                           tokenize=True))
        else:
            token_ids.append(tokenizer(probe["text"])["input_ids"])
    results = {
        "token_ids": token_ids,
        "decoded": [tokenizer.decode(ids, skip_special_tokens=True) for ids in token_ids],
        **generated,
        "imported": sorted(name for name in ("lavis_ext", "lavis") if name in sys.modules),
    }
    (out / "results.json").write_text(json.dumps(results, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:])
