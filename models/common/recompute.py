"""NeMo's activation-checkpointing keys -> megatron-core's recompute settings (every family's config
carries the same three keys)."""
from __future__ import annotations


def recompute_settings(tower) -> dict:
    """NeMo's activation-checkpointing keys -> megatron-core's TransformerConfig fields."""
    granularity = tower.activations_checkpoint_granularity
    method, num_layers = tower.activations_checkpoint_method, tower.activations_checkpoint_num_layers
    if granularity is None:
        return {}
    if granularity == "full":
        if method not in ("uniform", "block") or not num_layers:
            raise ValueError("activations_checkpoint_granularity=full needs activations_checkpoint_method "
                             "(uniform or block) and activations_checkpoint_num_layers >= 1")
        return {"recompute_granularity": "full", "recompute_method": method, "recompute_num_layers": num_layers}
    if granularity == "selective":
        if method is not None or num_layers is not None:
            raise ValueError("activations_checkpoint_granularity=selective takes no method or num_layers")
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    raise ValueError(f"activations_checkpoint_granularity={granularity!r}: use full, selective or null")
