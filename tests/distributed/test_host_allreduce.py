"""parallel/host_allreduce.py: the shared-memory average equals gloo's all-reduce of divided values
(bit for bit at 2 ranks, where both add the same two halves; within 1e-6 at 3, whose order and
rounding differ) and leaves no file in /dev/shm. It is not used when the ranks are on different
hosts (simulated), /dev/shm is missing or one rank cannot map it (injected). A rank that never
arrives fails the others with the group's timeout, not a hang; one whose process exited, at once."""
import os
import platform

import pytest
import torch

from tests.distributed.harness import run_ranks

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this machine")


def _sums():
    import torch.distributed as dist

    from parallel import host_allreduce
    from parallel.context import initialize_parallel

    ctx = initialize_parallel(1, 1, device="cpu", seed=0)
    rank = ctx.dp_rank
    segment = host_allreduce.SharedSegment.create(ctx.dp_group, torch.float32, 1001)
    out = {"segment": segment is not None, "spin": segment._barrier is not None,
           "leftovers": [f for f in os.listdir("/dev/shm") if f.startswith("mmengine-allreduce-")]}
    values = torch.randn(1001, generator=torch.Generator().manual_seed(rank)) * 10 ** rank
    segment.local.copy_(values)
    segment.average_(3, 1001)  # a range that does not start at 0 nor divide by the ranks
    want = values / dist.get_world_size(ctx.dp_group)  # the gloo path: divide, then sum
    dist.all_reduce(want, group=ctx.dp_group)
    out.update(got=segment.local.clone(), want=want, values=values)
    # Ranks on different hosts (simulated), then no /dev/shm: no segment, on every rank alike.
    real_host_id = host_allreduce.host_id
    host_allreduce.host_id = lambda: f"host-{rank}"
    out["across_hosts"] = host_allreduce.SharedSegment.create(ctx.dp_group, torch.float32, 8) is not None
    host_allreduce.host_id, host_allreduce.SHM_DIR = real_host_id, "/nonexistent"
    out["without_shm"] = host_allreduce.SharedSegment.create(ctx.dp_group, torch.float32, 8) is not None
    # One rank fails to map the segment: no rank uses it, and its file is gone all the same.
    host_allreduce.SHM_DIR = "/dev/shm"
    if rank == 1:
        def refuse(*args, **kwargs):
            raise RuntimeError("injected: mmap refused")
        host_allreduce.torch.from_file = refuse
    out["map_refused"] = host_allreduce.SharedSegment.create(ctx.dp_group, torch.float32, 8) is not None
    out["leftovers_after_refusal"] = [f for f in os.listdir("/dev/shm") if f.startswith("mmengine-allreduce-")]
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_average_equals_gloo_all_reduce(world):
    results = run_ranks(world, _sums)
    for r in results:
        assert r["segment"] and not r["leftovers"]
        assert r["spin"] == (platform.machine().lower() in ("x86_64", "amd64"))  # the segment's own barrier
        assert not r["across_hosts"] and not r["without_shm"] and not r["map_refused"]
        assert not r["leftovers_after_refusal"]
        assert torch.equal(r["got"][:3], r["values"][:3])  # outside the range: untouched
        if world == 2:
            assert torch.equal(r["got"][3:], r["want"][3:])
        else:
            torch.testing.assert_close(r["got"][3:], r["want"][3:], rtol=1e-6, atol=1e-6)
    for r in results[1:]:  # every rank holds the same bits
        assert torch.equal(r["got"][3:], results[0]["got"][3:])


def _absent_rank():
    import time

    from parallel.context import initialize_parallel
    from parallel.host_allreduce import SharedSegment

    ctx = initialize_parallel(1, 1, device="cpu", seed=0, timeout_minutes=0.05)  # 3 s
    segment = SharedSegment.create(ctx.dp_group, torch.float32, 64)
    spin = segment._barrier is not None
    if ctx.dp_rank == 1:
        time.sleep(7)  # never reaches the average
        return "slept"
    out = {"spin": spin}
    start = time.time()
    try:
        segment.average_(0, 64)
        return "returned"
    except RuntimeError as exc:
        out.update(seconds=time.time() - start, error=str(exc))
    if spin:  # rank 1's process "exits" (its pid replaced by one that has): found long before the timeout
        import subprocess
        gone = subprocess.Popen(["true"])
        gone.wait()
        segment._barrier.pids[1] = gone.pid
        start = time.time()
        try:
            segment.barrier()
        except RuntimeError as exc:
            out.update(exited_seconds=time.time() - start, exited_error=str(exc))
    return out


def test_absent_rank_fails_with_the_group_timeout():
    """The shared-memory barrier (x86-64) names the rank that did not come, after the group's timeout,
    or at once when that rank's process has exited; elsewhere gloo's barrier times out."""
    waited, slept = run_ranks(2, _absent_rank)
    assert slept == "slept" and isinstance(waited, dict), waited
    assert 2.5 < waited["seconds"] < 6, waited  # the 3 s timeout, not the other rank's 7 s sleep
    if waited["spin"]:
        assert "rank(s) [1]" in waited["error"] and "timed out after 3 s" in waited["error"], waited
        assert waited["exited_seconds"] < 1 and "rank(s) [1] of the group exited" in waited["exited_error"], waited
