"""Pre-train CLIP on the parallel engine.

    torchrun --nproc_per_node=2 examples/pretrain_clip.py --config configs/clip/tiny.yaml tensor_model_parallel_size=2
    torchrun --nproc_per_node=4 examples/pretrain_clip.py tensor_model_parallel_size=4
    srun python examples/pretrain_clip.py --config configs/clip/b32.yaml   # SLURM, one task per GPU

Any config key can be overridden as `section.key=value` (e.g. `trainer.max_steps=200`,
`model.vision.num_layers=6`); the parallel keys are also accepted bare. `--help` lists every key.
"""
from __future__ import annotations

import faulthandler
import json
import logging
import os
import sys
import warnings

# megatron-core warns at import about missing TE/Apex; the engine says once which backend runs.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from engine.config import ConfigError, load_config, schema_keys, split_config_arg, to_yaml  # noqa: E402
from engine.schema import BARE_KEYS, ExperimentConfig  # noqa: E402
from parallel.dims import ParallelLayoutError  # noqa: E402


def main(argv: list[str]) -> dict:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print("config keys:\n  " + "\n  ".join(schema_keys(ExperimentConfig)))
        return {}
    config_file, overrides = split_config_arg(argv)
    cfg = load_config(ExperimentConfig, config_file, overrides, BARE_KEYS)

    from engine.layout import validate_layout
    from parallel.context import destroy_parallel, initialize_parallel
    from parallel.launch import read_launch_env

    validate_layout(cfg, read_launch_env().world_size)  # before any collective can hang
    par = cfg.parallel
    ctx = initialize_parallel(par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.device,
                              seed=cfg.trainer.seed, timeout_minutes=par.distributed_timeout_minutes)
    if not ctx.is_logging_rank:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        from engine.recipes.clip import build_trainer, peak_rss_bytes

        if ctx.is_logging_rank:
            os.makedirs(cfg.trainer.output_dir, exist_ok=True)
            with open(os.path.join(cfg.trainer.output_dir, "config.yaml"), "w") as fh:
                fh.write(to_yaml(cfg))
        trainer, data_iter = build_trainer(cfg, ctx)
        final = trainer.fit(data_iter)
        if ctx.is_logging_rank:
            summary = {"step": trainer.state.step, "samples_seen": trainer.state.samples_seen,
                       "skipped_steps": trainer.state.total_skipped,
                       "rss_before_model_mib": trainer.rss_before_model / 2**20,
                       "peak_rss_mib": peak_rss_bytes() / 2**20, **final}
            logging.getLogger("engine").info("final: %s", json.dumps(summary))
            with open(os.path.join(cfg.trainer.output_dir, "final_metrics.json"), "w") as fh:
                json.dump(summary, fh, indent=2)
        return final
    finally:
        destroy_parallel()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("megatron.core.distributed.fsdp").setLevel(logging.WARNING)  # import-time chatter
    faulthandler.enable()  # a rank that dies in a collective shows its stack instead of a silent hang
    try:
        main(sys.argv[1:])
    except (ConfigError, ParallelLayoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
