"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for lavis-ext's models, and full checkpoints of them.

:func:`shard_model` splits every parameter of a model, frozen or not, into one shard per rank
(along dim 0). Each module below is a unit of its own: its parameters are gathered just before
its forward and freed after it, and gathered again for its backward. Found by role
(:func:`shard_units`), innermost first:

- LLM (``blip2_internlm``, also through PEFT when LoRA wraps it): each decoder layer
  (``llm.get_decoder().layers``), the input embeddings, the decoder around the layers (its final
  norm) and the LM head;
- ViT: each block (``visual_encoder.blocks``), then ``visual_encoder`` (patch and position embeddings);
- Q-Former: each BERT layer, ``qformer.encoder.layer`` (stage 2) or ``Qformer.bert.encoder.layer``
  (stage 1, ``blip2_qformer_ext`` and LAVIS's ``blip2``).

The root unit, the model, holds the rest: ``query_tokens``, ``ln_vision``, ``llm_proj``, the
Q-Former's embeddings (stage 1: its LM head and projections). FSDP2 reduce-scatters a unit's
gradients in one dtype, so the LLM's and the ViT's own parameters (``model.llm_dtype``,
``model.vit_precision``) are never in a unit with the fp32 Q-Former side. FSDP2 shards parameter
by parameter, so LoRA's trainable A/B and the frozen weights beside them share a decoder layer's
unit; gradients are reduce-scattered for the trainable ones only.

Checkpoints keep runner_ext's format, so stage 2 and ``evaluate.py`` load them without FSDP:
the trainable weights in full, under the model's own names (:func:`full_trainable_state_dict`),
and the optimizer state as ``optimizer.state_dict()`` numbers it (:func:`full_optimizer_state_dict`).
"""
from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from lavis_ext.checkpoint import check_loaded_keys
from lavis_ext.errors import CheckpointError


def shard_units(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The modules that get a unit of their own, by part, innermost first (``fully_shard`` must
    wrap the units inside a module before the module); parts the model does not have are left out."""
    units = {}
    llm = getattr(model, "llm", None)
    if llm is not None:
        decoder = llm.get_decoder()
        units["llm"] = [*decoder.layers, llm.get_input_embeddings(), decoder, llm.get_output_embeddings()]
    vit = getattr(model, "visual_encoder", None)
    if vit is not None:
        units["vit"] = [*vit.blocks, vit]
    qformer = getattr(model, "qformer", None)
    if qformer is None and hasattr(model, "Qformer"):
        qformer = model.Qformer.bert
    if qformer is not None:
        units["qformer"] = list(qformer.encoder.layer)
    return units


def shard_model(model: nn.Module, device: torch.device, world_size: int) -> dict[str, int]:
    """Apply ``fully_shard`` in place to each unit of :func:`shard_units`, then to ``model`` (the root),
    over all ``world_size`` ranks. Returns the number of units per part.

    Each rank keeps its own part of the tensors it has, so first every rank takes rank 0's
    parameters and buffers, as DDP does: ranks seed differently (seed + rank), and randomly
    initialised parts (Q-Former, queries, projection, LoRA's A) would otherwise be a mix of ranks' draws.
    """
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            dist.broadcast(tensor, src=0)
    mesh = init_device_mesh(device.type, (world_size,))
    # fully_shard cannot split a 0-dim parameter (stage 1's ITC temperature ``temp``): it stays whole
    # on every rank, and its gradient is averaged over the ranks after each backward, as DDP does
    scalars = {param for param in model.parameters() if param.dim() == 0}
    # blip2_internlm embeds each sample's text on its own: the input embeddings stay gathered from
    # their first call until the backward ends, rather than being gathered again for every sample
    embeddings = model.llm.get_input_embeddings() if hasattr(model, "llm") else None
    units = shard_units(model)
    for modules in units.values():
        for module in modules:
            fully_shard(module, mesh=mesh, reshard_after_forward=module is not embeddings, ignored_params=scalars)
    fully_shard(model, mesh=mesh, ignored_params=scalars)
    for param in scalars:
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(average_grad_over_ranks)
    return {part: len(modules) for part, modules in units.items()}


def average_grad_over_ranks(param: torch.Tensor) -> None:
    """``param.grad`` := its mean over the ranks (gloo has no ``ReduceOp.AVG``). With gradient
    accumulation the part accumulated earlier is already equal on all ranks, so it stays as it is."""
    dist.all_reduce(param.grad)
    param.grad /= dist.get_world_size()


def parameter_bytes(model: nn.Module) -> tuple[int, int]:
    """Bytes of the parameters this rank holds (its shards), and of the full model's parameters."""
    local = full = 0
    for param in model.parameters():
        shard = param.to_local() if isinstance(param, DTensor) else param
        local += shard.numel() * shard.element_size()
        full += param.numel() * param.element_size()  # a DTensor's numel is the full tensor's
    return local, full


def full_trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights and the buffers in full, as runner_ext saves them (frozen weights left out).

    A collective: every rank must call it; rank 0 gets the tensors (on CPU), the others ``{}``.
    """
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=True))


def load_full_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load full (unsharded) weights into the sharded ``model``; every rank calls it with the same dict.

    As :func:`lavis_ext.checkpoint.load_partial_state`: nothing may be unexpected, and only frozen
    parameters and buffers may be missing (they keep their values). A shape mismatch raises too.
    """
    own = model.state_dict()  # the model's names; DTensors report the full shapes
    check_loaded_keys(model, sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own)), source)
    mismatched = sorted(k for k in set(state_dict) & set(own) if state_dict[k].shape != own[k].shape)
    if mismatched:
        raise CheckpointError(f"{source}: does not match the model; shape mismatches {mismatched[:8]}")
    # set_model_state_dict fills the keys the checkpoint leaves out with the model's own values
    set_model_state_dict(model, dict(state_dict), options=StateDictOptions(full_state_dict=True))


def optimizer_parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in the order ``optimizer.state_dict()`` numbers them."""
    names = {param: name for name, param in model.named_parameters()}
    return [names[param] for group in optimizer.param_groups for param in group["params"]]


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state in full, laid out as ``optimizer.state_dict()`` (parameters by number).

    A collective: every rank must call it; rank 0 gets the state (on CPU), the others ``{}``.
    """
    by_name = get_optimizer_state_dict(model, optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not by_name:
        return {}
    number = {name: i for i, name in enumerate(optimizer_parameter_names(model, optimizer))}
    return {"state": {number[name]: state for name, state in by_name["state"].items()},
            "param_groups": [{**group, "params": [number[name] for name in group["params"]]}
                             for group in by_name["param_groups"]]}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict,
                              source: str) -> None:
    """Load a full ``optimizer.state_dict()``-layout state into the optimizer of the sharded ``model``;
    every rank calls it with the same dict."""
    names = optimizer_parameter_names(model, optimizer)
    sizes = [len(group["params"]) for group in state_dict["param_groups"]]
    if sizes != [len(group["params"]) for group in optimizer.param_groups]:
        raise CheckpointError(f"{source}: the optimizer state has parameter groups of sizes {sizes}, the model's "
                              f"optimizer {[len(group['params']) for group in optimizer.param_groups]}")
    by_name = {"state": {names[i]: state for i, state in state_dict["state"].items()},
               "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                for group in state_dict["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
