"""Evaluate a CLIP model: zero-shot classification, image<->text recall@1/5/10 and linear-probe accuracy.

    python examples/eval_clip.py --checkpoint runs/clip_tiny/checkpoints
    torchrun --nproc_per_node=2 examples/eval_clip.py --checkpoint runs/clip_tiny/checkpoints tensor_model_parallel_size=2
    torchrun --nproc_per_node=2 examples/eval_clip.py --checkpoint CKPT pipeline_model_parallel_size=2
    python examples/eval_clip.py --checkpoint BASE_CKPT --adapters adapters.safetensors model.finetune.scenario=lora_dual
    python examples/eval_clip.py --open-clip b32.safetensors --model-name ViT-B-32 \\
        data.eval_shards='/data/eval/{000..009}.tar' data.classes_file=classes.json \\
        data.tokenizer.type=clip_bpe data.tokenizer.path=bpe_simple_vocab_16e6.txt.gz
    python examples/eval_clip.py --hf-clip hf/clip-vit-base-patch32 --image-folder imagenette/val ...

Weights: an engine checkpoint (a step directory or a checkpoint root; saved at any TP/PP, loaded at
the layout launched here), optionally with LoRA adapters alone; or open_clip / Hugging Face
weights through the converters. The data, tokenizer and layout are the checkpoint's config (or
the defaults for foreign weights) with `section.key=value` overrides: the synthetic shapes eval
set when there are no shards; `data.eval_shards` (WebDataset, a json `class_index` per sample for
zero-shot and the probe) with `data.classes_file` ({"classnames", "templates"}); or --image-folder
(ROOT/<class>/<image>, the sorted sub-folders are the classes, templates from data.classes_file
if given). The linear probe (logistic regression on frozen image features) fits on
--probe-train-shards, or on the even-numbered evaluation samples and tests on the odd ones.

Prints a table on rank 0 and writes JSON (--out, default <trainer.output_dir>/eval_metrics.json).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="engine checkpoint (step directory or checkpoint root)")
    source.add_argument("--open-clip", help="open_clip state dict file or local-dir directory")
    source.add_argument("--hf-clip", help="Hugging Face CLIPModel directory")
    parser.add_argument("--model-name", help="open_clip model name or config JSON (with --open-clip)")
    parser.add_argument("--adapters", help="LoRA adapters file (finetune_clip.py export-adapters) on --checkpoint's base")
    parser.add_argument("--image-folder", help="evaluate on ROOT/<class>/<image> instead of shards")
    parser.add_argument("--probe-train-shards", help="labelled shards the linear probe is fit on")
    parser.add_argument("--no-linear-probe", action="store_true")
    parser.add_argument("--out", help="JSON file to write (default <trainer.output_dir>/eval_metrics.json)")
    parser.add_argument("overrides", nargs="*", help="section.key=value (parallel, data, eval, trainer keys)")
    return parser


def experiment_from_checkpoint(path: str, overrides: list[str]):
    """The checkpoint's experiment config with `overrides` applied (checked like a training run's)."""
    from engine.checkpoint.reader import CheckpointReader
    from engine.config import load_config
    from engine.schema import BARE_KEYS
    from models.clip.config import CLIPExperimentConfig

    reader = CheckpointReader(path, verify=False)
    if reader.meta.get("family", "clip") != "clip":
        from engine.config import ConfigError

        raise ConfigError(f"{path} is a {reader.meta['family']} checkpoint, not a CLIP one")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        fh.write(reader.meta["config_yaml"])
    try:
        return load_config(CLIPExperimentConfig, fh.name, overrides, BARE_KEYS), reader.path
    finally:
        os.remove(fh.name)


def experiment_for_foreign(model_cfg, overrides: list[str]):
    from engine.config import load_config
    from engine.schema import BARE_KEYS
    from models.clip.config import CLIPExperimentConfig

    exp = load_config(CLIPExperimentConfig, None, overrides, BARE_KEYS)
    exp.model = model_cfg
    if model_cfg.text.vocab_size == 49408 and not any(o.startswith("data.tokenizer.type") for o in overrides):
        exp.data.tokenizer.type = "clip_bpe"  # CLIP's BPE for the 49408-token vocabulary
    return exp


def main(argv=None) -> dict:
    from models.clip.evaluate import EvalOptions, Weights, evaluate

    args = build_parser().parse_args(argv)
    if args.checkpoint:
        exp, path = experiment_from_checkpoint(args.checkpoint, args.overrides)
        weights = Weights("engine", path=path, adapters=args.adapters, label=path)
    elif args.open_clip:
        from conversion.openclip_format import import_openclip, openclip_config_from_state_dict, openclip_model_config, read_openclip

        state, dir_cfg, _ = read_openclip(args.open_clip)
        model_cfg = (openclip_model_config(args.model_name) if args.model_name else
                     dir_cfg if dir_cfg is not None else openclip_config_from_state_dict(state))
        clip_cfg, full = import_openclip(state, model_cfg)
        exp = experiment_for_foreign(clip_cfg, args.overrides)
        weights = Weights("full", full_state=full, label=args.open_clip)
    else:
        from conversion.hf_clip_format import import_hf_clip

        clip_cfg, full = import_hf_clip(args.hf_clip)
        exp = experiment_for_foreign(clip_cfg, args.overrides)
        weights = Weights("full", full_state=full, label=args.hf_clip)
    options = EvalOptions(image_folder=args.image_folder, probe_train_shards=args.probe_train_shards,
                          linear_probe=not args.no_linear_probe,
                          out_json=args.out or os.path.join(exp.trainer.output_dir, "eval_metrics.json"),
                          extra={"adapters": args.adapters} if args.adapters else {})
    return evaluate(exp, weights, options)


if __name__ == "__main__":
    from engine.config import ConfigError
    from engine.run import install_rank_filter, quiet_optional_extra_warnings
    from parallel.dims import ParallelLayoutError
    from parallel.launch import read_launch_env

    quiet_optional_extra_warnings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron.core.distributed.fsdp").setLevel(logging.WARNING)  # import-time chatter
    install_rank_filter(read_launch_env().rank)
    try:
        main()
    except (ConfigError, ParallelLayoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
