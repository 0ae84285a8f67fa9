"""Predict memory per rank for a CLIP config and parallel layout, before launching it.

    python examples/estimate_memory.py --config configs/clip/l14.yaml --world-size 8 \
        tensor_model_parallel_size=2 trainer.precision=bf16 model.megatron_amp_O2=true \
        optim.name=distributed_fused_adam trainer.micro_batch_size=32

Prints parameters, gradients, optimizer state and activations per rank (formulas in
engine/memory_estimate.py), and the same for every NeMo size with --all-sizes. The config and the
layout go through the launcher's own checks first: what the launcher would refuse gets its
`error:` line (exit status 2) instead of an estimate. Data files are not checked.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.run import quiet_optional_extra_warnings  # noqa: E402

quiet_optional_extra_warnings()

from engine.config import ConfigError, load_config  # noqa: E402
from engine.family import get_family  # noqa: E402
from engine.layout import validate_layout  # noqa: E402
from engine.memory_estimate import estimate, format_report  # noqa: E402
from engine.schema import BARE_KEYS  # noqa: E402
from parallel.dims import ParallelLayoutError  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a configs/clip/<size>.yaml file")
    parser.add_argument("--world-size", type=int, default=1, help="number of ranks (GPUs)")
    parser.add_argument("--all-sizes", action="store_true", help="report every configs/clip/*.yaml")
    args, overrides = parser.parse_known_args(argv)
    if args.world_size < 1:
        parser.error(f"--world-size {args.world_size}: must be at least 1")
    family = get_family("clip")
    paths = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs/clip/*.yaml"))) \
        if args.all_sizes else [args.config]
    failed = 0
    for path in paths:
        name = os.path.basename(path) if path else "defaults"
        try:
            cfg = load_config(family.config_cls, path, overrides, BARE_KEYS, aliases=family.config_aliases)
            # The launcher's own checks: a layout it would refuse gets no estimate.
            dims = validate_layout(cfg, args.world_size, family,
                                   (["--config", path] if path else []) + list(overrides))
        except (ConfigError, ParallelLayoutError) as exc:
            failed += 1
            print(f"error: {name}: {exc}" if args.all_sizes else f"error: {exc}", file=sys.stderr)
            continue
        est = estimate(cfg, dims.tp, dims.pp, dims.dp)
        print(format_report(est, f"{name} {dims} {cfg.trainer.precision}"
                                 f"{' O2' if cfg.model.megatron_amp_O2 else ''} {cfg.optim.name}"
                                 f" micro-batch {cfg.trainer.micro_batch_size}"))
    if failed:
        sys.exit(2)


if __name__ == "__main__":
    main()
