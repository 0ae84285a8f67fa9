"""AdamW over a flat fp32 copy of the parameters, optionally sharded over data parallelism (ZeRO-1).

This is what `optim.name: distributed_fused_adam` runs (NeMo's name), and what `adamw` runs under
bf16/fp16 (O2: low-precision parameters, fp32 master weights). One code path on CPU/gloo and
GPU/NCCL:

- the model's parameters are re-pointed into one flat buffer, so updated values arrive with a
  single all-gather straight into the parameters;
- every parameter gets an fp32 `main_grad` view of one flat gradient buffer; a post-accumulate hook
  adds each micro-batch's gradient into it and frees the low-precision `.grad` (fp32 accumulation);
- the buffers are cut into buckets (reverse parameter order, as backward produces gradients); during
  the last micro-batch's backward each bucket is reduce-scattered over DP (sharded) or all-reduced
  (not) asynchronously as soon as its gradients are complete, overlapping with the rest of backward;
- at the step each rank unscales, checks for inf/NaN (agreed over all ranks), clips by the global
  norm, and runs Adam on its shard of the fp32 master weights with its shard of the moments; then
  the shards are all-gathered back into the parameters, bucket by bucket.

On CPU with every DP rank on one host (`parallel.host_shared_memory`), both flat buffers are the
rank's part of a /dev/shm segment: the reduce-scatter is each rank summing its shard from every
rank's gradient buffer after backward, the all-gather copying the other shards from their parameter
buffers (parallel/host_allreduce.py), with no TCP in between.

Optimizer state per rank, sharded: exp_avg + exp_avg_sq + the fp32 master copy for bf16/fp16
parameters = 12 bytes per parameter / DP (8 / DP for fp32 parameters, which are their own master).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.grad_norm import counts_toward_norm
from engine.loss_scaler import ConstantLossScaler
from parallel import host_allreduce
from parallel.collectives import all_gather_into, reduce_scatter_into
from parallel.sequence_parallel import allreduce_over_tp, is_sequence_parallel


@dataclass
class StepResult:
    grad_norm: float
    skipped: bool


@dataclass
class _Segment:
    """Where one parameter's elements fall inside this rank's shard."""

    param: torch.nn.Parameter
    start: int  # within the shard
    end: int
    group: int  # index into FlatAdamW.param_groups
    counts_toward_norm: bool
    bucket: _Bucket
    param_offset: int = 0  # the parameter's (flattened) element where this segment starts


@dataclass
class _Bucket:
    """A contiguous range of the flat buffers, padded to a multiple of the DP size; rank r owns
    chunk r of every bucket (so each bucket is reduce-scattered on its own, as soon as it is ready)."""

    start: int
    end: int
    params: list
    shard_offset: int  # where this rank's chunk sits in the shard vectors
    pending: int = 0  # parameters whose gradient has not arrived in this backward
    handle: object = None

    @property
    def chunk(self) -> int:
        return self.end - self.start


class FlatAdamW:
    def __init__(self, model: torch.nn.Module, dp_group, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, groups=None, shard: bool = True,
                 loss_scaler=None, max_grad_norm: float = 0.0, model_parallel_group=None,
                 bucket_size: int = 40_000_000, overlap_grad_sync: bool = True):
        """`groups`: [(engine.optim.ParamGroup, [(name, param), ...])] of the trainable parameters
        (default: one decayed group of all of them)."""
        if groups is None:
            from engine.optim import DECAY

            groups = [(DECAY, [(n, p) for n, p in model.named_parameters() if p.requires_grad])]
        group_of = {id(p): index for index, (_, members) in enumerate(groups) for _, p in members}
        named = [(n, p) for n, p in model.named_parameters() if id(p) in group_of]
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) != 1:
            raise ValueError(f"all trainable parameters must share one dtype, found {sorted(map(str, dtypes))}")
        self.dp_group, self.mp_group = dp_group, model_parallel_group
        self.dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        self.dp_rank = dist.get_rank(dp_group) if dp_group is not None else 0
        self.sharded = shard and self.dp_size > 1
        self.betas, self.eps, self.weight_decay = tuple(betas), eps, weight_decay
        self.max_grad_norm = max_grad_norm
        self.loss_scaler = loss_scaler or ConstantLossScaler()
        # What LR schedules write to (set_lr): one entry per group, its own lr rule beside it.
        self.param_groups = [{"name": g.name, "lr": lr, "weight_decay": g.weight_decay} for g, _ in groups]
        self.lr_fns = [g.lr for g, _ in groups]
        self.scheduled_lr = lr
        self.step_count = 0
        self._sync_armed = False

        parts = self.dp_size if self.sharded else 1
        # Buckets follow the reverse parameter order, the order backward produces gradients in.
        self.buckets: list[_Bucket] = []
        layout, offset, shard_offset, current, current_numel = [], 0, 0, [], 0
        for index, (name, p) in enumerate(reversed(named)):
            current.append((name, p))
            current_numel += p.numel()
            if current_numel >= bucket_size or index == len(named) - 1:
                padded = math.ceil(current_numel / parts) * parts
                bucket = _Bucket(offset, offset + padded, [q for _, q in current], shard_offset)
                self.buckets.append(bucket)
                position = offset
                for item in current:
                    layout.append((item, position, bucket))
                    position += item[1].numel()
                offset += padded
                shard_offset += padded // parts
                current, current_numel = [], 0
        device, dtype = named[0][1].device, named[0][1].dtype
        # Sharded on CPU with every DP rank on this host: both buffers are this rank's part of a
        # shared-memory segment (None otherwise; the same answer on every rank).
        self._shm = self._shared_segments(offset, dtype, device)
        self.overlap = overlap_grad_sync and self.dp_size > 1 and self._shm is None
        if self._shm is not None:
            self.grad_buffer, self.param_buffer = self._shm[0].local, self._shm[1].local
        else:
            # `empty`, not `zeros`: pages are only touched as each parameter is copied in and its old
            # storage freed, so building the buffer does not hold every parameter twice.
            self.param_buffer = torch.empty(offset, dtype=dtype, device=device)
            self.grad_buffer = torch.zeros(offset, dtype=torch.float32, device=device)
        self.shard_numel = shard_offset
        self.segments: list[_Segment] = []
        self._hooks = []
        for (_name, p), position, bucket in layout:
            n = p.numel()
            view = self.param_buffer[position:position + n].view_as(p)
            view.copy_(p.data)
            p.data = view
            p.main_grad = self.grad_buffer[position:position + n].view_as(p)
            p._flat_adamw_bucket = bucket
            p._flat_adamw_fresh = True  # no gradient in main_grad yet this step (see zero_grad)
            self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))
            chunk = bucket.chunk // parts
            mine_lo = bucket.start + (self.dp_rank if self.sharded else 0) * chunk
            lo, hi = max(position, mine_lo), min(position + n, mine_lo + chunk)
            if lo < hi:
                base = bucket.shard_offset - mine_lo
                self.segments.append(_Segment(p, lo + base, hi + base, group_of[id(p)], counts_toward_norm(p),
                                              bucket, lo - position))
        for bucket in self.buckets:  # padding at the end of each bucket: defined values
            used = sum(p.numel() for p in bucket.params)
            self.param_buffer[bucket.start + used:bucket.end].zero_()
        # fp32 parameters are their own master weights (no copy); low-precision ones get an fp32 copy.
        self.separate_master = dtype != torch.float32
        own_chunks = [self._my_chunk(self.param_buffer, b) for b in self.buckets]
        if self.separate_master:
            flat_master = torch.cat(own_chunks).float()
            self.master_chunks = [flat_master[b.shard_offset:b.shard_offset + c.numel()]
                                  for b, c in zip(self.buckets, own_chunks)]
        else:
            self.master_chunks = own_chunks
        self.exp_avg = torch.zeros(self.shard_numel, dtype=torch.float32, device=device)
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self._segments_of_group: dict[int, list] = {}  # the fused update's calls: one per parameter group
        for seg in self.segments:
            self._segments_of_group.setdefault(seg.group, []).append(seg)
        # Unsharded, the shard is the whole buffer in the same order: work on it in place.
        self._grad_shard = torch.zeros_like(self.exp_avg) if self.sharded else self.grad_buffer

    def _shared_segments(self, numel: int, dtype: torch.dtype, device: torch.device):
        """(gradient segment, parameter segment) when ZeRO-1 runs on CPU under gloo and every DP rank
        runs on this host (`parallel.host_shared_memory`): the reduce-scatter then sums each rank's
        shard straight from the others' gradient buffers, and the all-gather copies the updated
        shards from their parameter buffers, instead of sending them through gloo's TCP (B/32 at
        DP=2: 600 MB of gradients and again of parameters a step). Collective; None on every rank
        alike otherwise."""
        if not self.sharded or device.type != "cpu" or not host_allreduce.enabled() \
                or dist.get_backend(self.dp_group) != "gloo":
            return None
        grads = host_allreduce.SharedSegment.create(self.dp_group, torch.float32, numel, purpose="ZeRO-1 gradients")
        params = host_allreduce.SharedSegment.create(self.dp_group, dtype, numel, purpose="ZeRO-1 parameters") \
            if grads is not None else None
        return (grads, params) if params is not None else None

    def set_lr(self, step: int, lr: float) -> None:
        """The schedule's `lr` for optimizer step `step`; groups with their own lr rule apply it."""
        self.scheduled_lr = lr
        for group, fn in zip(self.param_groups, self.lr_fns):
            group["lr"] = fn(step, lr) if fn is not None else lr

    def _chunk_bounds(self, bucket: _Bucket, rank: int) -> tuple[int, int]:
        """Where DP rank `rank`'s chunk of `bucket` lies in the flat buffers (sharded)."""
        chunk = bucket.chunk // self.dp_size
        return bucket.start + rank * chunk, bucket.start + (rank + 1) * chunk

    def _my_chunk(self, buffer: torch.Tensor, bucket: _Bucket) -> torch.Tensor:
        if not self.sharded:
            return buffer[bucket.start:bucket.end]
        lo, hi = self._chunk_bounds(bucket, self.dp_rank)
        return buffer[lo:hi]

    # -- gradient synchronisation, overlapped with the last backward -------------------------------
    def prepare_backward(self, last_micro_batch: bool) -> None:
        """Called before each micro-batch's backward: on the last one, buckets are reduced over DP
        as soon as all their gradients have arrived, while backward continues on earlier layers."""
        self._sync_armed = self.overlap and last_micro_batch
        for bucket in self.buckets:
            bucket.pending = len(bucket.params)

    def _on_grad_ready(self, param: torch.nn.Parameter) -> None:
        """Post-accumulate hook: fold this backward's gradient into the fp32 buffer (the step's first
        one is copied in: the buffer is not zeroed between steps), free `.grad`, and launch the
        bucket's reduction once its last gradient is in."""
        if param._flat_adamw_fresh:
            param.main_grad.copy_(param.grad)
            param._flat_adamw_fresh = False
        else:
            param.main_grad.add_(param.grad)
        param.grad = None
        bucket = param._flat_adamw_bucket
        bucket.pending -= 1
        if self._sync_armed and bucket.pending == 0 and bucket.handle is None:
            self._launch(bucket)

    def _zero_unused(self, bucket: _Bucket) -> None:
        """Parameters that got no gradient this step hold the last step's in main_grad: zero them."""
        for p in bucket.params:
            if p._flat_adamw_fresh:
                p.main_grad.zero_()
                p._flat_adamw_fresh = False

    def _launch(self, bucket: _Bucket) -> None:
        grads = self.grad_buffer[bucket.start:bucket.end]
        grads.div_(self.dp_size)
        if self.sharded:
            out = self._grad_shard[bucket.shard_offset:bucket.shard_offset + bucket.chunk // self.dp_size]
            bucket.handle = reduce_scatter_into(out, grads, self.dp_group, async_op=True)
        else:
            bucket.handle = dist.all_reduce(grads, group=self.dp_group, async_op=True)

    def _reduce_gradients(self) -> torch.Tensor:
        # Before any reduction that is still to come. A bucket launched during backward had every
        # gradient arrive, so it holds no unused parameter.
        for bucket in self.buckets:
            self._zero_unused(bucket)
        if self.dp_size == 1:
            return self._grad_shard
        if self._shm is not None:  # each rank sums its own shard from every rank's buffer
            chunks = [(*self._chunk_bounds(b, self.dp_rank), self._grad_shard[b.shard_offset:]) for b in self.buckets]
            # Scaled before the sum, as the gloo path divides first. No rank writes its gradients again
            # before every rank has passed a later collective (the inf check, the norm, the all-gather).
            self._shm[0].reduce_scatter_(chunks, 1.0 / self.dp_size)
            return self._grad_shard
        for bucket in self.buckets:  # buckets not launched during backward (no overlap, unused params)
            if bucket.handle is None:
                self._launch(bucket)
        for bucket in self.buckets:
            bucket.handle.wait()
            bucket.handle = None
        self._sync_armed = False
        return self._grad_shard

    # -- interface used by the trainer ------------------------------------------------------------
    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.scale

    def zero_grad(self) -> None:
        """Start a step's gradients: the first gradient of each parameter is copied into its main_grad
        (`_on_grad_ready`) and parameters that get none are zeroed before the reduction, which saves
        zeroing the whole fp32 buffer (B/32: 600 MB written, 0.03 s a step on one CPU core)."""
        for bucket in self.buckets:
            for p in bucket.params:
                p._flat_adamw_fresh = True

    def state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank: both moments, and the fp32 master copy when
        the parameters are low precision."""
        master = sum(c.numel() * 4 for c in self.master_chunks) if self.separate_master else 0
        return master + sum(t.numel() * t.element_size() for t in (self.exp_avg, self.exp_avg_sq))

    def step(self) -> StepResult:
        grad = self._reduce_gradients()
        # Sequence-parallel norms' partial gradients: summed over TP (same shard layout on every TP rank).
        allreduce_over_tp([grad[seg.start:seg.end] for seg in self.segments if is_sequence_parallel(seg.param)])
        # Unscale and flag a non-finite element in one fused pass (torch's GradScaler kernel):
        # `isfinite(grad).all()` took 0.45 s on B/32's 75M-element shard on one CPU core, this 0.013 s.
        found_inf = torch.zeros(1, dtype=torch.float32, device=grad.device)
        inv_scale = torch.full((1,), 1.0 / self.loss_scaler.scale, dtype=torch.float32, device=grad.device)
        torch._amp_foreach_non_finite_check_and_unscale_([grad], found_inf, inv_scale)
        dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)  # every rank, every group: skip together
        norm = self._global_norm(grad) if not found_inf.item() else float("inf")
        skipped = bool(found_inf.item()) or not math.isfinite(norm)
        self.loss_scaler.update(skipped)
        if skipped:
            self.zero_grad()
            return StepResult(norm, True)
        if self.max_grad_norm > 0 and norm > self.max_grad_norm:
            grad.mul_(self.max_grad_norm / (norm + 1e-6))
        self._adam(grad)
        self._publish_parameters()
        self.zero_grad()
        return StepResult(norm, False)

    # -- steps ------------------------------------------------------------------------------------
    def _global_norm(self, grad: torch.Tensor) -> float:
        # One pass per parameter without a squared temporary (`pow(2).sum()` wrote one: 10x slower on CPU).
        norms = [torch.linalg.vector_norm(grad[seg.start:seg.end]) for seg in self.segments if seg.counts_toward_norm]
        sq = torch.stack(norms).square().sum() if norms else torch.zeros((), dtype=torch.float32, device=grad.device)
        if self.sharded:
            dist.all_reduce(sq, group=self.dp_group)  # shards of one replica's gradient
        if self.mp_group is not None:
            dist.all_reduce(sq, group=self.mp_group)  # TP shards and pipeline stages
        return sq.sqrt().item()

    def _adam(self, grad: torch.Tensor) -> None:
        """AdamW on this rank's shard with torch's fused kernel (CPU and CUDA), one call per
        parameter group over its parameters' slices: each element is read and written once, where
        the same update in tensor ops made about seven passes (B/32 at DP=2 on CPU: 2 s a step).
        Bucket padding is left alone (zero gradient, zero moments: Adam would not move it)."""
        self.step_count += 1
        beta1, beta2 = self.betas
        step = torch.tensor(float(self.step_count), dtype=torch.float32, device=grad.device)
        for index, segs in self._segments_of_group.items():
            group = self.param_groups[index]
            torch._fused_adamw_(
                [self._master_slice(seg.bucket, seg.start, seg.end) for seg in segs],
                [grad[seg.start:seg.end] for seg in segs],
                [self.exp_avg[seg.start:seg.end] for seg in segs],
                [self.exp_avg_sq[seg.start:seg.end] for seg in segs],
                [], [step] * len(segs),  # no amsgrad state; the kernel reads the step, never writes it
                lr=group["lr"], beta1=beta1, beta2=beta2,
                weight_decay=self.weight_decay if group["weight_decay"] else 0.0,  # decoupled, as AdamW
                eps=self.eps, amsgrad=False, maximize=False)

    def _master_slice(self, bucket: _Bucket, start: int, end: int) -> torch.Tensor:
        """Master weights for shard positions [start, end) that lie in `bucket`."""
        master = self.master_chunks[self.buckets.index(bucket)]
        return master[start - bucket.shard_offset:end - bucket.shard_offset]

    def _publish_parameters(self) -> None:
        handles = []
        for bucket, master in zip(self.buckets, self.master_chunks):
            chunk = self._my_chunk(self.param_buffer, bucket)
            if self.separate_master:
                chunk.copy_(master)
            if self.sharded and self._shm is None:
                handles.append(all_gather_into(self.param_buffer[bucket.start:bucket.end], chunk.clone(), self.dp_group,
                                               async_op=True))
        if self._shm is not None:  # copy the other ranks' updated shards from their buffers
            self._shm[1].all_gather_([[self._chunk_bounds(b, k) for b in self.buckets] for k in range(self.dp_size)])
        for handle in handles:
            handle.wait()

    # -- checkpoint state -------------------------------------------------------------------------
    # Layout-independent form (engine/checkpoint): per parameter, the elements this rank owns and
    # views of their moments (and fp32 master weights when separate). Writing into the views loads.
    def checkpoint_slices(self) -> list:
        """[(param, first flattened element, {"exp_avg", "exp_avg_sq"[, "master"]: 1-d views})] for
        every parameter range in this rank's shard (a parameter may be split over DP ranks)."""
        out = []
        for seg in self.segments:
            views = {"exp_avg": self.exp_avg[seg.start:seg.end], "exp_avg_sq": self.exp_avg_sq[seg.start:seg.end]}
            if self.separate_master:
                views["master"] = self._master_slice(seg.bucket, seg.start, seg.end)
            out.append((seg.param, seg.param_offset, views))
        return out

    @property
    def checkpoint_step(self) -> int:
        """Adam's step count (bias correction)."""
        return self.step_count

    @checkpoint_step.setter
    def checkpoint_step(self, value: int) -> None:
        self.step_count = int(value)

    def after_checkpoint_load(self, master_loaded: bool) -> None:
        """After parameters (and maybe moments/master) were written in place: without a stored
        master copy, take it from the loaded parameters; with one, make the parameters agree."""
        if not self.separate_master:
            return
        if master_loaded:
            self._publish_parameters()
        else:
            for bucket, master in zip(self.buckets, self.master_chunks):
                master.copy_(self._my_chunk(self.param_buffer, bucket))

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "master": torch.cat(self.master_chunks).float(), "exp_avg": self.exp_avg,
                "exp_avg_sq": self.exp_avg_sq, "loss_scaler": self.loss_scaler.state_dict(),
                "lr": self.scheduled_lr, "layout": self._layout_signature()}

    def _layout_signature(self) -> list:
        return [self.dp_size if self.sharded else 1, self.dp_rank] + [(b.start, b.end) for b in self.buckets]

    def load_state_dict(self, state: dict) -> None:
        if state["layout"] != self._layout_signature():
            raise ValueError("optimizer shard layout differs from the checkpoint's; re-shard it first")
        self.step_count = state["step_count"]
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        for bucket, master in zip(self.buckets, self.master_chunks):
            master.copy_(state["master"][bucket.shard_offset:bucket.shard_offset + master.numel()])
        self.loss_scaler.load_state_dict(state["loss_scaler"])
        self.set_lr(self.step_count, state["lr"])
        self._publish_parameters()

