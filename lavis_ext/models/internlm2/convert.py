"""Convert a local InternLM2 checkpoint into a plain Llama-layout copy.

    python -m lavis_ext.models.internlm2.convert SRC DST [--dtype auto] [--max-shard-size 5GB]

DST gets ``config.json`` (``model_type: llama``), ``model.safetensors`` (sharded with an
index when larger than ``--max-shard-size``), ``generation_config.json`` (with SRC's eos ids,
e.g. ``[2, 92542]`` for the chat models) and ``tokenizer.model`` + ``tokenizer_config.json``
for transformers' ``LlamaTokenizer``. No remote code is needed to load the result.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from lavis_ext.models.internlm2.conversion import CONFIG_FILE, load_internlm2_llm
from lavis_ext.models.internlm2.tokenizer import load_internlm2_tokenizer

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _resolve_dtype(name: str, src: Path) -> torch.dtype:
    """``auto`` keeps the checkpoint's ``torch_dtype`` (so a bf16 7B is not doubled in memory)."""
    if name != "auto":
        return DTYPES[name]
    saved = json.loads((src / CONFIG_FILE).read_text(encoding="utf-8")).get("torch_dtype", "float32")
    if saved not in DTYPES:
        raise ValueError(f"{src / CONFIG_FILE}: torch_dtype {saved!r} is not one of {sorted(DTYPES)}")
    return DTYPES[saved]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", type=Path, help="InternLM2 checkpoint directory (hub layout)")
    parser.add_argument("dst", type=Path, help="output directory for the Llama-layout copy")
    parser.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto", help="weight dtype (auto: as saved)"
    )
    parser.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB or 500MB"
    )
    args = parser.parse_args(argv)

    dtype = _resolve_dtype(args.dtype, args.src)
    model = load_internlm2_llm(args.src, torch_dtype=dtype, attn_implementation="eager")
    model.save_pretrained(args.dst, max_shard_size=args.max_shard_size, safe_serialization=True)
    load_internlm2_tokenizer(args.src).save_pretrained(args.dst)
    print(f"wrote a Llama-layout copy of {args.src} to {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
