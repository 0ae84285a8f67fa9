"""One run per checkpoint directory (engine/checkpoint/lock.py): a second live run is refused with
a message naming the holder, before it writes anything; a dead holder's lock on this host, or a
silent one on another host, is taken over with a warning; the lock goes at close and at exit; a run
whose lock was taken over saves nothing more."""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from engine.checkpoint.lock import LOCK_FILE, CheckpointLockError, RunLock

# A real RunLock in another process. The package's __init__ (the manager: torch, megatron) is
# skipped so the process starts in well under a second; the lock module needs neither.
HOLD = textwrap.dedent("""
    import sys, time, types
    package = types.ModuleType("engine.checkpoint")
    package.__path__ = ["engine/checkpoint"]
    sys.modules["engine.checkpoint"] = package
    from engine.checkpoint.lock import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("held", flush=True)
    if sys.argv[2] == "hold":
        time.sleep(120)
""")


def _holder(root, mode="hold"):
    """Another process that takes the lock on `root` (and holds it, or exits normally)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root), mode], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stdout.readline().strip() == "held"
    return proc


def _read_lock(root) -> dict:
    with open(os.path.join(root, LOCK_FILE)) as fh:
        return json.load(fh)


def _write_lock(root, **fields):
    os.makedirs(root, exist_ok=True)
    beat = fields.pop("heartbeat_unix", time.time())
    record = {"host": "other-node", "pid": 4242, "pid_start_time": 1.0, "job": {}, "started_at": "earlier",
              "started_unix": time.time(), "token": "theirs", **fields}
    path = os.path.join(root, LOCK_FILE)
    with open(path, "w") as fh:
        json.dump(record, fh)
    os.utime(path, (beat, beat))  # the heartbeat is the file's modification time


def test_live_holder_refused_then_dead_holder_taken_over(tmp_path, caplog):
    root = tmp_path / "ckpt"
    proc = _holder(root)
    try:
        with pytest.raises(CheckpointLockError) as refused:
            RunLock(str(root)).acquire()
        assert f"host {socket.gethostname()}, pid {proc.pid}" in str(refused.value)
        assert "in use by another run" in str(refused.value) and "Nothing was written" in str(refused.value)
    finally:
        proc.send_signal(signal.SIGKILL)  # dies without releasing: its lock stays behind
        proc.wait()
    assert os.path.exists(root / LOCK_FILE)
    with caplog.at_level(logging.WARNING, logger="engine"):
        lock = RunLock(str(root)).acquire()
    assert f"taking over the lock of host {socket.gethostname()}, pid {proc.pid}" in caplog.text
    assert f"process {proc.pid} no longer exists on this host" in caplog.text
    assert _read_lock(root)["pid"] == os.getpid()
    lock.release()
    assert not os.path.exists(root / LOCK_FILE)
    assert os.listdir(root) == []  # no temporary or moved-aside files left


def test_lock_released_when_the_holder_exits(tmp_path):
    root = tmp_path / "ckpt"
    proc = _holder(root, mode="exit")
    proc.wait()
    assert proc.returncode == 0 and not os.path.exists(root / LOCK_FILE)


def test_other_host_by_heartbeat_and_same_slurm_job(tmp_path, caplog):
    root = str(tmp_path / "ckpt")
    _write_lock(root, job={"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0"})
    with pytest.raises(CheckpointLockError, match=r"host other-node, pid 4242, job SLURM_JOB_ID=77, SLURM_STEP_ID=0"):
        RunLock(root, environ={"SLURM_JOB_ID": "78", "SLURM_STEP_ID": "0"}).acquire()
    # the same job step as ours: SLURM runs one at a time, so that one is a requeued job's earlier run
    with caplog.at_level(logging.WARNING, logger="engine"):
        RunLock(root, environ={"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0"}).acquire().release()
    assert "an earlier run of this same SLURM job step" in caplog.text
    # no heartbeat for longer than the stale age
    _write_lock(root, heartbeat_unix=time.time() - 120)
    with pytest.raises(CheckpointLockError, match="last heartbeat 120 s ago"):
        RunLock(root, stale_after_s=300).acquire()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engine"):
        RunLock(root, stale_after_s=60).acquire().release()
    assert "no heartbeat from host other-node for 120 s (> 60 s)" in caplog.text


def test_heartbeat_refreshes_and_a_lost_lock_stops_saving(tmp_path):
    root = str(tmp_path / "ckpt")
    lock = RunLock(root, heartbeat_s=0.05).acquire()
    path = os.path.join(root, LOCK_FILE)
    os.utime(path, (time.time() - 100, time.time() - 100))
    deadline = time.time() + 30
    while os.path.getmtime(path) < time.time() - 50 and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.getmtime(path) > time.time() - 50  # touched again
    lock.verify()  # still ours
    _write_lock(root, heartbeat_unix=time.time())  # another run took it over while this one was stopped
    with pytest.raises(CheckpointLockError, match=r"lost the lock .*\(host other-node, pid 4242"):
        lock.verify()
    lock.release()
    assert os.path.exists(os.path.join(root, LOCK_FILE))  # not ours to remove


def test_checkpoint_manager_refuses_a_directory_in_use_and_releases_its_own(single_rank, tmp_path):
    from engine.checkpoint import CheckpointManager
    from tests.unit.tiny_trainer import tiny_config, tiny_trainer

    cfg = tiny_config(str(tmp_path), max_steps=2, save_interval=1)
    root = tmp_path / "checkpoints"
    proc = _holder(root)
    try:
        with pytest.raises(CheckpointLockError, match=f"pid {proc.pid}"):
            CheckpointManager(cfg, single_rank, install_signals=False)
        assert os.listdir(root) == [LOCK_FILE]  # nothing written
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    trainer, data = tiny_trainer(cfg, single_rank)
    assert _read_lock(root)["pid"] == os.getpid()
    trainer.fit(data)
    trainer.checkpoint.close()
    assert not os.path.exists(root / LOCK_FILE)
    assert sorted(os.listdir(root)) == ["latest", "step_000000001", "step_000000002"]

    # a run whose lock another run took over (it was stopped too long) refuses to save
    trainer, data = tiny_trainer(cfg, single_rank)
    _write_lock(str(root), heartbeat_unix=time.time())
    with pytest.raises(CheckpointLockError, match="lost the lock"):
        trainer.checkpoint.save(trainer)
    assert sorted(os.listdir(root)) == [LOCK_FILE, "latest", "step_000000001", "step_000000002"]
    trainer.checkpoint.close()
