"""Convert CLIP checkpoints between open_clip, Hugging Face and this engine's format; inspect; reshard.

    python examples/convert_checkpoint.py --help
    python examples/convert_checkpoint.py import-open-clip b32.safetensors --model-name ViT-B-32 --out ckpt/b32
    python examples/convert_checkpoint.py export-open-clip ckpt/b32 --out b32_open_clip/      # open_clip local-dir
    python examples/convert_checkpoint.py import-hf-clip hf/clip-vit-base-patch32 --out ckpt/b32
    python examples/convert_checkpoint.py export-hf-clip ckpt/b32 --out hf_b32/
    python examples/convert_checkpoint.py reshard ckpt/b32 ckpt/b32_tp2 --tensor-model-parallel-size 2
    python examples/convert_checkpoint.py inspect ckpt/b32

Conversion runs on one process on CPU: the engine checkpoint stores the full (TP=1) weights and
`reshard` cuts them for any TP/PP; training loads them at its own TP through the same code.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = {"keep": None, "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _torch_dtype(name: str):
    import torch

    return None if DTYPES[name] is None else getattr(torch, DTYPES[name])


def _cast(state: dict, dtype) -> dict:
    import torch

    if dtype is None:
        return state
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in state.items()}


def experiment_config(model_cfg, config_file: str | None = None, overrides=()):
    """An ExperimentConfig whose model section is `model_cfg` (derived from the source weights).

    Other sections come from `config_file` / `section.key=value` overrides; `model.*` overrides are
    applied on top and may not change any weight shape.
    """
    from omegaconf import OmegaConf

    from conversion.clip_layout import expected_clip_shapes
    from engine.config import ConfigError, _dotlist_value, load_config, parse_overrides
    from engine.schema import BARE_KEYS
    from models.clip.config import CLIPExperimentConfig as ExperimentConfig

    model_overrides = [o for o in overrides if o.split("=", 1)[0].startswith("model.")]
    other = [o for o in overrides if o not in model_overrides]
    exp = load_config(ExperimentConfig, config_file, other, bare_keys=BARE_KEYS)
    exp.model = model_cfg
    if model_overrides:
        load_config(ExperimentConfig, None, model_overrides)  # unknown keys and bad values stop here
        parsed = parse_overrides(model_overrides, {})
        merged = OmegaConf.merge(OmegaConf.structured(exp),
                                 OmegaConf.from_dotlist([f"{k}={_dotlist_value(v)}" for k, v in parsed.items()]))
        exp = OmegaConf.to_object(merged)
        if expected_clip_shapes(exp.model) != expected_clip_shapes(model_cfg):
            raise ConfigError(f"{' '.join(model_overrides)}: these overrides change the model's weight shapes; the "
                              "model section comes from the source checkpoint")
    return exp


class UsageError(ValueError):
    """A command that cannot work as given, found before anything is written."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _check_layout(cfg, args) -> None:
    """Every reason the model cannot be written at the requested TP/PP, at once, before anything is."""
    from conversion.clip_layout import sharding_problems

    problems = sharding_problems(cfg, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                 args.pad_ffn_to_multiple)
    if problems:
        raise UsageError(f"cannot write this model at --tensor-model-parallel-size {args.tensor_model_parallel_size} "
                         f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size}"
                         + (f" --pad-ffn-to-multiple {args.pad_ffn_to_multiple}" if args.pad_ffn_to_multiple > 1
                            else "") + " (nothing was written):\n  " + "\n  ".join(problems))


