"""Data-parallel gradient averaging in flat buckets (device-agnostic: gloo and NCCL alike).

With more than one DP rank, every parameter's `.grad` is a view into one flat buffer per bucket
(torch DDP's `gradient_as_bucket_view`): a parameter's first gradient of the step is copied into its
view as it arrives and later micro-batches accumulate straight into it, so there is no zeroing pass,
no flatten/unflatten copy, and a bucket is all-reduced in place. During the last micro-batch's
backward (`prepare_backward(last_micro_batch=True)`), a bucket is launched asynchronously as soon as
all of its gradients have arrived, in bucket order on every rank, overlapping the reduction with the
rest of backward; `average()` launches what is left and waits. Gradient accumulation costs no extra
communication.

On CPU under gloo with every DP rank on one host (`parallel.host_shared_memory`, default true),
the buckets are views into one shared-memory segment instead, averaged there after backward by
parallel/host_allreduce.py: no reduction overlaps backward then, but with the compute threads
already filling the cores an overlapped gloo all-reduce hid little of its 0.37 s for B/32, and the
segment's average takes 0.06-0.08 s.

ZeRO-1 (`engine.distributed_optimizer`) replaces the all-reduce with a reduce-scatter over its own
buckets.

Row-sparse parameters (token embeddings, `row_sparse=`): a batch touches a few thousand of a
vocabulary's rows, and the other rows' gradients are zero on every rank, yet a dense all-reduce
moves all of them (CLIP's 49408 x width table is 79% of the tiny model's gradient bytes, 17% of
B/32's). Such a parameter stays out of the buckets; after backward the ranks all-gather which rows
are non-zero anywhere and all-reduce only those (the same sums as the dense all-reduce, exactly:
the other rows are zero on every rank). When most rows are touched it falls back to one dense
all-reduce; the decision is taken on the gathered counts, so every rank takes the same one.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel import host_allreduce
from parallel.collectives import all_gather_into


class _Bucket:
    def __init__(self, params: list, buffer: torch.Tensor):
        self.params = params
        self.buffer = buffer
        self.views, offset = [], 0
        for p in params:
            self.views.append(self.buffer[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        self.pending = len(params)
        self.handle = None


class GradientAverager:
    def __init__(self, params, group, bucket_size_mb: float = 25.0, overlap: bool = True, row_sparse=(),
                 shared_memory: bool | None = None):
        """`row_sparse`: 2-D parameters whose gradient is usually zero outside a few rows (token
        embeddings); reduced over the non-zero rows only (see the module's docstring).
        `shared_memory`: when the buckets are on CPU under gloo and every DP rank runs on this host,
        the buckets live in a segment every rank maps and are averaged there after backward
        (parallel/host_allreduce.py) instead of all-reduced through gloo's TCP; None: as
        `parallel.host_shared_memory` set it (`host_allreduce.configure`)."""
        self.params = [p for p in params if p.requires_grad]
        self.group = group
        self.world = dist.get_world_size(group) if group is not None else 1
        self.overlap = overlap
        self.buckets: list[_Bucket] = []
        self.segments: dict = {}  # dtype -> parallel.host_allreduce.SharedSegment
        self._armed = False
        self._next_launch = 0
        self.launched_in_backward = 0  # buckets of the last step reduced while backward ran
        sparse_ids = {id(p) for p in row_sparse if p.dim() == 2}
        self.row_sparse = [p for p in self.params if id(p) in sparse_ids]
        self.rows_reduced = 0  # rows of the row-sparse parameters all-reduced in the last step
        if self.world > 1:
            dense = [p for p in self.params if id(p) not in sparse_ids]
            # Reverse parameter order: the order backward produces gradients in.
            grouped = self._group(list(reversed(dense)), bucket_size_mb * 2**20)
            use_shm = host_allreduce.enabled() if shared_memory is None else shared_memory
            self.segments = self._shared_segments(grouped) if use_shm else {}
            offsets = dict.fromkeys(self.segments, 0)
            for params_of_bucket in grouped:
                numel, dtype = sum(p.numel() for p in params_of_bucket), params_of_bucket[0].dtype
                if dtype in self.segments:
                    buffer = self.segments[dtype].local[offsets[dtype]:offsets[dtype] + numel]
                    buffer.zero_()
                    offsets[dtype] += numel
                else:
                    buffer = torch.zeros(numel, dtype=dtype, device=params_of_bucket[0].device)
                self.buckets.append(_Bucket(params_of_bucket, buffer))
            self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
            self._view_of = {id(p): v for b in self.buckets for p, v in zip(b.params, b.views)}
            self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in dense]
            self._adopt_grads()

    @staticmethod
    def _group(params: list, bucket_bytes: float) -> list[list[torch.nn.Parameter]]:
        buckets, current, size, dtype = [], [], 0, None
        for p in params:
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

    def _adopt_grads(self) -> None:
        """Point every `.grad` at its bucket view, keeping gradients computed before (a zero one
        where there is none)."""
        for bucket in self.buckets:
            for p, view in zip(bucket.params, bucket.views):
                if p.grad is not None and p.grad.data_ptr() != view.data_ptr():
                    view.copy_(p.grad)
                p.grad = view

    def zero_grad(self) -> None:
        """Drop the gradients. A bucket is not zeroed: each parameter's first gradient of the step is
        copied into its view (see `_on_grad_ready`), which saves a pass over every bucket against
        zeroing it and accumulating into it (B/32: 600 MB written and read once less per step)."""
        for p in self.params:
            p.grad = None

    def _shared_segments(self, grouped: list) -> dict:
        """{dtype: SharedSegment holding every bucket of that dtype}, when the gradients are on CPU
        under gloo and the DP ranks share a host (collective; the same answer on every rank)."""
        if any(p.device.type != "cpu" for ps in grouped for p in ps) or dist.get_backend(self.group) != "gloo":
            return {}
        segments = {}
        for dtype in sorted({ps[0].dtype for ps in grouped}, key=str):
            numel = sum(p.numel() for ps in grouped if ps[0].dtype == dtype for p in ps)
            segment = host_allreduce.SharedSegment.create(self.group, dtype, numel)
            if segment is not None:
                segments[dtype] = segment
        return segments

    def prepare_backward(self, last_micro_batch: bool) -> None:
        """Before each backward: arm the overlapped reduction for the last micro-batch (gloo only:
        a shared segment is summed in this thread, once backward is over)."""
        self._armed = self.overlap and last_micro_batch and self.world > 1 and not self.segments
        for bucket in self.buckets:
            bucket.pending = len(bucket.params)
        self.launched_in_backward = 0

    def _on_grad_ready(self, param: torch.nn.Parameter) -> None:
        view = self._view_of[id(param)]
        if param.grad.data_ptr() != view.data_ptr():  # the step's first gradient: into the bucket; later
            view.copy_(param.grad)                      # micro-batches accumulate into the view in place
            param.grad = view
        if not self._armed:
            return
        bucket = self._bucket_of[id(param)]
        bucket.pending -= 1
        # Launch in bucket order so every rank issues the same collectives in the same order.
        while self._next_launch < len(self.buckets) and self.buckets[self._next_launch].pending == 0:
            self._launch(self.buckets[self._next_launch])
            self._next_launch += 1
            self.launched_in_backward += 1

    def _launch(self, bucket: _Bucket) -> None:
        for p, view in zip(bucket.params, bucket.views):
            grad = p.grad
            if grad is None:  # set to None by someone else: an unused parameter's zero gradient
                view.zero_()
            elif grad.data_ptr() != view.data_ptr():  # replaced rather than accumulated in place
                view.copy_(grad)
            p.grad = view
        if bucket.buffer.dtype in self.segments:  # averaged with the rest of its segment, scale fused
            return
        bucket.buffer.div_(self.world)  # divide first: keeps fp16 sums in range
        bucket.handle = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)

    def average(self) -> None:
        if self.world == 1:
            return
        for bucket in self.buckets[self._next_launch:]:  # not launched during backward
            self._launch(bucket)
        for segment in self.segments.values():  # every bucket of its dtype at once
            segment.average_(0, segment.local.numel())
        self.rows_reduced = sum(self._reduce_rows(p) for p in self.row_sparse)
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
                bucket.handle = None
        self._armed, self._next_launch = False, 0

    def _reduce_rows(self, param: torch.nn.Parameter) -> int:
        """Average `param.grad` over DP through the rows non-zero on any rank; returns how many
        rows were sent. A missing gradient counts as zero (as a bucket's unused parameter)."""
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grad = param.grad
        # NaN/inf rows are non-zero too, so a bad gradient still reaches every rank's overflow check.
        local = grad.ne(0).any(dim=1).nonzero().view(-1)
        counts = torch.zeros(self.world, dtype=torch.long, device=grad.device)
        counts[dist.get_rank(self.group)] = local.numel()
        dist.all_reduce(counts, group=self.group)
        if 2 * int(counts.max()) > grad.shape[0]:  # mostly dense anyway: one all-reduce of it all
            grad.div_(self.world)
            dist.all_reduce(grad, group=self.group)
            return grad.shape[0]
        padded = torch.full((int(counts.max()),), -1, dtype=torch.long, device=grad.device)
        padded[:local.numel()] = local
        gathered = padded.new_empty(self.world * padded.numel())
        all_gather_into(gathered, padded, self.group)
        rows = gathered.unique()
        rows = rows[rows >= 0]
        values = grad.index_select(0, rows).div_(self.world)  # divide first, as the buckets do
        dist.all_reduce(values, group=self.group)
        grad.index_copy_(0, rows, values)
        return rows.numel()
