"""Run a function on N ranks on one machine (gloo), the way torchrun would, and collect results.

Each rank is a spawned process with torchrun's environment variables set, so the code under test
goes through the same `initialize_parallel` path as a real launch. A rank that raises makes the
whole run fail with that rank's traceback; a rank that hangs is killed at `timeout` with its stack
dumped (faulthandler), so collective mistakes show up as errors, not as a stuck suite.
"""
from __future__ import annotations

import faulthandler
import os
import socket
import tempfile
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, fn, args, out_dir, timeout):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(timeout, exit=True)
    result_path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        result = fn(*args)
        torch.save({"ok": True, "result": result}, result_path)
    except BaseException:  # noqa: BLE001 - reported to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, result_path)
        raise
    finally:
        from parallel.context import destroy_parallel

        destroy_parallel()
        faulthandler.cancel_dump_traceback_later()


def run_ranks(world_size: int, fn, *args, timeout: float = 240.0) -> list:
    """Run `fn(*args)` on `world_size` ranks; return each rank's return value, rank order."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _worker, args=(world_size, free_port(), fn, args, out_dir, timeout),
            nprocs=world_size, join=False, start_method="spawn",
        )
        try:
            while not ctx.join(timeout=timeout + 30):
                pass
        except Exception as exc:  # a rank died: prefer its own traceback
            errors = []
            for rank in range(world_size):
                path = os.path.join(out_dir, f"rank{rank}.pt")
                if os.path.exists(path):
                    payload = torch.load(path, weights_only=False)
                    if not payload["ok"]:
                        errors.append(f"rank {rank}:\n{payload['error']}")
            raise RuntimeError("\n".join(errors) or str(exc)) from exc
        results = []
        for rank in range(world_size):
            payload = torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=False)
            results.append(payload["result"])
        return results
