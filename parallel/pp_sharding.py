"""Name a pipeline stage's parameters by their place in the whole model.

megatron-core's `TransformerBlock` names the layers it holds `layers.0..k-1` on every stage, but
each layer knows its global 1-based `layer_number`. So any model built from megatron blocks (CLIP's
towers, the DiT, the VLM's LLM) maps its state-dict keys to the PP=1 names by rewriting the layer
index inside each block; keys outside blocks (embeddings, heads) keep their names. The layer
offset is the block's own, so nothing here knows how a model splits its layers.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.transformer_block import TransformerBlock


def layer_offsets(model: torch.nn.Module) -> dict[str, int]:
    """'prefix.layers.' of every megatron block in `model` -> global index of its first local layer."""
    offsets = {}
    for name, module in model.named_modules():
        if isinstance(module, TransformerBlock) and len(module.layers):
            prefix = f"{name}.layers." if name else "layers."
            offsets[prefix] = module.layers[0].layer_number - 1
    return offsets


def global_name(local: str, offsets: dict[str, int]) -> str:
    for prefix, offset in offsets.items():
        if local.startswith(prefix):
            index, _, rest = local[len(prefix):].partition(".")
            return f"{prefix}{int(index) + offset}.{rest}"
    return local


def global_names(model: torch.nn.Module) -> dict[str, str]:
    """This stage's state-dict keys -> the PP=1 keys of the same tensors."""
    offsets = layer_offsets(model)
    return {key: global_name(key, offsets) for key in model.state_dict()}


def stage_state_from_full(full: dict, model: torch.nn.Module) -> dict:
    """The entries of a PP=1 state dict (`full`) that this stage holds, under this stage's keys."""
    names = global_names(model)
    missing = [g for g in names.values() if g not in full]
    if missing:
        raise KeyError(f"the full state dict lacks {len(missing)} keys this stage needs, e.g. {missing[:5]}")
    return {local: full[g] for local, g in names.items()}


def gather_pipeline_state(stage_state: dict, model: torch.nn.Module, pp_group) -> dict:
    """Union over pipeline stages of `stage_state` (keyed like `model.state_dict()`), under PP=1 keys.

    Objects travel through `all_gather_object`: meant for tests and offline tools, not large models.
    """
    names = global_names(model)
    mine = {names.get(k, k): (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in stage_state.items()}
    if pp_group is None or dist.get_world_size(pp_group) == 1:
        return mine
    parts = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(parts, mine, group=pp_group)
    full = {}
    for part in parts:
        full.update(part)
    return full
