"""Generate text with an LLM checkpoint of this engine (models/llm/generate.py), at any TP.

    python examples/generate_llm.py runs/llm_tiny/checkpoints --prompt "bada furu" --max-new-tokens 40
    torchrun --nproc_per_node=2 examples/generate_llm.py ckpt/llama32_1b --tensor-model-parallel-size 2 \
        --tokenizer /models/Llama-3.2-1B/tokenizer.json --prompt "The capital of France is" --do-sample --top-p 0.9

The checkpoint is any engine LLM checkpoint (a training run's, an import's; a checkpoint root means
its latest), loaded at the TP given here whatever layout saved it. The tokenizer is the one the
checkpoint's config names (the synthetic corpus's for the demo) unless --tokenizer says otherwise.
Prompts are left-padded into one batch; greedy unless --do-sample. Every rank runs the same loop
(logits are gathered over TP); rank 0 prints. Pipeline parallelism is refused: generation runs the
whole model on one stage. Every failure is `error: ...` with exit status 2.
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
    p = argparse.ArgumentParser(prog="generate_llm.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("checkpoint", help="engine LLM checkpoint directory, or a checkpoint root (its latest)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0: off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same on every TP rank)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step (no KV cache)")
    p.add_argument("--tokenizer", help="a tokenizer.json (or its directory) or a SentencePiece .model; default: "
                                       "the one the checkpoint's config names")
    p.add_argument("--tensor-model-parallel-size", type=int, default=None, help="default: the world size")
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="must be 1 (refused otherwise)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt (prompt, text, token ids)")
    return p


def _tokenizer(cfg, override: str | None):
    from models.llm.family import load_tokenizer

    tok_cfg = cfg.data.tokenizer
    path = override
    if path is None:
        path = tok_cfg.path if cfg.data.train_shards is not None else os.path.join(cfg.data.synthetic.out_dir,
                                                                                   "tokenizer.json")
    if path is None or not os.path.exists(path):
        raise UsageError(f"tokenizer {path} not found (the checkpoint's config names it); give --tokenizer")
    if override is not None:  # its kind from the file, not from the checkpoint's config
        tok_cfg.type = "sentencepiece" if path.endswith(".model") else "huggingface"
    try:
        return load_tokenizer(tok_cfg, path)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from exc


def generate_from_checkpoint(args) -> list[dict]:
    """Collective over the launched ranks: load, generate, decode. Returns one dict per prompt."""
    from engine.checkpoint import load_model_weights
    from engine.checkpoint.state import Placement
    from models.llm.generate import PIPELINE_REFUSED, generate
    from models.llm.model import LLMModel
    from parallel.context import destroy_parallel, initialize_parallel
    from parallel.launch import read_launch_env

    if args.pipeline_model_parallel_size != 1:
        raise UsageError(PIPELINE_REFUSED)
    from engine.checkpoint.tools import saved_experiment

    path, cfg = saved_experiment(args.checkpoint, "llm")
    world = read_launch_env().world_size
    tp = args.tensor_model_parallel_size or world
    if tp < 1 or world != tp:
        raise UsageError(f"--tensor-model-parallel-size {tp} with {world} processes: generation runs one model "
                         f"replica; launch {tp} processes (torchrun --nproc_per_node={tp})")
    from models.llm.config import llm_layout_problems

    problems = llm_layout_problems(cfg.model, tp, 1)
    if problems:
        raise UsageError("; ".join(problems))
    tokenizer = _tokenizer(cfg, args.tokenizer)
    prompts = [([tokenizer.sot_id] if cfg.data.add_bos else []) + tokenizer.encode(text) for text in args.prompt]
    if any(not p for p in prompts):
        raise UsageError("every prompt needs at least one token")
    # Generation runs in the sdpa core attention (the KV cache lives there); the weights are the same.
    cfg.model.attention_backend, cfg.model.use_flash_attention = "sdpa", False
    ctx = initialize_parallel(tp, 1, args.device, seed=args.seed)
    try:
        model = LLMModel(cfg.model, use_cpu_initialization=ctx.device.type == "cpu").to(ctx.device)
        load_model_weights(path, model, Placement.from_ctx(ctx), group=None)
        out = generate(model, prompts, max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eot_id,
                       pad_token_id=tokenizer.pad_id, do_sample=args.do_sample, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, use_cache=not args.no_cache, seed=args.seed)
        results = []
        for text, ids, finished in zip(args.prompt, out.tokens.tolist(), out.finished.tolist()):
            if finished:  # up to and including the end-of-sequence token
                ids = ids[: ids.index(tokenizer.eot_id) + 1]
            results.append({"prompt": text, "text": tokenizer.decode(ids), "token_ids": ids,
                            "finished": bool(finished)})
        return results
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
    except (UsageError, CheckpointError, ValueError) as exc:
        print(f"generate_llm.py: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        for r in results:
            print(json.dumps(r) if args.json else f"{r['prompt']} -> {r['text']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
