"""A crash at any moment of a save leaves the previous checkpoint intact and loadable, and `latest`
never names a partial save; the next run resumes from it, cleans up, and ends where an
uninterrupted run ends. Also: an asynchronous save (training goes on while it is written) stores
exactly what a synchronous one stores.

Runs at DP=2 with ZeRO-1, so each rank writes its own optimizer shards; the crash is a process exit
without any cleanup (as kill -9) at the points named in `crash_run`.
"""
import os

import pytest
import torch

from engine.checkpoint.reader import CheckpointReader
from engine.checkpoint.storage import is_complete, read_latest, step_dirname, tmp_dirname
from tests.distributed.harness import run_ranks
from tests.distributed.test_checkpoint_helpers import crash_run, recipe_overrides

STEPS, INTERVAL = 4, 2


def _overrides(out_dir, shapes, *extra):
    return recipe_overrides(out_dir, shapes, 1, "distributed_fused_adam", steps=STEPS) + [
        f"checkpoint.save_interval={INTERVAL}", *extra]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return str(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shapes):
    out = str(tmp_path_factory.mktemp("sync"))
    result = run_ranks(2, crash_run, _overrides(out, shapes), None, STEPS, timeout=300)[0]
    return {"root": os.path.join(out, "checkpoints"), "result": result}


def _same_tensors(a: str, b: str):
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert sorted(ra.tensors) == sorted(rb.tensors)
    for key in ra.tensors:
        assert torch.equal(ra.read_tensor(key), rb.read_tensor(key)), key


@pytest.mark.parametrize("crash", ["rank1_mid_write", "rank0_before_rename", "rank0_before_latest"])
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, shapes, uninterrupted, crash):
    out = str(tmp_path)
    root = os.path.join(out, "checkpoints")
    with pytest.raises(RuntimeError):
        run_ranks(2, crash_run, _overrides(out, shapes), crash, STEPS, timeout=120)
    previous = os.path.join(root, step_dirname(INTERVAL))
    assert read_latest(root) == previous
    with open(os.path.join(root, "latest")) as fh:
        assert fh.read().strip() == step_dirname(INTERVAL)
    CheckpointReader(previous)  # sizes and checksums of every file
    _same_tensors(previous, os.path.join(uninterrupted["root"], step_dirname(INTERVAL)))
    crashed = os.path.join(root, step_dirname(STEPS))
    if crash == "rank0_before_latest":
        assert is_complete(crashed)  # renamed, complete, but not named by latest
    else:
        assert not os.path.exists(crashed) and os.path.isdir(os.path.join(root, tmp_dirname(STEPS)))

    # the next run resumes from `latest`, replaces the leftovers and ends as the uninterrupted run
    resumed = run_ranks(2, crash_run, _overrides(out, shapes), None, STEPS, timeout=300)[0]
    assert resumed["loaded_from"] == previous
    assert resumed["history"] == uninterrupted["result"]["history"]
    assert read_latest(root) == crashed
    assert not os.path.exists(os.path.join(root, tmp_dirname(STEPS)))
    _same_tensors(crashed, os.path.join(uninterrupted["root"], step_dirname(STEPS)))


def test_async_save_stores_what_a_sync_save_stores(tmp_path, shapes, uninterrupted):
    result = run_ranks(2, crash_run, _overrides(str(tmp_path), shapes, "checkpoint.async_save=true"), None, STEPS,
                       timeout=300)[0]
    assert result["history"] == uninterrupted["result"]["history"]
    saves = [t for t in result["timings"] if t["kind"] == "save"]
    assert [t["step"] for t in saves] == [INTERVAL, STEPS]
    assert all(t["blocking_s"] <= t["total_s"] for t in saves)
    for step in (INTERVAL, STEPS):
        _same_tensors(os.path.join(str(tmp_path), "checkpoints", step_dirname(step)),
                      os.path.join(uninterrupted["root"], step_dirname(step)))
