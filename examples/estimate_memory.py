"""Predict memory per rank for a CLIP config and parallel layout, before launching it.

    python examples/estimate_memory.py --config configs/clip/l14.yaml --world-size 8 \
        tensor_model_parallel_size=2 trainer.precision=bf16 model.megatron_amp_O2=true \
        optim.name=distributed_fused_adam trainer.micro_batch_size=32

Prints parameters, gradients, optimizer state and activations per rank (formulas in
engine/memory_estimate.py), and the same for every NeMo size with --all-sizes.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.config import load_config  # noqa: E402
from engine.memory_estimate import estimate, format_report  # noqa: E402
from engine.schema import BARE_KEYS  # noqa: E402
from models.clip.config import CLIPExperimentConfig as ExperimentConfig  # noqa: E402
from parallel.dims import ParallelDims  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a configs/clip/<size>.yaml file")
    parser.add_argument("--world-size", type=int, default=1, help="number of ranks (GPUs)")
    parser.add_argument("--all-sizes", action="store_true", help="report every configs/clip/*.yaml")
    args, overrides = parser.parse_known_args(argv)
    paths = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs/clip/*.yaml"))) \
        if args.all_sizes else [args.config]
    for path in paths:
        cfg = load_config(ExperimentConfig, path, overrides, BARE_KEYS)
        dims = ParallelDims(cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size,
                            args.world_size)
        est = estimate(cfg, dims.tp, dims.pp, dims.dp)
        print(format_report(est, f"{os.path.basename(path)} {dims} {cfg.trainer.precision}"
                                 f"{' O2' if cfg.model.megatron_amp_O2 else ''} {cfg.optim.name}"
                                 f" micro-batch {cfg.trainer.micro_batch_size}"))


if __name__ == "__main__":
    main()
