r"""Answer questions about images with a VLM checkpoint of this engine (models/vlm/generate.py), at any TP.

    python examples/generate_vlm.py runs/vlm_tiny/checkpoints --image shape.png --question "what colour is the shape"
    python examples/generate_vlm.py runs/vlm_tiny/checkpoints --synthetic 8          # the synthetic eval questions
    torchrun --nproc_per_node=2 examples/generate_vlm.py ckpt/vlm --tensor-model-parallel-size 2 \
        --image a.jpg --question "<image> describe the image" --do-sample --top-p 0.9

The checkpoint is any engine VLM checkpoint (a checkpoint root means its latest), loaded at the TP
given here whatever layout saved it; the prompt template, image size and tokenizer are the ones
its config names. Each --image goes with the --question at the same place (a question without an
<image> marker gets its image right after the bos token, as in training). Each image is encoded
once; the answers come from the LLM's generation loop (KV cache unless --no-cache, greedy unless
--do-sample, left-padded batch, stop on the template's end-of-turn token). Rank 0 prints.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


class UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="generate_vlm.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("checkpoint", help="engine VLM checkpoint directory, or a checkpoint root (its latest)")
    p.add_argument("--image", action="append", default=[], help="an image file (repeat, one per --question)")
    p.add_argument("--question", action="append", default=[], help="a question (repeat for a batch)")
    p.add_argument("--synthetic", type=int, default=0, help="answer the first N synthetic eval questions instead")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--tensor-model-parallel-size", type=int, default=None, help="default: the world size")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", action="store_true")
    return p


def _prompts(args, cfg) -> list[dict]:
    from PIL import Image

    from data.vlm_synthetic import SyntheticVQA, image_tensor

    if args.synthetic:
        syn = cfg.data.synthetic
        ds = SyntheticVQA(args.synthetic, split="eval", image_size=syn.image_size, max_turns=1, seed=syn.seed,
                          image_token=cfg.data.template.image_token)
        out = []
        for i in range(args.synthetic):
            sample = ds[i]
            question, reference = sample["turns"][0]
            out.append({"images": sample["images"], "turns": [(question, None)], "reference": reference})
        return out
    if not args.question:
        raise UsageError("give --question (with --image) or --synthetic N")
    if args.image and len(args.image) != len(args.question):
        raise UsageError(f"{len(args.image)} --image for {len(args.question)} --question: give one image per question "
                         "(or none for text-only questions)")
    out = []
    for i, question in enumerate(args.question):
        images = []
        if args.image:
            with Image.open(args.image[i]) as img:
                images.append(image_tensor(img, cfg.model.vision.img_h))
        out.append({"images": images, "turns": [(question, None)]})
    return out


def generate_from_checkpoint(args) -> list[dict]:
    from engine.checkpoint import load_model_weights
    from engine.checkpoint.state import Placement
    from models.llm.family import load_tokenizer
    from models.vlm.family import _tokenizer_path
    from models.vlm.generate import answer
    from models.vlm.model import VLMModel
    from parallel.context import destroy_parallel, initialize_parallel
    from parallel.launch import read_launch_env

    from engine.checkpoint.tools import saved_experiment

    path, cfg = saved_experiment(args.checkpoint, "vlm")
    world = read_launch_env().world_size
    tp = args.tensor_model_parallel_size or world
    if world != tp:
        raise UsageError(f"--tensor-model-parallel-size {tp} with {world} processes: launch {tp} processes")
    tokenizer_path = _tokenizer_path(cfg)
    if not os.path.exists(tokenizer_path):
        raise UsageError(f"tokenizer {tokenizer_path} not found (the checkpoint's config names it)")
    tokenizer = load_tokenizer(cfg.data.tokenizer, tokenizer_path)
    prompts = _prompts(args, cfg)
    cfg.model.attention_backend, cfg.model.use_flash_attention = "sdpa", False  # the KV cache lives in sdpa
    ctx = initialize_parallel(tp, 1, args.device, seed=args.seed)
    try:
        model = VLMModel(cfg.model, use_cpu_initialization=ctx.device.type == "cpu").to(ctx.device)
        if cfg.model.lora.enabled:
            import dataclasses

            from models.common.lora import LoRAConfig, apply_lora

            lora = dataclasses.asdict(cfg.model.lora)
            lora.pop("enabled")
            apply_lora(model, LoRAConfig(**lora), include=["llm."])
        load_model_weights(path, model, Placement.from_ctx(ctx), group=None)
        answers = answer(model, prompts, tokenizer, cfg.data.template, max_new_tokens=args.max_new_tokens,
                         do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         use_cache=not args.no_cache, seed=args.seed)
        return [{"question": p["turns"][-1][0], "answer": a.text, "finished": a.finished,
                 **({"reference": p["reference"]} if "reference" in p else {})} for p, a in zip(prompts, answers)]
    finally:
        destroy_parallel()


def main(argv=None) -> int:
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed.*")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from engine.checkpoint.storage import CheckpointError

    try:
        results = generate_from_checkpoint(args)
    except (UsageError, CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"generate_vlm.py: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        for r in results:
            if args.json:
                print(json.dumps(r))
            else:
                ref = f"  (reference: {r['reference']})" if "reference" in r else ""
                print(f"{r['question']} -> {r['answer']}{ref}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
