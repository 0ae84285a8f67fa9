"""FastCLIP's loss against the plain contrastive loss: time of forward + backward and state bytes.

    python bench/fastclip_loss.py [--batch 256 1024] [--dim 512] [--repeats 5]

One process (DP=1), CPU unless --device cuda; features are random unit vectors with gradients.
Per-sample state bytes per rank are also printed for a data set of --data-size rows at DP=--dp
(the reference keeps all of it on every rank). Not a test.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from models.clip.fastclip import FastCLIPConfig, FastCLIPLoss
from models.clip.loss import ContrastiveLoss
from models.clip.sample_state import block_bounds


def _step(loss_fn, image, text, scale, extra) -> None:
    loss_fn(image, text, scale.exp(), **extra).backward()


def time_call(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-size", type=int, default=1_000_000)
    parser.add_argument("--dp", type=int, default=8)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"| global batch | clip (ms) | fastclip v3 (ms) | fastclip v2 (ms) |  device {device}, dim {args.dim}")
    print("|---|---|---|---|")
    for batch in args.batch:
        gen = torch.Generator().manual_seed(0)
        image = torch.nn.functional.normalize(torch.randn(batch, args.dim, generator=gen), dim=-1).to(device)
        text = torch.nn.functional.normalize(torch.randn(batch, args.dim, generator=gen), dim=-1).to(device)
        image.requires_grad_(), text.requires_grad_()
        scale = torch.tensor(math.log(1 / 0.07), device=device, requires_grad=True)
        index = torch.arange(batch, device=device)
        losses = [(ContrastiveLoss(), {})]
        for version in ("v3", "v2"):
            fastclip = FastCLIPLoss(FastCLIPConfig(version=version, data_size=batch, lr_tau=1e-3), device=device)
            losses.append((fastclip, {"sample_index": index, "epoch": 1}))
        row = [batch]
        for loss_fn, extra in losses:
            step = functools.partial(_step, loss_fn, image, text, scale, extra)
            row.append(time_call(step, args.repeats))
        print(f"| {row[0]} | " + " | ".join(f"{1000 * t:.1f}" for t in row[1:]) + " |")
    _, block = block_bounds(args.data_size, args.dp, 0)
    print(f"\nper-sample state, data_size={args.data_size:,}, DP={args.dp}: bytes per rank (reference: full copy)")
    for name, states, reference_states in (("v0/v1/v3 (log u image, text)", 2, 2),
                                           ("v2 (+ tau, m, v per modality)", 8, 10)):
        print(f"  {name}: {4 * states * block:,} ({4 * reference_states * args.data_size:,})")


if __name__ == "__main__":
    main()
