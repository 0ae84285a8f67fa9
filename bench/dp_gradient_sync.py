"""Backward + DP gradient averaging, two ways, interleaved step by step on the same 2 gloo ranks so
both see the same machine load: the averager's bucket-view gradients reduced while backward runs
(parallel/data_parallel.py), against flattening the gradients after backward, all-reducing and
copying them back (what it did before).

    python bench/dp_gradient_sync.py [--config configs/clip/tiny.yaml] [--batch 64] [--pairs 8]

Times are per step of one micro-batch per rank (forward excluded); the table shows medians. Not a test.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def flatten_after_backward(params, group, world: int, bucket_bytes: float = 25 * 2**20) -> None:
    """The previous averager: flatten each bucket's gradients, all-reduce, unflatten and copy back."""
    import torch
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    buckets, current, size = [], [], 0
    for p in params:
        if current and size + p.numel() * p.element_size() > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(p)
        size += p.numel() * p.element_size()
    buckets.append(current)
    pending = []
    for bucket in buckets:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
        flat = _flatten_dense_tensors(grads)
        flat.div_(world)
        pending.append((bucket, grads, flat, dist.all_reduce(flat, group=group, async_op=True)))
    for bucket, grads, flat, work in pending:
        work.wait()
        for p, synced in zip(bucket, _unflatten_dense_tensors(flat, grads)):
            p.grad.copy_(synced)


def worker(args) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    from engine.config import load_config
    from engine.schema import ExperimentConfig
    from models.clip.loss import ContrastiveLoss
    from models.clip.model import CLIPModel
    from parallel.context import initialize_parallel
    from parallel.data_parallel import GradientAverager

    ctx = initialize_parallel(1, 1, "cpu", seed=0)
    cfg = load_config(ExperimentConfig, os.path.join(ROOT, args.config), ["model.text.vocab_size=49408"])
    model = CLIPModel(cfg.model)
    params = [p for p in model.parameters() if p.requires_grad]
    v, t = cfg.model.vision, cfg.model.text
    images = torch.randn(args.batch, 3, v.img_h, v.img_w)
    tokens = torch.randint(0, 49407, (args.batch, t.encoder_seq_length))
    loss_fn = ContrastiveLoss(group=ctx.dp_group)
    averager = GradientAverager(params, ctx.dp_group)
    hooks_on = averager._hooks
    times = {"bucket views, overlapped": [], "flatten after backward": []}
    for i in range(2 * args.pairs + 2):
        new = i % 2 == 0
        loss = loss_fn(*model(images, tokens))
        dist.barrier()
        tic = time.perf_counter()
        if new:
            averager.zero_grad()
            averager.prepare_backward(last_micro_batch=True)
            loss.backward()
            averager.average()
        else:
            for p in params:
                p.grad = None
            averager._armed = False
            loss.backward()
            flatten_after_backward(params, ctx.dp_group, ctx.dims.dp)
        elapsed = time.perf_counter() - tic
        if i >= 2:  # the first pair warms up
            times["bucket views, overlapped" if new else "flatten after backward"].append(elapsed)
    del hooks_on
    if ctx.rank == 0:
        n = sum(p.numel() for p in params)
        print(f"{args.config}, {n / 1e6:.1f}M parameters, micro-batch {args.batch} per rank, DP=2, "
              f"{args.pairs} interleaved pairs; 1-min load average {os.getloadavg()[0]:.1f}")
        print("| DP gradient sync | backward + sync (s), median | min-max (s) |\n|---|---|---|")
        for name, values in times.items():
            print(f"| {name} | {statistics.median(values):.3f} | {min(values):.3f}-{max(values):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/clip/tiny.yaml")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", os.path.abspath(__file__),
           "--worker", "--config", args.config, "--batch", str(args.batch), "--pairs", str(args.pairs)]
    sys.exit(subprocess.call(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}))


if __name__ == "__main__":
    main()
