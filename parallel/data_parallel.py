"""Data-parallel gradient averaging in flat buckets (device-agnostic: gloo and NCCL alike).

Called once per optimizer step, after the last micro-batch's backward, so gradient accumulation
costs no extra communication. Buckets are launched asynchronously and waited on together. ZeRO-1
replaces the all-reduce with a reduce-scatter over the same buckets.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


class GradientAverager:
    def __init__(self, params, group, bucket_size_mb: float = 25.0):
        self.params = [p for p in params if p.requires_grad]
        self.group = group
        self.world = dist.get_world_size(group) if group is not None else 1
        self.buckets = self._make_buckets(bucket_size_mb * 2**20)

    def _make_buckets(self, bucket_bytes: float) -> list[list[torch.nn.Parameter]]:
        buckets, current, size, dtype = [], [], 0, None
        for p in self.params:
            nbytes = p.numel() * p.element_size()
            if current and (size + nbytes > bucket_bytes or p.dtype != dtype):
                buckets.append(current)
                current, size = [], 0
            current.append(p)
            size += nbytes
            dtype = p.dtype
        if current:
            buckets.append(current)
        return buckets

    def average(self) -> None:
        if self.world == 1:
            return
        pending = []
        for bucket in self.buckets:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
            flat = _flatten_dense_tensors(grads)
            flat.div_(self.world)  # divide first: keeps fp16 sums in range
            pending.append((bucket, grads, flat, dist.all_reduce(flat, group=self.group, async_op=True)))
        for bucket, grads, flat, work in pending:
            work.wait()
            for p, synced in zip(bucket, _unflatten_dense_tensors(flat, grads)):
                if p.grad is None:
                    p.grad = synced
                else:
                    p.grad.copy_(synced)
