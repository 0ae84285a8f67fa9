"""Averages over the ranks of one host through shared memory instead of gloo's TCP (CPU tensors).

gloo moves every byte of a CPU all-reduce through the loopback network stack and back: 0.37 s for
B/32's 572 MB of gradients between two ranks on an idle 2-core machine, 0.68 s under load. When
every rank of a group runs on the same host, the ranks can read each other's buffers instead
(DeepSpeed's CPU `shm` all-reduce does this too): each rank's tensor lives in a shared segment, each
rank averages one slice of all of them into its own part, chunk by chunk so the scale and the sum
are one pass over memory, then copies the other ranks' averaged slices: 0.08 s for the same 572 MB,
no system calls and no temporary. Three barriers of the group per call order the passes, so a
missing rank fails with the group's timeout like any collective.

The segment lives in /dev/shm only while the ranks map it: rank 0 removes the file once every rank
has mapped it, so a crash leaves nothing behind.
"""
from __future__ import annotations

import logging
import os
import socket
import uuid

import torch
import torch.distributed as dist

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

    def __init__(self, group, parts: torch.Tensor):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.parts = parts  # [world, numel]
        self.local = parts[self.rank]
        self._scratch = torch.empty(_CHUNK if self.rank >= 2 else 0, dtype=parts.dtype)

    @classmethod
    def create(cls, group, dtype: torch.dtype, numel: int) -> SharedSegment | None:
        """Collective over `group`. None on every rank alike when the group is one rank, spans more
        than one host, or /dev/shm lacks room for twice the segment."""
        world = dist.get_world_size(group)
        if world == 1 or numel == 0:
            return None
        hosts = [None] * world
        dist.all_gather_object(hosts, host_id(), group=group)
        nbytes = world * numel * torch.tensor([], dtype=dtype).element_size()
        name = [None]
        if dist.get_rank(group) == 0:
            ok = len(set(hosts)) == 1 and os.path.isdir(SHM_DIR) and _free_bytes(SHM_DIR) > 2 * nbytes
            name = [os.path.join(SHM_DIR, f"mmengine-allreduce-{uuid.uuid4().hex}") if ok else None]
        dist.broadcast_object_list(name, src=dist.get_process_group_ranks(group)[0], group=group)
        if name[0] is None:
            return None
        try:
            flat, error = torch.from_file(name[0], shared=True, size=world * numel, dtype=dtype), ""
        except RuntimeError as exc:
            flat, error = None, f"{type(exc).__name__}: {exc}"
        errors = [None] * world
        dist.all_gather_object(errors, error, group=group)  # every rank mapped it, or none uses it
        if dist.get_rank(group) == 0:
            os.unlink(name[0])  # the mappings stay, the name goes
        dist.barrier(group=group)  # no rank returns while the name is still there
        if any(errors) and dist.get_rank(group) == 0:  # once, not once per rank
            log.warning("shared-memory gradient average unavailable (%s); gloo all-reduces instead",
                        next(e for e in errors if e))
        if any(errors):
            return None
        return cls(group, flat.view(world, numel))

    def average_(self, start: int, end: int) -> None:
        """Collective: `local[start:end]` becomes the mean over the ranks of their `local[start:end]`,
        each rank's values scaled by 1/world before the sum, as the gloo path divides first (at 2
        ranks the scale is exact, so the bits equal gloo's). Each rank reduces one slice in chunks
        that stay in cache, writing into its own part (no temporary the size of the slice: a fresh
        one costs its page faults every step), then copies the other ranks' reduced slices."""
        n = end - start
        bounds = [start + k * n // self.world for k in range(self.world + 1)]
        lo, hi = bounds[self.rank], bounds[self.rank + 1]
        scale = 1.0 / self.world
        dist.barrier(group=self.group)  # every rank's values are in place
        for a in range(lo, hi, _CHUNK):
            b = min(a + _CHUNK, hi)
            # Summed in rank order whichever rank reduces the slice (ranks 0 and 1 start from their own
            # part, which they overwrite: x0 + x1 == x1 + x0 exactly). A later rank's part is still to
            # be read when the first sum lands, so it sums into a scratch chunk.
            out = self.local[a:b] if self.rank < 2 else self._scratch[:b - a]
            first, second = (0, 1) if self.rank != 1 else (1, 0)
            torch.mul(self.parts[first, a:b], scale, out=out)
            out.add_(self.parts[second, a:b], alpha=scale)
            for k in range(2, self.world):
                out.add_(self.parts[k, a:b], alpha=scale)
            if self.rank >= 2:
                self.local[a:b].copy_(out)
        dist.barrier(group=self.group)  # every slice reduced
        for k in range(self.world):
            if k != self.rank:
                self.local[bounds[k]:bounds[k + 1]].copy_(self.parts[k, bounds[k]:bounds[k + 1]])
        dist.barrier(group=self.group)  # every rank has read the others' slices: they may write again


def _free_bytes(path: str) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize
