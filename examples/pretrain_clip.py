"""Pre-train CLIP on the parallel engine.

    torchrun --nproc_per_node=2 examples/pretrain_clip.py --config configs/clip/tiny.yaml tensor_model_parallel_size=2
    torchrun --nproc_per_node=4 examples/pretrain_clip.py tensor_model_parallel_size=4
    srun python examples/pretrain_clip.py --config configs/clip/b32.yaml   # SLURM, one task per GPU

Any config key can be overridden as `section.key=value` (e.g. `trainer.max_steps=200`,
`model.vision.num_layers=6`); the parallel keys are also accepted bare. `--help` lists every key.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from engine.run import launch, run  # noqa: E402


def main(argv: list[str]) -> dict:
    return run("clip", argv)


if __name__ == "__main__":
    launch("clip", __doc__)
