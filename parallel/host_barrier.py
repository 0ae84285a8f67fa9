"""A barrier for the ranks of one host through counters in shared memory, for the shared-memory
collectives (parallel/host_allreduce.py), which need one or more per call.

gloo's `barrier` is an all-reduce of one element over TCP loopback: a median 0.5-1.1 ms on the
2-core machine even when every rank is already there, which at 126 TP all-reduces a B/32 step is
0.25-0.30 s of a 4.5 s step. Here each rank has a counter in its own cache line of the segment; a
rank arriving increments its counter and waits until every other rank's has reached the same
value: a few microseconds when the ranks arrive together.

Ordering: a rank's writes to the segment before `wait` must be visible to a rank that saw its
counter. x86's total store order gives that for ordinary stores (a store is not passed by a later
store, a load not by a later load; glibc fences its non-temporal copies), so the barrier is used on
x86-64 only; elsewhere `SpinBarrier.supported()` is False and the caller keeps gloo's barrier.

Waiting: a rank first polls (the others are usually microseconds away), then yields the core
between polls (tests run more ranks than cores: a rank that spins can starve the one it waits
for), then sleeps 50 us between polls. Past the group's timeout it raises `CollectiveTimeoutError`
naming the ranks that did not arrive, as gloo's barrier would; a rank whose process has exited is
reported within about 10 ms instead of at the timeout (gloo sees its closed socket as quickly).
"""
from __future__ import annotations

import datetime
import os
import platform
import time

import numpy as np
import torch

from parallel.timeouts import CollectiveTimeoutError

LINE = 64  # bytes between two ranks' counters: one cache line each, so a write does not evict the others'
_POLLS = 64  # polls before the first yield
_YIELD_SECONDS = 0.002  # then yields between polls this long, then sleeps
_SLEEP_SECONDS = 5e-5
_LIVENESS_SECONDS = 0.01  # how often a sleeping waiter checks that the missing ranks' processes exist


def control_bytes(world: int) -> int:
    """Bytes of a segment the counters of `world` ranks take, rounded up to a page so the data after
    them stays page aligned."""
    return -(-world * LINE // 4096) * 4096


class SpinBarrier:
    """`wait()`: returns once every rank of the group has called it as often as this rank has."""

    def __init__(self, control: torch.Tensor, rank: int, world: int, timeout: datetime.timedelta | None,
                 pids: list[int], description: str):
        """`control`: the segment's first `control_bytes(world)` bytes (uint8, zero at creation), the
        same memory on every rank; `pids`: each rank's process id; `description` names the group in
        errors."""
        self.counters = control.numpy()[:world * LINE].view(np.int64)[::LINE // 8]  # [world], strided
        self.rank, self.world = rank, world
        self.others = [k for k in range(world) if k != rank]
        self.timeout = timeout.total_seconds() if timeout is not None else 1800.0  # gloo's default
        # In another PID namespace the ids mean nothing here: then only the timeout applies.
        self.pids = pids if all(_exists(pid) for pid in pids) else None
        self.description = description
        self.generation = 0

    @staticmethod
    def supported() -> bool:
        return platform.machine().lower() in ("x86_64", "amd64")

    def _missing(self) -> list[int]:
        counters, generation = self.counters, self.generation
        return [k for k in self.others if counters[k] < generation]

    def wait(self) -> None:
        self.generation += 1
        self.counters[self.rank] = self.generation
        polls = 0
        while self._missing():
            polls += 1
            if polls < _POLLS:
                continue
            if polls == _POLLS:
                start = last_check = time.monotonic()
            now = time.monotonic()
            if now - start < _YIELD_SECONDS:
                os.sched_yield()
                continue
            if now - start > self.timeout:
                raise CollectiveTimeoutError(
                    f"shared-memory barrier of {self.description} timed out after {self.timeout:g} s "
                    f"(parallel.distributed_timeout_minutes): rank(s) {self._missing()} of the group did not "
                    f"reach it (stopped, hung, or waiting in a different collective; check that rank's log)")
            if self.pids is not None and now - last_check > _LIVENESS_SECONDS:
                last_check = now
                gone = [k for k in self._missing() if not _exists(self.pids[k])]
                if gone:
                    raise RuntimeError(
                        f"shared-memory barrier of {self.description}: rank(s) {gone} of the group exited "
                        f"(process {', '.join(str(self.pids[k]) for k in gone)} no longer runs); see that "
                        f"rank's log for why")
            time.sleep(_SLEEP_SECONDS)


def _exists(pid: int) -> bool:
    """Whether process `pid` still runs (an exited one not yet reaped by its parent does not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's process: it exists
            return True
        return True
