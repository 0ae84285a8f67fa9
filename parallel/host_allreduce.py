"""Reductions over the ranks of one host through shared memory instead of gloo's TCP (CPU tensors).

gloo moves every byte of a CPU all-reduce through the loopback network stack and back: 0.37 s for
B/32's 572 MB of gradients between two ranks on an idle 2-core machine, 0.68 s under load, and
about 0.5 ms of round trips for each of megatron's small TP all-reduces. When every rank of a group
runs on the same host, the ranks can read each other's buffers instead (DeepSpeed's CPU `shm`
all-reduce does this too). Two users, switched by `parallel.host_shared_memory` (`configure`):

- `SharedSegment.average_`, the DP gradient average (parallel/data_parallel.py): the gradient
  buckets live in the segment; each rank averages one slice of every rank's part into its own,
  chunk by chunk so the scale and the sum are one pass over memory, then copies the other ranks'
  averaged slices: 0.08 s for the same 572 MB, no system calls and no temporary. Three barriers a
  call order the passes.
- `SharedSegment.reduce_scatter_` / `all_gather_`, ZeRO-1's gradient reduce-scatter and parameter
  all-gather (engine/distributed_optimizer.py): each rank sums only its shard's ranges of every
  rank's gradients, and copies the other shards' updated parameters.
- `HostAllReduce`, megatron's TP all-reduces (routed by parallel/cpu_shims.py): small tensors are
  copied into one of a segment's two halves, in turn, and every rank sums all parts itself, one
  barrier a call.

The barriers that order the passes are counters in the segment itself on x86-64
(parallel/host_barrier.py: microseconds where gloo's barrier takes 0.5-1 ms), gloo's elsewhere;
either way a missing rank fails the others after the group's timeout, like any collective.
A segment lives in /dev/shm only while the ranks map it: rank 0 removes the file once every rank has
mapped it, so a crash leaves nothing behind.
"""
from __future__ import annotations

import logging
import os
import socket
import uuid

import torch
import torch.distributed as dist

from parallel.host_barrier import SpinBarrier, control_bytes
from parallel.timeouts import group_timeout

log = logging.getLogger("engine")

SHM_DIR = "/dev/shm"
_CHUNK = 1 << 16  # elements reduced at a time: 256 KB of fp32, which stays in a core's L2 cache


def host_id() -> str:
    """This machine's identity: the host name and the kernel's boot id (containers may share a name)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class SharedSegment:
    """`numel` elements of `dtype` per rank of `group`, every rank's part mapped by every rank:
    `local` is this rank's (a plain CPU tensor to compute in), `average_(start, end)` makes
    `local[start:end]` the mean over the ranks of theirs. Build it with `create` (collective)."""

    def __init__(self, group, parts: torch.Tensor, barrier: SpinBarrier | None = None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.parts = parts  # [world, numel]
        self.local = parts[self.rank]
        self._scratch = torch.empty(_CHUNK if self.rank >= 2 else 0, dtype=parts.dtype)
        self._barrier = barrier  # None: gloo's (not x86-64, see parallel/host_barrier.py)

    def barrier(self) -> None:
        """Collective: every rank's writes to the segment before it are visible to all after it."""
        if self._barrier is not None:
            self._barrier.wait()
        else:
            dist.barrier(group=self.group)

    @classmethod
    def create(cls, group, dtype: torch.dtype, numel: int, purpose: str = "gradient average") -> SharedSegment | None:
        """Collective over `group`. None on every rank alike when the group is one rank, spans more
        than one host, or /dev/shm cannot hold the segment (its pages are reserved here, so a full
        /dev/shm is a logged fallback now rather than a SIGBUS in the middle of a step)."""
        world = dist.get_world_size(group)
        if world == 1 or numel == 0:
            return None
        hosts = [None] * world
        dist.all_gather_object(hosts, (host_id(), os.getpid()), group=group)
        pids = [pid for _, pid in hosts]
        hosts = [host for host, _ in hosts]
        head = control_bytes(world)  # the barrier's counters, then the parts
        nbytes = head + world * numel * torch.tensor([], dtype=dtype).element_size()
        name, error = [None], ""
        if dist.get_rank(group) == 0 and len(set(hosts)) == 1 and os.path.isdir(SHM_DIR):
            path = os.path.join(SHM_DIR, f"mmengine-allreduce-{uuid.uuid4().hex}")
            try:
                _reserve(path, nbytes)
                name = [path]
            except OSError as exc:
                error = f"{path}: {exc}"
        dist.broadcast_object_list(name, src=dist.get_process_group_ranks(group)[0], group=group)
        flat = None
        if name[0] is not None:
            try:
                flat = torch.from_file(name[0], shared=True, size=nbytes, dtype=torch.uint8)
            except RuntimeError as exc:
                error = f"{type(exc).__name__}: {exc}"
        errors = [None] * world
        dist.all_gather_object(errors, error, group=group)  # every rank mapped it, or none uses it
        if dist.get_rank(group) == 0 and name[0] is not None:
            os.unlink(name[0])  # the mappings stay, the name goes
        dist.barrier(group=group)  # no rank returns while the name is still there
        if any(errors) and dist.get_rank(group) == 0:  # once, not once per rank
            log.warning("shared-memory %s unavailable (%s); gloo all-reduces instead", purpose,
                        next(e for e in errors if e))
        if any(errors) or name[0] is None:
            return None
        barrier = None
        if SpinBarrier.supported():
            ranks = dist.get_process_group_ranks(group)
            barrier = SpinBarrier(flat[:head], dist.get_rank(group), world, group_timeout(group), pids,
                                  f"the {purpose} group (global ranks {ranks})")
        return cls(group, flat[head:].view(dtype).view(world, numel), barrier)

    def average_(self, start: int, end: int) -> None:
        """Collective: `local[start:end]` becomes the mean over the ranks of their `local[start:end]`,
        each rank's values scaled by 1/world before the sum, as the gloo path divides first (at 2
        ranks the scale is exact, so the bits equal gloo's). Each rank reduces one slice in chunks
        that stay in cache, writing into its own part (no temporary the size of the slice: a fresh
        one costs its page faults every call), then copies the other ranks' reduced slices."""
        n = end - start
        bounds = [start + k * n // self.world for k in range(self.world + 1)]
        lo, hi = bounds[self.rank], bounds[self.rank + 1]
        scale = 1.0 / self.world
        self.barrier()  # every rank's values are in place
        parts = self.parts
        for a in range(lo, hi, _CHUNK):
            b = min(a + _CHUNK, hi)
            # Summed in rank order whichever rank reduces the slice (ranks 0 and 1 start from their own
            # part, which they overwrite: x0 + x1 == x1 + x0 exactly). A later rank's part is still to
            # be read when the first sum lands, so it sums into a scratch chunk.
            out = self.local[a:b] if self.rank < 2 else self._scratch[:b - a]
            first, second = (0, 1) if self.rank != 1 else (1, 0)
            torch.mul(parts[first, a:b], scale, out=out)
            out.add_(parts[second, a:b], alpha=scale)
            for k in range(2, self.world):
                out.add_(parts[k, a:b], alpha=scale)
            if self.rank >= 2:
                self.local[a:b].copy_(out)
        self.barrier()  # every slice reduced
        for k in range(self.world):
            if k != self.rank:
                self.local[bounds[k]:bounds[k + 1]].copy_(parts[k, bounds[k]:bounds[k + 1]])
        self.barrier()  # every rank has read the others' slices: they may write again

    def reduce_scatter_(self, slices, scale: float) -> None:
        """Collective: for each (start, end, out) of `slices`, `out` (this rank's own memory, not the
        segment's) = the sum over the ranks of `scale` x their `local[start:end]`, in rank order, in
        chunks that stay in cache. It starts with the barrier that puts every rank's values in
        place; the caller's next barrier on this segment must come before any rank writes its part
        again (the others may still be reading it until then). ZeRO-1's gradient reduce-scatter:
        each rank passes its own shard's ranges, so nothing is copied back."""
        self.barrier()
        parts = self.parts
        for start, end, out in slices:
            for a in range(start, end, _CHUNK):
                b = min(a + _CHUNK, end)
                chunk = out[a - start:b - start]
                torch.mul(parts[0, a:b], scale, out=chunk)
                for k in range(1, self.world):
                    chunk.add_(parts[k, a:b], alpha=scale)

    def all_gather_(self, ranges_of_rank) -> None:
        """Collective: `ranges_of_rank[k]` lists the (start, end) ranges rank k has written in its part;
        every rank copies the others' into its own `local`. Starts with the barrier that puts them in
        place; a rank writes those ranges again only after a later barrier (ZeRO-1: the next step's
        reduce-scatter), by which time every rank has copied them, so none is needed after."""
        self.barrier()
        for k, ranges in enumerate(ranges_of_rank):
            if k != self.rank:
                for start, end in ranges:
                    self.local[start:end].copy_(self.parts[k, start:end])


class HostAllReduce:
    """`all_reduce_(tensor)`: a sum all-reduce of a CPU tensor of up to `capacity_bytes` over `group`
    through the two halves of one shared segment, used in turn, for megatron's TP all-reduces of activations and
    their gradients (`parallel/cpu_shims.py`), which gloo sends through TCP loopback one by one
    (B/32 at TP=2: 126 a step of 1-2.4 MB). Each rank writes its tensor into its part, waits at
    one barrier, then sums every part itself, in rank order, so every rank gets the same bits (gloo's
    at 2 ranks). One barrier a call suffices: before a rank writes a half again (two calls later),
    every rank has passed the next call's barrier, so it is done reading this one."""

    def __init__(self, segment: SharedSegment):
        self.group, self.world, self.rank = segment.group, segment.world, segment.rank
        self.barrier = segment.barrier
        self.capacity_bytes = segment.parts.shape[1] // 2
        cap = self.capacity_bytes
        self.halves = [segment.parts[:, :cap], segment.parts[:, cap:]]  # each [world, capacity] bytes
        self._typed = {}  # (half, dtype) -> [world, capacity / element size] view
        self._turn = 0
        self.calls = 0  # all-reduces taken (a test reads it: the route was really used)

    @classmethod
    def create(cls, group, capacity_bytes: int) -> HostAllReduce | None:
        """Collective over `group`; None on every rank alike where a SharedSegment is not possible."""
        segment = SharedSegment.create(group, torch.uint8, 2 * capacity_bytes, purpose="TP all-reduce")
        return cls(segment) if segment is not None else None

    def handles(self, tensor: torch.Tensor) -> bool:
        """The same answer on every rank of an all-reduce (same shape and dtype everywhere)."""
        return (tensor.device.type == "cpu" and tensor.is_floating_point() and tensor.is_contiguous()
                and tensor.numel() * tensor.element_size() <= self.capacity_bytes)

    def all_reduce_(self, tensor: torch.Tensor) -> None:
        key = (self._turn, tensor.dtype)
        if key not in self._typed:
            self._typed[key] = self.halves[self._turn].view(tensor.dtype)
        parts = self._typed[key][:, :tensor.numel()]
        self._turn ^= 1
        self.calls += 1
        flat = tensor.view(-1)
        parts[self.rank].copy_(flat)
        self.barrier()  # every rank's tensor is in place
        torch.add(parts[0], parts[1], out=flat)
        for k in range(2, self.world):
            flat.add_(parts[k])


_enabled = True
_reducers: dict = {}  # process group -> HostAllReduce


def configure(enabled: bool) -> None:
    """Whether shared-memory collectives may be used in this process (`parallel.host_shared_memory`);
    forgets the reducers registered so far (their groups are being replaced or destroyed)."""
    global _enabled
    _enabled = enabled
    _reducers.clear()


def enabled() -> bool:
    return _enabled


def register_reducer(group, capacity_bytes: int = 32 * 2**20) -> HostAllReduce | None:
    """Collective over `group`: all-reduces over it go through shared memory from now on where
    `HostAllReduce.handles` them (see `all_reduce`)."""
    if not _enabled or group is None or dist.get_world_size(group) == 1 or dist.get_backend(group) != "gloo":
        return None
    reducer = HostAllReduce.create(group, capacity_bytes)
    if reducer is not None:
        _reducers[group] = reducer
    return reducer


class _Done:
    """What an async all-reduce returns when it ran at once."""

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
    """`torch.distributed.all_reduce`, through shared memory where `group` has a reducer that takes
    `tensor` (a SUM of a contiguous CPU float tensor that fits), else gloo's."""
    reducer = _reducers.get(group)
    if reducer is not None and op == dist.ReduceOp.SUM and reducer.handles(tensor):
        reducer.all_reduce_(tensor)
        return _Done() if async_op else None
    return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)


def _reserve(path: str, nbytes: int) -> None:
    """Create `path` with `nbytes` of backed pages (tmpfs allocates them now: ENOSPC here, not later)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