def _check_new_engine_output(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UsageError(f"{out} exists; choose a new directory for the engine checkpoint (nothing was written)")


def _engine_checkpoint_around(path: str) -> str | None:
    """The engine checkpoint directory (or checkpoint root: `latest`, `step_*`, the run lock) that is
    `path` or contains it, if any."""
    from engine.checkpoint.lock import LOCK_FILE
    from engine.checkpoint.storage import FORMAT, LATEST, MARKER_FILE, META_FILE, STEP_PREFIX, read_json

    here = os.path.abspath(path)
    while True:
        if os.path.isdir(here):
            names = set(os.listdir(here))
            if names & {MARKER_FILE, LATEST, LOCK_FILE} or any(
                    n.startswith(STEP_PREFIX) and os.path.isfile(os.path.join(here, n, MARKER_FILE)) for n in names):
                return here
            if META_FILE in names and _is_engine_meta(os.path.join(here, META_FILE), FORMAT, read_json):
                return here
        parent = os.path.dirname(here)
        if parent == here:
            return None
        here = parent


def _is_engine_meta(path: str, engine_format: str, read_json) -> bool:
    try:
        return read_json(path, "checkpoint description").get("format") == engine_format
    except Exception:  # noqa: BLE001 - someone else's unreadable meta.json is not an engine checkpoint
        return False


def _check_export_target(out: str, overwrite: bool, files: list[str], directory: bool) -> None:
    """Never into an engine checkpoint; an existing target only with --overwrite. `files`: the paths
    this export writes; `directory`: whether `out` is a directory."""
    engine = _engine_checkpoint_around(out)
    if engine is not None:
        where = "is" if os.path.abspath(out) == engine else f"lies inside {engine}, which is"
        raise UsageError(f"--out {out} {where} an engine checkpoint directory; exports are never written into one "
                         "(it would then look like a foreign checkpoint): choose a directory outside it")
    if directory and os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} exists and is not a directory")
    if not directory and os.path.isdir(out):
        raise UsageError(f"--out {out} is a directory; give a file name (.safetensors, .pt, .pth, .bin) or a "
                         "directory name without such a suffix")
    existing = [f for f in files if os.path.exists(f)]
    if directory and os.path.isdir(out) and os.listdir(out):
        existing = existing or [out]
    if existing and not overwrite:
        raise UsageError(f"{', '.join(existing)} exist{'s' if len(existing) == 1 else ''}; add --overwrite to replace "
                         f"what this export writes ({', '.join(os.path.basename(f) for f in files)}), or choose "
                         "another --out (nothing was written)")


def _default_tokenizer(exp, args) -> None:
    """CLIP's BPE for the 49408-token vocabulary, unless a config file or override chose one."""
    chosen = args.config is not None or any(o.startswith("data.tokenizer.") for o in args.overrides)
    if exp.model.text.vocab_size == 49408 and not chosen:
        exp.data.tokenizer.type = "clip_bpe"


def _write_engine_checkpoint(out: str, exp, state: dict, tp: int, pp: int, dtype) -> None:
    from engine.checkpoint.tools import reshard_checkpoint, write_model_checkpoint

    if tp == 1 and pp == 1:
        write_model_checkpoint(out, exp, state)
        return
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    try:
        write_model_checkpoint(staging, exp, state)
        reshard_checkpoint(staging, out, tp, pp, dtype)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _print_model(exp, out: str) -> None:
    from conversion.clip_layout import output_dims

    m = exp.model
    v_out, _ = output_dims(m)
    print(f"wrote {out}: vision {m.vision.num_layers}x{m.vision.hidden_size} (heads {m.vision.num_attention_heads}, "
          f"ffn {m.vision.ffn_hidden_size}, patch {m.vision.patch_dim}, {m.vision.img_h}x{m.vision.img_w}), "
          f"text {m.text.num_layers}x{m.text.hidden_size} (heads {m.text.num_attention_heads}, "
          f"ffn {m.text.ffn_hidden_size}, vocab {m.text.vocab_size}, context {m.text.encoder_seq_length}), "
          f"output_dim {v_out}, activation {m.vision.activation}")


def cmd_import_open_clip(args) -> None:
    from conversion.clip_layout import image_stats
    from conversion.openclip_format import (
        clip_config_from_openclip, openclip_config_from_state_dict, openclip_model_config, openclip_to_clip_state_dict,
        read_openclip,
    )

    _check_new_engine_output(args.out)
    state, dir_cfg, preprocess = read_openclip(args.source)
    if args.model_config:
        model_cfg = openclip_model_config(args.model_config)
    elif args.model_name:
        model_cfg = openclip_model_config(args.model_name)
    elif dir_cfg is not None:
        model_cfg = dir_cfg
    else:
        model_cfg = openclip_config_from_state_dict(state, vision_head_width=args.vision_head_width,
                                                    text_heads=args.text_heads, quick_gelu=args.quick_gelu,
                                                    eps=args.layernorm_epsilon)
    if args.quick_gelu:
        model_cfg = {**model_cfg, "quick_gelu": True}
    cfg = clip_config_from_openclip(model_cfg)
    if preprocess:
        cfg.vision.image_mean, cfg.vision.image_std = image_stats(preprocess.get("mean"), preprocess.get("std"))
    _write_import(cfg, openclip_to_clip_state_dict(state, cfg), args)


