"""Checkpoint save/load times on CPU for a CLIP size at a TP layout (default B/32 at TP=2).

    python bench/checkpoint_io.py [--config configs/clip/b32.yaml] [--tp 2] [--optim adamw] [--repeats 2]
    python bench/checkpoint_io.py --device cuda --tp 1 --no-reshard --results /tmp/out/checkpoint_io_gpu

Phases (each under torchrun, gloo, one thread per rank), on the engine's own `CheckpointManager`:
  1. at TP=tp: synchronous saves, asynchronous saves (time the training thread is blocked, and
     until the commit), loads at the same layout (with and without CRC32 verification);
  2. at TP=1 (one process): a re-sharding load of the TP=tp checkpoint.
Model weights and Adam moments are real-size fp32 (moments filled with random values); no data,
no training. Files go to --out (default a directory under /tmp, removed afterwards); writes are
fsynced. Not a test; writes bench/results/checkpoint_io_cpu.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from report import write_report  # noqa: E402


def _worker(args) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    from engine.checkpoint import CheckpointManager
    from engine.config import load_config
    from engine.optim import WarmupCosineSchedule, build_optimizer
    from engine.schema import BARE_KEYS
    from models.clip.config import CLIPExperimentConfig as ExperimentConfig
    from engine.trainer import TrainState
    from models.clip.model import CLIPModel, count_parameters
    from parallel.context import destroy_parallel, initialize_parallel

    overrides = [f"tensor_model_parallel_size={args.tp}", f"device={args.device}", f"optim.name={args.optim}",
                 f"checkpoint.dir={args.out}/{args.phase}", "checkpoint.keep_last=1"]
    cfg = load_config(ExperimentConfig, os.path.join(ROOT, args.config), overrides, BARE_KEYS)
    ctx = initialize_parallel(args.tp, 1, args.device, seed=0)
    model = CLIPModel(cfg.model, use_cpu_initialization=True).to(ctx.device)
    optimizer = build_optimizer(model, cfg.optim, dp_group=ctx.dp_group, model_parallel_group=ctx.model_parallel_group)
    scheduler = WarmupCosineSchedule(optimizer, cfg.optim.lr, 10, 100)
    gen = torch.Generator().manual_seed(ctx.rank)
    for _, _, views in optimizer.checkpoint_slices():
        for view in views.values():
            view.copy_(torch.rand(view.shape, generator=gen).to(view.device))

    class Run:  # what the manager reads from a trainer
        pass

    run = Run()
    run.model, run.optimizer, run.scheduler, run.cfg, run.state = model, optimizer, scheduler, cfg.trainer, TrainState()
    results = {"params_on_rank0": count_parameters(model)}
    manager = CheckpointManager(cfg, ctx, install_signals=False)
    if args.phase == "save":
        for mode in ("sync", "async"):
            manager.ck.async_save = mode == "async"
            for _ in range(args.repeats):
                run.state.step += 1
                dist.barrier()
                start = time.time()
                manager.save(run)
                blocking = time.time() - start
                manager.wait()
                dist.barrier()
                results.setdefault(f"save_{mode}", []).append({"blocking_s": blocking, "total_s": time.time() - start})
        path = manager.last_saved_path
        marker = json.load(open(os.path.join(path, "COMPLETE")))
        results["bytes"] = sum(f["size"] for f in marker["files"].values())
        results["path"] = path
        for verify in (True, False):
            manager.ck.verify_checksums = verify
            for _ in range(args.repeats):
                dist.barrier()
                start = time.time()
                manager.load(path, run)
                dist.barrier()
                results.setdefault(f"load_{'crc' if verify else 'nocrc'}", []).append(time.time() - start)
    else:
        manager.ck.verify_checksums = True
        for _ in range(args.repeats):
            start = time.time()
            manager.load(args.load, run)
            results.setdefault("load_reshard", []).append(time.time() - start)
    manager.close()
    if ctx.rank == 0:
        with open(os.path.join(args.out, f"{args.phase}.json"), "w") as fh:
            json.dump(results, fh)
    destroy_parallel()


def _launch(args, phase: str, nproc: int, tp: int, extra=()) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), os.path.abspath(__file__),
           "--worker", "--phase", phase, "--tp", str(tp), "--config", args.config, "--optim", args.optim,
           "--repeats", str(args.repeats), "--out", args.out, "--device", args.device, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{phase} failed:\n{proc.stderr[-4000:]}")
    with open(os.path.join(args.out, f"{phase}.json")) as fh:
        return json.load(fh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/clip/b32.yaml")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--optim", default="adamw")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None, help="where checkpoints are written (default: a temp dir)")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per rank)")
    parser.add_argument("--no-reshard", action="store_true", help="skip the TP=1 re-sharding load")
    parser.add_argument("--results", default=os.path.join(HERE, "results/checkpoint_io_cpu"),
                        help="table and JSON written to RESULTS.md / RESULTS.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--phase", default="save", help=argparse.SUPPRESS)
    parser.add_argument("--load", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    own_out = args.out is None
    args.out = args.out or tempfile.mkdtemp(prefix="ckpt_bench_")
    try:
        saved = _launch(args, "save", args.tp, args.tp)
        loaded = None if args.no_reshard else _launch(args, "reshard", 1, 1, ["--load", saved["path"]])
    finally:
        if own_out:
            shutil.rmtree(args.out, ignore_errors=True)
    import torch

    mb = saved["bytes"] / 2**20
    best = lambda xs, key=None: min(x[key] if key else x for x in xs)  # noqa: E731
    rows = [
        ("save, synchronous", best(saved["save_sync"], "total_s"), best(saved["save_sync"], "total_s")),
        ("save, asynchronous", best(saved["save_async"], "blocking_s"), best(saved["save_async"], "total_s")),
        ("load, same layout, CRC32 verified", best(saved["load_crc"]), best(saved["load_crc"])),
        ("load, same layout, sizes only", best(saved["load_nocrc"]), best(saved["load_nocrc"])),
    ]
    if loaded is not None:
        rows.append((f"load at TP=1 (re-shard from TP={args.tp}), CRC32", best(loaded["load_reshard"]),
                     best(loaded["load_reshard"])))
    name = os.path.splitext(os.path.basename(args.config))[0]
    lines = [f"Checkpoint I/O, CLIP {name} fp32 at TP={args.tp} (optim.name={args.optim}): {mb:.0f} MiB per checkpoint "
             f"(weights + Adam moments), {_device_label(args.device)}, "
             f"torch {torch.__version__}, local disk, fsync on; best of {args.repeats}",
             "", "| operation | training blocked (s) | until committed / loaded (s) | MiB/s |", "|---|---|---|---|"]
    for label, blocked, total in rows:
        lines.append(f"| {label} | {blocked:.2f} | {total:.2f} | {mb / total:.0f} |")
    write_report(args.results, "\n".join(lines), {
        "config": args.config, "tp": args.tp, "optim": args.optim, "device": args.device, "mib": mb,
        "save": saved, "reshard": loaded,
        "rows": [{"operation": label, "blocked_s": b, "total_s": t, "gb_per_s": saved["bytes"] / 1e9 / t}
                 for label, b, t in rows]})


def _device_label(device: str) -> str:
    if device == "cuda":
        import torch

        return f"GPU ({torch.cuda.get_device_name(0)})"
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores, shared)"


if __name__ == "__main__":
    main()
