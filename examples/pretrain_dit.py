"""Train the global DiT (flow matching from vision patch features to CLIP global embeddings) on the engine.

    python examples/pretrain_dit.py --config configs/dit/tiny.yaml        # the default run: no data needed
    torchrun --nproc_per_node=8 examples/pretrain_dit.py --config configs/dit/global_768.yaml \
        data.train_dir=emb/train data.eval_dir=emb/eval tensor_model_parallel_size=2 trainer.precision=fp16 \
        model.megatron_amp_O2=true optim.name=distributed_fused_adam
    srun python examples/pretrain_dit.py --config configs/dit/global_768.yaml ...   # SLURM, one task per GPU

`data.train_dir` / `data.eval_dir` are directories written by examples/extract_embeddings.py; without
them the run prepares the demo data first (models/dit/demo.py). Any config key can be overridden as
`section.key=value`; the parallel keys are also accepted bare. `--help` lists every key.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from engine.run import launch, run


def main(argv: list[str]) -> dict:
    return run("dit", argv)


if __name__ == "__main__":
    launch("dit", __doc__)