def _write_import(cfg, full: dict, args) -> None:
    """Both importers' tail: check the layout, pad the MLP if asked, cast, wrap in an experiment
    config, write, report."""
    from conversion.clip_layout import pad_ffn

    _check_layout(cfg, args)
    if args.pad_ffn_to_multiple > 1:
        cfg, full = pad_ffn(cfg, full, args.pad_ffn_to_multiple)
    full = _cast(full, _torch_dtype(args.dtype))
    exp = experiment_config(cfg, args.config, args.overrides)
    _default_tokenizer(exp, args)
    _write_engine_checkpoint(args.out, exp, full, args.tensor_model_parallel_size,
                             args.pipeline_model_parallel_size, _torch_dtype(args.dtype))
    _print_model(exp, args.out)


def cmd_export_open_clip(args) -> None:
    from conversion.openclip_format import (
        OPENCLIP_CONFIG_NAME, OPENCLIP_WEIGHT_NAMES, export_openclip, openclip_model_config, write_openclip,
    )
    from engine.checkpoint.tools import read_model_checkpoint

    as_file = args.out.endswith((".safetensors", ".pt", ".pth", ".bin"))
    files = [args.out, args.out + ".json"] if as_file else [
        os.path.join(args.out, OPENCLIP_WEIGHT_NAMES[0]), os.path.join(args.out, OPENCLIP_CONFIG_NAME)]
    _check_export_target(args.out, args.overwrite, files, directory=not as_file)
    target = None
    if args.model_config or args.model_name:
        target = openclip_model_config(args.model_config or args.model_name)
    exp, state = read_model_checkpoint(args.checkpoint)
    model_cfg, oc_state = export_openclip(state, exp.model, text_prefix="text." if args.custom_text else "",
                                          target=target)
    written = write_openclip(oc_state, model_cfg, args.out, _torch_dtype(args.dtype),
                             exp.model.vision.image_mean, exp.model.vision.image_std)
    print("wrote " + ", ".join(written))


def cmd_import_hf_clip(args) -> None:
    from conversion.hf_clip_format import clip_config_from_hf, hf_to_clip_state_dict, read_hf_clip

    _check_new_engine_output(args.out)
    hf_cfg, state, preprocessor = read_hf_clip(args.source)
    cfg = clip_config_from_hf(hf_cfg, preprocessor)
    _write_import(cfg, hf_to_clip_state_dict(state, cfg), args)


def cmd_export_hf_clip(args) -> None:
    from conversion.hf_clip_format import CONFIG_NAME, PREPROCESSOR_NAME, WEIGHTS_NAME, export_hf_clip
    from engine.checkpoint.tools import read_model_checkpoint

    _check_export_target(args.out, args.overwrite, [os.path.join(args.out, n) for n in
                                                    (CONFIG_NAME, WEIGHTS_NAME, PREPROCESSOR_NAME)], directory=True)
    exp, state = read_model_checkpoint(args.checkpoint)
    export_hf_clip(state, exp.model, args.out, _torch_dtype(args.dtype))
    print(f"wrote {args.out} (config.json, model.safetensors, preprocessor_config.json)")


def describe_foreign(path: str) -> str | None:
    """A summary of an open_clip file/directory or HF CLIP directory; None for anything else."""
    from conversion.hf_clip_format import CONFIG_NAME, clip_config_from_hf, read_hf_clip
    from conversion.openclip_format import (
        OPENCLIP_CONFIG_NAME, clip_config_from_openclip, openclip_config_from_state_dict, read_openclip,
    )

    if os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_NAME)):
        hf_cfg, state, pre = read_hf_clip(path)
        kind, cfg = "Hugging Face CLIP directory", clip_config_from_hf(hf_cfg, pre)
    elif (os.path.isfile(path) and path.endswith((".safetensors", ".pt", ".pth", ".bin"))) or (
            os.path.isdir(path) and os.path.isfile(os.path.join(path, OPENCLIP_CONFIG_NAME))):
        state, model_cfg, _ = read_openclip(path)
        kind = "open_clip state dict"
        try:
            cfg = clip_config_from_openclip(model_cfg or openclip_config_from_state_dict(state))
        except ValueError as exc:
            cfg, kind = None, f"{kind} (no CLIP ViT config inferred: {exc})"
    else:
        return None
    import torch

    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in tensors})
    lines = [f"{path}: {kind}", f"  {len(tensors)} tensors, {sum(v.numel() for v in tensors):,} values, "
                                f"dtypes {', '.join(dtypes)}"]
    if cfg is not None:
        from engine.config import to_yaml

        lines.append("  as this project's model section:")
        lines += ["    " + line for line in to_yaml(cfg).splitlines()]
    return "\n".join(lines)


