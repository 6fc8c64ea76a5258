"""The demo: BLIP-2 x InternLM2 trained end to end on built-in data, in minutes on a CPU.

- :mod:`~lavis_ext.demo.world`: the synthetic world (images of coloured shapes, English and Chinese
  captions, VQA questions, LLaVA-format conversations) and its dataset builders;
- :mod:`~lavis_ext.demo.pretrain_vit`, :mod:`~lavis_ext.demo.pretrain_llm`: stage 0, which gives the
  tiny ViT and the tiny InternLM2-layout LLM something to know before BLIP-2's stages;
- ``projects/``: the demo's stage-1, stage-2, instruction-tuning and evaluation yamls;
- :mod:`~lavis_ext.demo.pipeline`: ``make demo`` (``python -m lavis_ext.demo``), which runs it all
  through ``run_scripts/`` and prints the held-out results.
"""
