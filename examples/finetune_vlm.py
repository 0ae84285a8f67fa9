r"""Stage 2 of a LLaVA-style VLM: instruction tuning of the connector and the LLM (full, or LoRA
adapters on the LLM with configs/vlm/instruct_lora.yaml), from a stage-1 checkpoint.

    torchrun --nproc_per_node=2 examples/finetune_vlm.py --config configs/vlm/tiny.yaml     # CPU demo, synthetic VQA
    torchrun --nproc_per_node=8 examples/finetune_vlm.py --config configs/vlm/instruct_lora.yaml \
        checkpoint.init_from=runs/vlm_pretrain/checkpoints data.train_data=/data/llava_v1_5_mix665k.jsonl \
        data.image_folder=/data/images data.tokenizer.path=/models/Llama-3.2-1B tensor_model_parallel_size=2

Any config key can be overridden as `section.key=value`; `--help` lists every key.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from engine.run import launch, run


def main(argv: list[str]) -> dict:
    return run("vlm", argv)


if __name__ == "__main__":
    launch("vlm", __doc__)
