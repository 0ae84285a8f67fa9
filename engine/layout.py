"""Check an experiment's parallel layout against the model and the launch before any process group
exists, so a layout that cannot work fails at once on every rank with the key to change, instead of
hanging in a collective or failing deep inside megatron-core."""
from __future__ import annotations

from engine.trainer import accumulation_steps
from parallel.dims import ParallelDims, ParallelLayoutError


def validate_layout(cfg, world_size: int) -> ParallelDims:
    """`cfg` is an `ExperimentConfig`; returns the degrees, or raises `ParallelLayoutError`."""
    par = cfg.parallel
    dims = ParallelDims(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, world_size)
    for name in ("vision", "text"):
        tower = getattr(cfg.model, name)
        key = f"model.{name}"
        dims.check_divides(f"{key}.num_attention_heads", tower.num_attention_heads, "tensor_model_parallel_size",
                           dims.tp)
        dims.check_divides(f"{key}.ffn_hidden_size", tower.ffn_hidden_size, "tensor_model_parallel_size", dims.tp)
        # Every stage holds the same share of both towers' layers (see models/clip/model.py).
        dims.check_divides(f"{key}.num_layers", tower.num_layers, "pipeline_model_parallel_size", dims.pp)
    try:
        accumulation_steps(cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size, dims.dp)
    except ValueError as exc:
        raise ParallelLayoutError(f"{exc} (layout {dims})") from None
    return dims
