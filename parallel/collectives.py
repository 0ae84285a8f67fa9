"""Cross-rank gathers for losses that need the global batch (contrastive losses).

`all_gather_with_grad` is written here rather than taken from torch.distributed.nn because its
backward must work on gloo as well as NCCL: the gradient of a gather is the sum over ranks of the
gradient of each rank's copy, restricted to this rank's slice (a reduce-scatter).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.14 renamed the single-tensor collectives (`all_gather_into_tensor` -> `all_gather_single`,
# `reduce_scatter_tensor` -> `reduce_scatter_single`) and warns (FutureWarning) on every call of the
# old names; older releases have only the old names. Same arguments, same result.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_into(output: torch.Tensor, tensor: torch.Tensor, group, async_op: bool = False):
    """`output` (world x `tensor`'s rows) = every rank's `tensor`, rank order; a Work when `async_op`."""
    return _all_gather_single(output, tensor, group=group, async_op=async_op)


def reduce_scatter_into(output: torch.Tensor, tensor: torch.Tensor, group, async_op: bool = False):
    """`output` = this rank's 1/world slice of the sum of every rank's `tensor`; a Work when `async_op`."""
    return _reduce_scatter_single(output, tensor, group=group, async_op=async_op)


def _gather_along_dim0(tensor: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    out = torch.empty((world * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    all_gather_into(out, tensor.contiguous(), group)
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.local_size = tensor.shape[0]
        return _gather_along_dim0(tensor, group)

    @staticmethod
    def backward(ctx, grad_output):
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.local_size
        return grad[start:start + ctx.local_size], None


def all_gather_with_grad(tensor: torch.Tensor, group) -> torch.Tensor:
    """Concatenate `tensor` from every rank of `group` along dim 0; gradients flow back to each rank."""
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor, group)


def all_gather_keep_local_grad(tensor: torch.Tensor, group) -> torch.Tensor:
    """Gather without gradient through other ranks' slices; this rank's slice keeps its graph.

    This is open_clip's `gather_with_grad=False`: cheaper, but the cross-rank terms of the gradient
    are missing (NeMo warns it can hurt convergence).
    """
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    with torch.no_grad():
        gathered = _gather_along_dim0(tensor.detach(), group)
    rank, n = dist.get_rank(group), tensor.shape[0]
    pieces = list(gathered.split(n, dim=0))
    pieces[rank] = tensor
    return torch.cat(pieces, dim=0)
