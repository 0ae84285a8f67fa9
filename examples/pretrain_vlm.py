r"""Stage 1 of a LLaVA-style VLM: train the connector on captions, the vision tower and the LLM frozen.

    torchrun --nproc_per_node=2 examples/pretrain_vlm.py --config configs/vlm/tiny.yaml data.use_captions=true
                                    # CPU demo: captions of the synthetic set; the tiny LLM trains too (no pretrained one)
    torchrun --nproc_per_node=8 examples/pretrain_vlm.py --config configs/vlm/pretrain.yaml \
        model.init.vision=runs/clip_b16/checkpoints model.init.llm=/models/Llama-3.2-1B \
        data.train_data=/data/llava_pretrain/blip_laion_cc_sbu_558k.jsonl data.tokenizer.path=/models/Llama-3.2-1B

Without data.train_data the engine uses the synthetic shapes VQA set (data/vlm_synthetic.py) and
reports answer accuracy per question type. Any config key can be overridden as `section.key=value`.
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
