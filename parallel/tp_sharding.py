"""Move state dicts between the full (TP=1) layout and one TP rank's shard.

Every megatron tensor-parallel parameter carries `tensor_model_parallel`, `partition_dim` and
`partition_stride`; a shard is the rank's contiguous chunk along `partition_dim` (megatron's fused
QKV is laid out head group by head group, so a chunk on dim 0 is a whole set of heads). Used by the
TP-equivalence tests and, later, by re-sharding and checkpoint conversion.

A strided partition (`partition_stride` s > 1) is megatron's layout for a gated MLP's fc1: the full
tensor is cut into s x TP equal chunks along the partition dim and rank r holds chunks r, r + TP,
..., concatenated. For SwiGLU (s = 2) the full fc1 is [gate; up] and rank r holds
[gate_r; up_r]: its own slice of both halves, so the GLU split inside each rank stays right.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _tp_layout(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Parameter name -> (partition dim, stride), for tensor-parallel parameters only."""
    return {name: (param.partition_dim, getattr(param, "partition_stride", 1))
            for name, param in model.named_parameters() if getattr(param, "tensor_model_parallel", False)}


def shard_tensor(full: torch.Tensor, dim: int, stride: int, tp_rank: int, tp_size: int) -> torch.Tensor:
    """TP rank `tp_rank`'s shard of a full tensor split along `dim` with megatron's `stride`."""
    if full.shape[dim] % (stride * tp_size):
        raise ValueError(f"size {full.shape[dim]} along dim {dim} does not split into {stride} x {tp_size} chunks")
    chunks = full.chunk(stride * tp_size, dim=dim)
    return torch.cat(chunks[tp_rank::tp_size], dim=dim) if stride > 1 else chunks[tp_rank]


def unshard_tensors(parts: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """The full tensor from every TP rank's shard, in rank order (inverse of `shard_tensor`)."""
    if stride == 1:
        return torch.cat(parts, dim=dim)
    pieces = [part.chunk(stride, dim=dim) for part in parts]
    return torch.cat([pieces[rank][k] for k in range(stride) for rank in range(len(parts))], dim=dim)


def shard_full_state_dict(full: dict, model: torch.nn.Module, tp_rank: int, tp_size: int) -> dict:
    """Cut a full state dict into the shard `model` (built at `tp_size`) holds on `tp_rank`.

    Vocab-padded embeddings are padded or trimmed to the model's padded size first.
    """
    layout = _tp_layout(model)
    own = model.state_dict()
    out = {}
    for name, tensor in full.items():
        if name not in own:
            raise KeyError(f"unexpected key {name!r} for this model")
        if not isinstance(tensor, torch.Tensor):  # megatron's `_extra_state` entries (None without TE)
            out[name] = tensor
            continue
        if name in layout:
            dim, stride = layout[name]
            target_full = own[name].shape[dim] * tp_size
            tensor = _resize_dim(tensor, dim, target_full) if stride == 1 else tensor
            tensor = shard_tensor(tensor, dim, stride, tp_rank, tp_size)
        if tensor.shape != own[name].shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not fit {tuple(own[name].shape)}")
        out[name] = tensor.clone()
    return out


def _resize_dim(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Pad with zeros or trim along `dim` (vocab padding differs between TP sizes)."""
    current = tensor.shape[dim]
    if current == size:
        return tensor
    if current > size:
        return tensor.narrow(dim, 0, size)
    pad_shape = list(tensor.shape)
    pad_shape[dim] = size - current
    return torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)


def gather_full_state_dict(model: torch.nn.Module, tp_group) -> dict:
    """Reassemble the full state dict on every rank of `tp_group` (collective)."""
    return _gather_full(model, tp_group, dict(model.state_dict()))


def gather_full_grads(model: torch.nn.Module, tp_group) -> dict:
    """Full-shape gradients by parameter name (collective); parameters without grad are skipped."""
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return _gather_full(model, tp_group, grads)


def _gather_full(model: torch.nn.Module, tp_group, tensors: dict) -> dict:
    layout = _tp_layout(model)
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    full = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            full[name] = tensor
            continue
        if name in layout and tp_size > 1:
            parts = [torch.empty_like(tensor) for _ in range(tp_size)]
            dist.all_gather(parts, tensor.contiguous(), group=tp_group)
            tensor = unshard_tensors(parts, *layout[name])
        full[name] = tensor.detach().clone()
    return full
