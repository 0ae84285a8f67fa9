"""Peak memory and step time on CPU with and without activation recompute and ZeRO-1, beside the
memory estimator's prediction (examples/estimate_memory.py), for the tiny and B/32 CLIP at DP=2.

    python bench/memory_and_recompute.py [--models tiny,b32] [--steps 6]

Measured memory is rank 0's peak resident set minus its resident set just before the model was
built (so it holds parameters, gradients, optimizer state, activations and allocator slack, not
the Python/torch libraries or the data pipeline). Not a test; writes bench/results/memory_cpu.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from engine_runner import run_engine  # noqa: E402
from report import write_report  # noqa: E402

MODELS = {"tiny": ("configs/clip/tiny.yaml", 128), "b32": ("configs/clip/b32.yaml", 16)}
VARIANTS = {
    "baseline": [],
    "recompute": [f"model.{t}.activations_checkpoint_{k}={v}" for t in ("vision", "text")
                  for k, v in (("granularity", "full"), ("method", "uniform"), ("num_layers", 1))],
    "zero1": ["optim.name=distributed_fused_adam"],
}
VARIANTS["zero1-no-overlap"] = VARIANTS["zero1"] + ["optim.overlap_grad_sync=false"]
VARIANTS["recompute+zero1"] = VARIANTS["recompute"] + VARIANTS["zero1"]


def run(model: str, variant: str, steps: int, warmup: int, shards: str) -> dict:
    config, batch = MODELS[model]
    overrides = [f"trainer.global_batch_size={batch}", f"trainer.micro_batch_size={batch // 2}",
                 "data.shuffle_buffer=64", *VARIANTS[variant]]
    res = run_engine(config, 2, overrides, steps, warmup, shards)
    final = res["final"]
    from engine.config import load_config
    from engine.memory_estimate import estimate
    from engine.schema import BARE_KEYS
    from models.clip.config import CLIPExperimentConfig as ExperimentConfig

    cfg = load_config(ExperimentConfig, os.path.join(ROOT, config), overrides, BARE_KEYS)
    predicted = estimate(cfg, tp=1, pp=1, dp=2)
    return {"model": model, "variant": variant, "step_time_s": res["step_time_s"],
            "measured_mib": final["peak_rss_mib"] - final["rss_before_model_mib"],
            "predicted_mib": predicted["total_bytes"] / 2**20,
            "predicted_activation_mib": predicted["activation_bytes"] / 2**20,
            "predicted_optimizer_mib": predicted["optimizer_bytes"] / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,b32")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--shards", default=os.path.join(ROOT, "data_cache/bench_shapes"))
    args = parser.parse_args()
    from data.synthetic import generate_shapes_dataset

    generate_shapes_dataset(args.shards, num_train=4000, num_eval=100, image_size=64, samples_per_shard=500)
    rows = [run(m, v, args.steps, args.warmup, args.shards) for m in args.models.split(",") for v in VARIANTS]
    import torch

    lines = [f"CLIP fp32 on CPU ({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}), "
             f"DP=2 (2 ranks x 1 thread), {args.steps - args.warmup} timed steps; memory of rank 0",
             "", "| model | variant | step time (s) | measured peak (MiB) | predicted (MiB) | predicted activations "
             "(MiB) | predicted optimizer state (MiB) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['step_time_s']:.3f} | {r['measured_mib']:.0f} | "
                     f"{r['predicted_mib']:.0f} | {r['predicted_activation_mib']:.0f} | {r['predicted_optimizer_mib']:.0f} |")
    write_report(os.path.join(HERE, "results/memory_cpu"), "\n".join(lines), rows)


if __name__ == "__main__":
    main()
