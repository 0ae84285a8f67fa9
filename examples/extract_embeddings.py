"""Extract conditioning and target embeddings over WebDataset images for the global DiT.

    python examples/extract_embeddings.py --shards 'data/{00000..00099}.tar' --out emb/train \
        --condition-tower open_clip:eva_clip_8b.safetensors --condition-model-name EVA02-CLIP-bigE-14 \
        --target-tower hf:hf/clip-vit-large-patch14 --target-tokenizer clip_bpe:bpe_simple_vocab_16e6.txt.gz
    torchrun --nproc_per_node=8 examples/extract_embeddings.py ... --tensor-model-parallel-size 2   # 4 DP replicas
    sbatch examples/slurm/extract_embeddings.sbatch --shards ... --out ...                          # SLURM
    python examples/extract_embeddings.py --verify emb/train                                        # check a directory

Towers (`--condition-tower`, `--target-tower`): checkpoint:PATH (an engine CLIP checkpoint),
open_clip:FILE, hf:DIR, or random:CONFIG.yaml (a randomly initialised tower of a CLIP config; with
--*-override key=value and --*-seed). `--*-layer k` takes the hidden states after layer k (-1: the
tower's output tokens after its final norm). Each chunk holds the conditioning patch features, the
target patch features, the target's own image embedding, the caption embeddings (when the target
has a text tower and a tokenizer) and the captions. Rerunning the same command resumes: finished
chunks are kept, partial or corrupt ones are extracted again (and named in the log).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def _tower_args(parser, name: str, what: str) -> None:
    parser.add_argument(f"--{name}-tower", help=f"the {what} tower: checkpoint:PATH | open_clip:FILE | hf:DIR | "
                                                "random:CONFIG.yaml")
    parser.add_argument(f"--{name}-layer", type=int, default=-1, help="features after this layer (-1: the output)")
    parser.add_argument(f"--{name}-model-name", default=None, help="open_clip architecture name when the file has none")
    parser.add_argument(f"--{name}-override", action="append", default=[], metavar="KEY=VALUE",
                        help="random towers: CLIP config overrides (repeatable)")
    parser.add_argument(f"--{name}-seed", type=int, default=0, help="random towers: initialisation seed")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", help="WebDataset shards: brace pattern, glob or directory")
    parser.add_argument("--out", help="output directory (resumed when it exists)")
    _tower_args(parser, "condition", "conditioning")
    _tower_args(parser, "target", "target CLIP")
    parser.add_argument("--target-tokenizer", default=None,
                        help="KIND:PATH of the target's text tokenizer (sentencepiece:... | clip_bpe:...); engine "
                             "checkpoints find their own")
    parser.add_argument("--no-text", action="store_true", help="do not compute caption embeddings")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples-per-chunk", type=int, default=1000)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                        help="storage dtype of the patch features (embeddings are float32)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--verify", metavar="DIR", help="check an extraction directory (sizes and sha256) and exit")
    args = parser.parse_args(argv)
    if not args.verify and not (args.shards and args.out and args.condition_tower and args.target_tower):
        parser.error("--shards, --out, --condition-tower and --target-tower are required (or --verify DIR)")
    return args


def main(argv=None) -> dict | None:
    from data.pipeline import expand_shards
    from models.dit.embeddings import EmbeddingDataError, verify_directory
    from models.dit.extraction import extract, summarize
    from models.dit.towers import TowerSpec
    from parallel.context import destroy_parallel, initialize_parallel

    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.verify:
        problems = verify_directory(args.verify)
        print("\n".join(problems) if problems else f"{args.verify}: complete, every chunk passes its sha256 check")
        if problems:
            sys.exit(1)
        return None
    condition = TowerSpec(args.condition_tower, args.condition_layer, args.condition_model_name, args.condition_override,
                          args.condition_seed)
    target = TowerSpec(args.target_tower, args.target_layer, args.target_model_name, args.target_override,
                       args.target_seed, args.target_tokenizer)
    try:
        for spec in (condition, target):
            spec.kind  # noqa: B018 - validates the source string before any process group exists
        shards = expand_shards(args.shards)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    ctx = initialize_parallel(args.tensor_model_parallel_size, 1, args.device)
    logging_rank = ctx.is_logging_rank
    try:
        manifest = extract(args.out, shards, condition, target, device=ctx.device, dp_rank=ctx.dp_rank,
                           dp_size=ctx.dims.dp, tp_rank=ctx.tp_rank, rank=ctx.rank, batch_size=args.batch_size,
                           samples_per_chunk=args.samples_per_chunk, dtype=args.dtype, text=not args.no_text)
    except EmbeddingDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        destroy_parallel()
    if logging_rank:
        print(summarize(manifest))
    return manifest


if __name__ == "__main__":
    from engine.run import install_rank_filter, quiet_optional_extra_warnings

    quiet_optional_extra_warnings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    install_rank_filter(int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))))
    main()
