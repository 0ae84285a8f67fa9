"""Gradient sync for parameters that see sequence-sharded activations (Megatron SP).

Under sequence parallelism each TP rank runs the layer norms (and the row-parallel biases) on its
own slice of the sequence, so each holds a partial gradient of these replicated parameters; they
are summed over the TP group once per step, after backward (Megatron's
`_allreduce_layernorm_grads`). The sum commutes with the DP reduction, so either may come first.

Per-head query/key norms (qk-norm) are the same case without SP: each TP rank applies the shared
gain to its own heads only, so their parameters carry `grad_summed_over_tp` and are summed too
(megatron-core's `finalize_model_grads` does this for q_layernorm / k_layernorm).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def is_sequence_parallel(param: torch.nn.Parameter) -> bool:
    """True when this parameter's gradient is partial on each TP rank and summed over TP after
    backward: sequence-parallel norms and biases, and qk-norm gains (`grad_summed_over_tp`)."""
    return bool(getattr(param, "sequence_parallel", False) or getattr(param, "grad_summed_over_tp", False))


def sequence_parallel_group():
    """The TP group when SP gradients need summing, else None."""
    if not parallel_state.model_parallel_is_initialized():
        return None
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return None
    return parallel_state.get_tensor_model_parallel_group()


def allreduce_over_tp(tensors: list[torch.Tensor]) -> None:
    """Sum `tensors` (gradients or gradient slices) over the TP group, in place, in one collective."""
    group = sequence_parallel_group()
    tensors = [t for t in tensors if t is not None and t.numel()]
    if group is None or not tensors:
        return
    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat, group=group)
    for tensor, synced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        tensor.copy_(synced)


def allreduce_sequence_parallel_grads(params) -> None:
    """`.grad` of every sequence-parallel parameter summed over TP."""
    allreduce_over_tp([p.grad for p in params if is_sequence_parallel(p)])
