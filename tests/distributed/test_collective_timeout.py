"""parallel.distributed_timeout_minutes bounds every collective, not only the world group's.

1. Every process group of a rank (the world, megatron-core's, the checkpoint manager's) waits the
   configured time (3 s here), not torch's or megatron's 30 minutes.
2. A rank stopped with SIGSTOP in the middle of a step: the other rank leaves the loss's DP
   all-gather after the timeout with an error that names the setting, the collective and its
   group, and its process exits on its own (measured: within the timeout plus MARGIN_S).
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

from tests.distributed.harness import free_port, run_ranks

TIMEOUT_MINUTES = 0.05  # 3 s
MARGIN_S = 20.0  # process exit (interpreter teardown) on a loaded 2-core machine


def _group_timeouts(out_dir):
    import torch.distributed as dist

    from engine.checkpoint import CheckpointManager
    from parallel.context import initialize_parallel
    from parallel.timeouts import group_timeout
    from tests.unit.tiny_trainer import tiny_config

    ctx = initialize_parallel(1, 1, device="cpu", seed=0, timeout_minutes=TIMEOUT_MINUTES)
    manager = CheckpointManager(tiny_config(out_dir), ctx, install_signals=False)
    groups = {getattr(g, "group_desc", str(g)): group_timeout(g).total_seconds()
              for g in dist.distributed_c10d._world.pg_map}
    manager.close()
    return groups


def test_every_process_group_waits_the_configured_timeout(tmp_path):
    for groups in run_ranks(2, _group_timeouts, str(tmp_path), timeout=120):
        assert {name: s for name, s in groups.items() if s != TIMEOUT_MINUTES * 60} == {}
        assert {"default_pg", "DATA_PARALLEL_GROUP", "TENSOR_MODEL_PARALLEL_GROUP", "DATA_PARALLEL_GROUP_GLOO",
                "EXPERT_DATA_PARALLEL_GROUP_GLOO", "checkpoint_io", "checkpoint_preemption_flag"} <= set(groups)


RANK_MAIN = textwrap.dedent("""
    import os, signal, sys, time
    import torch
    from parallel.collectives import all_gather_with_grad
    from parallel.context import destroy_parallel, initialize_parallel
    from tests.unit.tiny_trainer import tiny_config, tiny_trainer

    out_dir, stamp = sys.argv[1], sys.argv[2]
    ctx = initialize_parallel(1, 1, device="cpu", seed=0, timeout_minutes=float(sys.argv[3]))
    try:
        cfg = tiny_config(out_dir, max_steps=6, save_interval=0)
        cfg.trainer.global_batch_size = 4  # micro-batch 2 on each of the 2 DP ranks
        trainer, data = tiny_trainer(cfg, ctx)

        def forward_step(model, batch, inputs=None):  # a contrastive-style loss: features gathered over DP
            if ctx.rank == 1 and trainer.state.step + 1 == 3:
                with open(stamp, "w") as fh:
                    fh.write(str(time.time()))
                os.kill(os.getpid(), signal.SIGSTOP)
            features = all_gather_with_grad(model(batch), ctx.dp_group)
            return features.square().mean(), {"samples": batch.shape[0], "tokens": batch.numel()}

        trainer.forward_step = forward_step
        trainer.fit(data)
    finally:
        destroy_parallel()
""")


def test_stopped_rank_makes_the_others_exit_naming_the_timeout(tmp_path):
    port, stamp = free_port(), str(tmp_path / "stopped_at")
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_MAIN, str(tmp_path / "run"), stamp,
                                       str(TIMEOUT_MINUTES)], env=env, stderr=subprocess.PIPE, text=True))
    try:
        _, stderr = procs[0].communicate(timeout=300)
        exited_at = time.time()
        with open(stamp) as fh:
            stopped_at = float(fh.read())
        elapsed = exited_at - stopped_at
        print(f"rank 0 exited {elapsed:.1f} s after rank 1 stopped (timeout {TIMEOUT_MINUTES * 60:g} s)")
        print(stderr[stderr.rfind("CollectiveTimeoutError"):])
        assert procs[0].returncode == 1, stderr[-3000:]
        assert "CollectiveTimeoutError" in stderr, stderr[-3000:]
        assert "parallel.distributed_timeout_minutes=0.05" in stderr and "timed out after 3 s" in stderr
        assert "on process group DATA_PARALLEL_GROUP (ranks [0, 1])" in stderr
        assert "the last completed training step was 2; called from parallel/collectives.py" in stderr
        assert TIMEOUT_MINUTES * 60 <= elapsed < TIMEOUT_MINUTES * 60 + MARGIN_S
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
