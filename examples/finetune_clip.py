"""Fine-tune a pre-trained CLIP: zero_shot, linear_probe, lora_dual (default), lora_vision, lora_text, full.

    torchrun --nproc_per_node=2 examples/finetune_clip.py --config configs/clip/finetune/lora_dual.yaml \\
        checkpoint.init_from=runs/clip_tiny/checkpoints tensor_model_parallel_size=2
    python examples/finetune_clip.py --config configs/clip/finetune/zero_shot.yaml checkpoint.init_from=CKPT
    python examples/finetune_clip.py export-adapters runs/clip_ft_lora_dual/checkpoints --out adapters.safetensors
    python examples/finetune_clip.py export-merged runs/clip_ft_lora_dual/checkpoints --out ckpt/merged

Without --config it runs configs/clip/finetune/lora_dual.yaml. The scenario is
`model.finetune.scenario`; `checkpoint.init_from` names the pre-trained engine checkpoint (any
TP/PP layout; base weights load into the LoRA model through the key map, the adapters start with
B = 0). The log says how many parameters train and what share. zero_shot trains nothing: it
evaluates the base checkpoint (as examples/eval_clip.py does) and writes final_metrics.json.

The seed's options are config keys: gradient accumulation (trainer.global_batch_size /
micro_batch_size x DP), clipping (trainer.gradient_clip_val=1.0), early stopping
(eval.early_stopping.monitor=val_loss, patience 2, min_delta 0.001), OneCycle or cosine
(optim.sched.name), augmentation (data.augmentation=simple|advanced), the micro-batch finder
(batch_finder.enabled, batch_finder.memory_budget_gb on CPU), 8-bit Adam (optim.name=adamw_8bit,
GPU with bitsandbytes only).

Exports (one process, CPU): `export-adapters` writes the LoRA adapters alone (TP=1 tensors,
safetensors, with the LoRA settings in its metadata; `model.finetune.adapters=FILE` or
`eval_clip.py --adapters` reads them back onto the base checkpoint); `export-merged` folds them
into the base weights and writes a plain model-only engine checkpoint (no adapters), which
examples/convert_checkpoint.py exports to open_clip or Hugging Face.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "clip",
                              "finetune", "lora_dual.yaml")


def export_adapters(checkpoint: str, out: str) -> str:
    """The LoRA adapters of a fine-tuning checkpoint alone, as TP=1 tensors."""
    from conversion.files import save_tensor_file
    from engine.checkpoint.tools import read_model_checkpoint
    from engine.config import ConfigError
    from models.common.lora import is_lora_key

    cfg, full = read_model_checkpoint(checkpoint)
    adapters = {k: v for k, v in full.items() if is_lora_key(k) and v is not None}
    if not adapters:
        raise ConfigError(f"{checkpoint} holds no LoRA adapters (model.finetune.scenario="
                          f"{cfg.model.finetune.scenario})")
    lora = cfg.model.finetune.lora
    meta = {"format": "clip-lora-adapters", "scenario": cfg.model.finetune.scenario,
            "lora": json.dumps({"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
                                "target_modules": list(lora.target_modules)})}
    save_tensor_file(adapters, out, metadata=meta)
    print(f"wrote {out}: {len(adapters)} adapter tensors, "
          f"{sum(t.numel() for t in adapters.values()):,} parameters ({cfg.model.finetune.scenario}, rank {lora.rank})")
    return out


def merged_full_state(cfg, full: dict) -> dict:
    """The TP=1 state dict with every adapter folded into its base weight (base keys only)."""
    import torch

    from engine.checkpoint.tools import single_process_parallel_state
    from models.clip.family import reference_model
    from models.common.lora import merged_state_dict

    with single_process_parallel_state():
        model = reference_model(cfg.model)
        model.load_state_dict({k: v for k, v in full.items()})
        merged = merged_state_dict(model)
    return {k: v for k, v in merged.items() if torch.is_tensor(v)}


def export_merged(checkpoint: str, out: str) -> str:
    from engine.checkpoint.tools import read_model_checkpoint, write_model_checkpoint

    cfg, full = read_model_checkpoint(checkpoint)
    merged = merged_full_state(cfg, full)
    plain = copy.deepcopy(cfg)
    plain.model.finetune.scenario = None  # a plain model: the adapters are in the weights
    plain.model.finetune.adapters = None
    path = write_model_checkpoint(out, plain, merged)
    print(f"wrote {path}: {len(merged)} tensors, LoRA adapters of {cfg.model.finetune.scenario} folded into the weights")
    return path


def zero_shot(argv: list[str]) -> dict:
    """The zero_shot scenario: evaluate checkpoint.init_from with this config's data and layout."""
    from engine.checkpoint.reader import CheckpointReader
    from engine.checkpoint.tools import checkpoint_family, config_from_yaml
    from engine.config import ConfigError
    from engine.run import load_experiment
    from models.clip.evaluate import EvalOptions, Weights, evaluate

    cfg = load_experiment("clip", argv)
    if not cfg.checkpoint.init_from:
        raise ConfigError("model.finetune.scenario=zero_shot evaluates checkpoint.init_from: name the pre-trained "
                          "checkpoint")
    reader = CheckpointReader(cfg.checkpoint.init_from, verify=False)
    cfg.model = config_from_yaml(reader.meta["config_yaml"], checkpoint_family(reader.meta)).model
    out = cfg.trainer.output_dir
    metrics = evaluate(cfg, Weights("engine", path=reader.path, label=f"zero_shot {reader.path}"),
                       EvalOptions(out_json=os.path.join(out, "eval_metrics.json"), extra={"scenario": "zero_shot"}))
    from parallel.launch import read_launch_env

    if read_launch_env().rank == 0:
        with open(os.path.join(out, "final_metrics.json"), "w") as fh:
            json.dump({"scenario": "zero_shot", "step": 0, "trainable_parameters": 0, **metrics}, fh, indent=2)
    return metrics


