"""Sample global vectors from a trained DiT and evaluate them beside the two baselines.

    python examples/sample_dit.py --checkpoint runs/dit_tiny/checkpoints                 # its eval set, its sampler
    python examples/sample_dit.py --checkpoint runs/dit_tiny/checkpoints --sampler heun --num-steps 25 \
        --guidance-scale 2.0 --seed 3 --out generated.safetensors
    torchrun --nproc_per_node=4 examples/sample_dit.py --checkpoint ... tensor_model_parallel_size=2   # batched over DP
    python examples/sample_dit.py --config configs/dit/tiny.yaml --untrained          # the model a run starts from

Prints cosine and recall@1/5 (against the target set and the caption embeddings) of the generated
vectors, of the target tower's own embedding and of a linear map from the mean-pooled conditioning
features, on the same samples. Generation is deterministic from --seed (sample i starts from the
noise of (seed, i)), whatever the layout. Trailing key=value arguments override the config
(data.eval_dir=..., eval.max_samples=..., parallel keys bare).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a DiT checkpoint (a step directory or a checkpoint root)")
    source.add_argument("--config", help="a DiT config (with --untrained)")
    parser.add_argument("--untrained", action="store_true", help="evaluate the freshly initialised model of --config")
    parser.add_argument("--sampler", choices=["euler", "heun"], default=None)
    parser.add_argument("--num-steps", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--out", help="write the generated vectors (and their sample indices) to this safetensors file")
    parser.add_argument("--metrics-out", help="write the metrics as JSON")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    if args.config and not args.untrained:
        parser.error("--config evaluates the untrained model: add --untrained (or give --checkpoint)")
    return args


def main(argv=None) -> dict:
    from engine.run import install_rank_filter
    from models.dit.data import TargetSpec
    from models.dit.embeddings import EmbeddingSet
    from models.dit.evaluation import DiTEvaluator
    from models.dit.flow import FlowPath
    from models.dit.inference import dit_config, load_dit
    from parallel.context import destroy_parallel, initialize_parallel
    from parallel.p2p import StageLink

    args = parse_args(sys.argv[1:] if argv is None else argv)
    overrides = list(args.overrides)
    for key, value in (("eval.sampler", args.sampler), ("eval.num_steps", args.num_steps),
                       ("eval.guidance_scale", args.guidance_scale), ("eval.seed", args.seed)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.no_baselines:
        overrides.append("eval.baselines=false")
    cfg = dit_config(args.checkpoint, args.config, overrides)
    if cfg.data.train_dir is None:  # the demo's data, when it has been prepared
        from models.dit.demo import ready

        record = ready(cfg.data.demo)
        if record is not None:
            cfg.data.train_dir, cfg.data.eval_dir = record["train_dir"], record["eval_dir"]
    if cfg.data.eval_dir is None:
        print("error: no evaluation set: give data.eval_dir=<extraction directory>", file=sys.stderr)
        sys.exit(2)
    par = cfg.parallel
    ctx = initialize_parallel(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.device,
                              seed=cfg.trainer.seed)
    install_rank_filter(ctx.rank)
    try:
        cfg, model = load_dit(ctx, args.checkpoint, cfg)
        ev = cfg.eval
        target = TargetSpec(cfg.data.target, cfg.data.normalize_target, cfg.data.target_scale)
        train = EmbeddingSet(cfg.data.train_dir) if ev.baselines and cfg.data.train_dir else None
        evaluator = DiTEvaluator(model, EmbeddingSet(cfg.data.eval_dir), target,
                                 path=FlowPath(cfg.model.flow.sigma_min, cfg.model.flow.sigma_max), sampler=ev.sampler,
                                 num_steps=ev.num_steps, guidance_scale=ev.guidance_scale, seed=ev.seed,
                                 batch_size=ev.batch_size, max_samples=ev.max_samples,
                                 baselines=ev.baselines and train is not None, train_set=train,
                                 baseline_fit_samples=ev.baseline_fit_samples, baseline_ridge=ev.baseline_ridge,
                                 dp_rank=ctx.dp_rank, dp_size=ctx.dims.dp, dp_group=ctx.dp_group,
                                 link=StageLink(ctx.device) if ctx.dims.pp > 1 else None, device=ctx.device)
        metrics = evaluator(0)
        if args.out:
            vectors = evaluator.generate_all()
            if ctx.rank == 0:
                import torch
                from safetensors.torch import save_file

                save_file({"generated": vectors.contiguous(), "index": torch.arange(vectors.shape[0])}, args.out,
                          metadata={"sampler": ev.sampler, "num_steps": str(ev.num_steps),
                                    "guidance_scale": str(ev.guidance_scale), "seed": str(ev.seed),
                                    "eval_dir": cfg.data.eval_dir})
        if ctx.rank == 0:
            print(json.dumps(metrics))
            if args.metrics_out:
                with open(args.metrics_out, "w") as fh:
                    json.dump(metrics, fh, indent=1)
        return metrics
    finally:
        destroy_parallel()


if __name__ == "__main__":
    from engine.run import quiet_optional_extra_warnings

    quiet_optional_extra_warnings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    main()
