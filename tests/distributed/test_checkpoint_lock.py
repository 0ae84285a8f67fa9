"""The checkpoint directory's lock is collective: rank 0 takes it and every rank of a second run
raises the same error naming the holder (no rank goes on into a collective the others left)."""
import os
import signal

from tests.distributed.harness import run_ranks
from tests.unit.test_checkpoint_lock import _holder


def _build_manager(out_dir):
    from engine.checkpoint import CheckpointLockError, CheckpointManager
    from parallel.context import initialize_parallel
    from tests.unit.tiny_trainer import tiny_config

    ctx = initialize_parallel(1, 1, device="cpu", seed=0)
    try:
        CheckpointManager(tiny_config(out_dir), ctx, install_signals=False).close()
    except CheckpointLockError as exc:
        return str(exc)
    return None


def test_every_rank_of_a_second_run_raises_the_same_error(tmp_path):
    proc = _holder(tmp_path / "checkpoints")
    try:
        refused = run_ranks(2, _build_manager, str(tmp_path), timeout=120)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert refused[0] is not None and refused[0] == refused[1]
    assert f"pid {proc.pid}" in refused[0] and "in use by another run" in refused[0]
    assert os.listdir(tmp_path / "checkpoints") == ["LOCK"]