def main(argv: list[str]) -> dict:
    """Train (or, for zero_shot, evaluate) with `argv` = [--config FILE] key=value ..."""
    from engine.run import load_experiment, run

    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        argv = ["--config", DEFAULT_CONFIG] + list(argv)
    cfg = load_experiment("clip", argv)
    if cfg.model.finetune.scenario is None:
        from engine.config import ConfigError

        raise ConfigError("examples/finetune_clip.py needs model.finetune.scenario (zero_shot, linear_probe, "
                          "lora_dual, lora_vision, lora_text or full); pre-training is examples/pretrain_clip.py")
    if cfg.model.finetune.scenario == "zero_shot":
        return zero_shot(argv)
    return run("clip", argv)


def _exports(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="finetune_clip.py")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("export-adapters", "LoRA adapters alone (safetensors)"),
                            ("export-merged", "adapters folded into the base weights (engine checkpoint)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("checkpoint", help="engine checkpoint of a fine-tuning run (step directory or root)")
        p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    (export_adapters if args.command == "export-adapters" else export_merged)(args.checkpoint, args.out)
    return 0


if __name__ == "__main__":
    from engine.checkpoint.storage import CheckpointError
    from engine.config import ConfigError
    from engine.run import install_rank_filter, launch, quiet_optional_extra_warnings
    from parallel.dims import ParallelLayoutError
    from parallel.launch import read_launch_env

    args = sys.argv[1:]
    if args and args[0] in ("export-adapters", "export-merged"):
        quiet_optional_extra_warnings()
        try:
            sys.exit(_exports(args))
        except (ConfigError, CheckpointError, FileExistsError) as exc:
            print(f"finetune_clip.py {args[0]}: error: {exc}", file=sys.stderr)
            sys.exit(2)
    if any(a in ("-h", "--help") for a in args):
        launch("clip", __doc__, args)
        sys.exit(0)
    quiet_optional_extra_warnings()
    import faulthandler

    faulthandler.enable()  # a rank that dies in a collective shows its stack
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron.core.distributed.fsdp").setLevel(logging.WARNING)
    install_rank_filter(read_launch_env().rank)
    try:
        main(args)
    except (ConfigError, ParallelLayoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