def cmd_inspect(args) -> None:
    summary = describe_foreign(args.path)
    if summary is None:
        from engine.checkpoint.tools import inspect_checkpoint

        summary = inspect_checkpoint(args.path)
    print(summary)


def cmd_reshard(args) -> None:
    from engine.checkpoint.tools import reshard_checkpoint

    _check_new_engine_output(args.out)
    reshard_checkpoint(args.source, args.out, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                       _torch_dtype(args.dtype))
    print(f"wrote {args.out} (TP={args.tensor_model_parallel_size}, PP={args.pipeline_model_parallel_size})")


def _add_engine_target(p) -> None:
    p.add_argument("--out", required=True, help="engine checkpoint directory to write")
    p.add_argument("--tensor-model-parallel-size", type=_positive_int, default=1,
                   help="write it sharded for this TP size (default 1; `reshard` changes it later)")
    p.add_argument("--pipeline-model-parallel-size", type=_positive_int, default=1,
                   help="and this PP size (default 1)")
    p.add_argument("--dtype", choices=DTYPES, default="keep", help="parameter dtype to store (default: as the source)")
    p.add_argument("--pad-ffn-to-multiple", type=_positive_int, default=1, metavar="N",
                   help="zero-pad each MLP width up to a multiple of N, an exactly equivalent model (open_clip "
                        "ViT-g-14's 6143 -> 6144 with N=8, so TP sizes divide it)")
    p.add_argument("--config", help="YAML for the non-model sections of the experiment config "
                                    "(e.g. configs/clip/b32.yaml); the model section comes from the source")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. data.tokenizer.path=bpe_simple_vocab_16e6.txt.gz "
                        "model.text.eot_token_id=49407 (model.* overrides may not change weight shapes)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0],
        epilog="subcommands:\n"
               "  import-open-clip  open_clip CLIP weights (.safetensors/.pt/.bin state dict, or an open_clip\n"
               "                    local-dir with open_clip_config.json) -> engine checkpoint. Architecture from\n"
               "                    --model-name (ViT-B-32, ViT-B-16, ViT-L-14, ViT-H-14, ViT-g-14, ... any open_clip\n"
               "                    config), --model-config JSON, the local-dir's config, or inferred from the\n"
               "                    weights (give --vision-head-width/--text-heads/--quick-gelu then).\n"
               "  export-open-clip  engine checkpoint -> open_clip state dict file (+ .json model config) or a\n"
               "                    local-dir (open_clip.create_model('local-dir:DIR') loads it); --model-name\n"
               "                    checks the checkpoint against that config and trims padded MLP units.\n"
               "  import-hf-clip    Hugging Face CLIPModel directory (config.json + model.safetensors, sharded or\n"
               "                    pytorch_model.bin) -> engine checkpoint.\n"
               "  export-hf-clip    engine checkpoint -> HF directory (config.json, model.safetensors,\n"
               "                    preprocessor_config.json; CLIPModel.from_pretrained(DIR) loads it).\n"
               "  Both imports take --tensor-model-parallel-size to write a sharded checkpoint, and\n"
               "                    --pad-ffn-to-multiple N for MLP widths no TP size divides (ViT-g-14: 6143).\n"
               "  inspect           summarise an engine checkpoint, an open_clip file or a HF CLIP directory.\n"
               "  reshard           rewrite an engine checkpoint for another TP/PP size and/or dtype.\n"
               "A source that does not match the architecture stops with the missing, unexpected and mis-shaped\n"
               "keys; a truncated or corrupt file stops with its name.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("import-open-clip", help="open_clip weights -> engine checkpoint",
                       description="Convert open_clip CLIP weights into an engine checkpoint.")
    p.add_argument("source", help="state dict file (.safetensors, .pt, .pth, .bin) or open_clip local-dir")
    arch = p.add_mutually_exclusive_group()
    arch.add_argument("--model-name", help="open_clip model name, e.g. ViT-B-32, ViT-L-14-quickgelu, ViT-g-14")
    arch.add_argument("--model-config", help="open_clip model config JSON (as open_clip/model_configs/*.json)")
    p.add_argument("--vision-head-width", type=int, default=64,
                   help="without a config: vision head width (heads = width / head width; default 64)")
    p.add_argument("--text-heads", type=int, help="without a config: text heads (default width / 64)")
    p.add_argument("--quick-gelu", action="store_true", help="QuickGELU activations (OpenAI's original weights)")
    p.add_argument("--layernorm-epsilon", type=float, default=1e-5, help="without a config: LayerNorm eps")
    _add_engine_target(p)
    p.set_defaults(func=cmd_import_open_clip)

    p = sub.add_parser("export-open-clip", help="engine checkpoint -> open_clip weights",
                       description="Convert an engine checkpoint into open_clip weights.")
    p.add_argument("checkpoint", help="engine checkpoint directory (any TP/PP)")
    p.add_argument("--out", required=True, help="a .safetensors/.pt/.bin file (config written beside it as "
                                                "<out>.json) or a directory (open_clip local-dir layout)")
    p.add_argument("--custom-text", action="store_true", help="name the text tower text.* (open_clip CustomTextCLIP)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--model-name", help="write for this open_clip model config (checked against the "
                                             "checkpoint; MLP units padded on import are trimmed back)")
    target.add_argument("--model-config", help="the same with an open_clip model config JSON")
    p.add_argument("--dtype", choices=DTYPES, default="keep", help="dtype of the written weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file / the files this export "
                                                            "writes in an existing directory")
    p.set_defaults(func=cmd_export_open_clip)

    p = sub.add_parser("import-hf-clip", help="Hugging Face CLIPModel directory -> engine checkpoint",
                       description="Convert a Hugging Face CLIPModel directory into an engine checkpoint.")
    p.add_argument("source", help="directory with config.json and model.safetensors")
    _add_engine_target(p)
    p.set_defaults(func=cmd_import_hf_clip)

    p = sub.add_parser("export-hf-clip", help="engine checkpoint -> Hugging Face CLIPModel directory",
                       description="Convert an engine checkpoint into a Hugging Face CLIPModel directory.")
    p.add_argument("checkpoint", help="engine checkpoint directory (any TP/PP)")
    p.add_argument("--out", required=True, help="directory to write (never inside an engine checkpoint)")
    p.add_argument("--dtype", choices=DTYPES, default="keep", help="dtype of the written weights")
    p.add_argument("--overwrite", action="store_true", help="replace the files this export writes in an existing "
                                                            "directory (config.json, model.safetensors, "
                                                            "preprocessor_config.json)")
    p.set_defaults(func=cmd_export_hf_clip)

    p = sub.add_parser("inspect", help="summarise a checkpoint",
                       description="Summarise an engine checkpoint, an open_clip file or a HF CLIP directory.")
    p.add_argument("path")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("reshard", help="engine checkpoint -> another TP/PP size or dtype",
                       description="Rewrite an engine checkpoint for another TP/PP size and/or dtype.")
    p.add_argument("source", help="engine checkpoint directory")
    p.add_argument("out", help="directory to write")
    p.add_argument("--tensor-model-parallel-size", type=_positive_int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=_positive_int, default=1)
    p.add_argument("--dtype", choices=DTYPES, default="keep")
    p.set_defaults(func=cmd_reshard)
    return parser


def main(argv=None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed.*")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `section.key=value` overrides may follow the options (argparse alone takes them only before).
    if hasattr(args, "overrides"):
        args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
        extra = [e for e in extra if e not in args.overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from conversion.clip_layout import CheckpointFileError, CheckpointMismatchError, UnsupportedArchitectureError
    from engine.config import ConfigError

    # ValueError: a layout or argument the tools refuse (UsageError and the conversion errors are
    # ValueErrors too); OSError: an existing output, a missing or unreadable file, a full disk.
    errors = (CheckpointFileError, CheckpointMismatchError, UnsupportedArchitectureError, ConfigError, ValueError,
              OSError)
    try:
        from engine.checkpoint.storage import CheckpointError  # a missing or damaged engine checkpoint

        errors += (CheckpointError,)
    except ImportError:
        pass
    try:
        args.func(args)
    except errors as exc:
        print(f"convert_checkpoint.py {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
