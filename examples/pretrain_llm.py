"""Pre-train a Llama-architecture LLM on the parallel engine.

    torchrun --nproc_per_node=2 examples/pretrain_llm.py --config configs/llm/tiny.yaml        # synthetic corpus demo
    torchrun --nproc_per_node=8 examples/pretrain_llm.py --config configs/llm/llama3.2-1b.yaml \
        tensor_model_parallel_size=2 data.train_shards='/data/text/{00000..01023}.tar' \
        data.eval_shards=/data/text/val.jsonl data.tokenizer.path=/models/Llama-3.2-1B/tokenizer.json
    srun python examples/pretrain_llm.py --config configs/llm/llama3-8b.yaml ...                # SLURM, one task per GPU

Without data.train_shards the engine writes a synthetic Markov corpus with a known entropy rate and
reports the validation loss beside its floor. Any config key can be overridden as
`section.key=value`; the parallel keys are also accepted bare. `--help` lists every key.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from engine.run import launch, run  # noqa: E402


def main(argv: list[str]) -> dict:
    return run("llm", argv)


if __name__ == "__main__":
    launch("llm", __doc__)
