"""Convert CLIP and LLM checkpoints between open_clip, Hugging Face and this engine's format; inspect; reshard.

    python examples/convert_checkpoint.py --help
    python examples/convert_checkpoint.py import-open-clip b32.safetensors --model-name ViT-B-32 --out ckpt/b32
    python examples/convert_checkpoint.py export-open-clip ckpt/b32 --out b32_open_clip/      # open_clip local-dir
    python examples/convert_checkpoint.py import-hf-clip hf/clip-vit-base-patch32 --out ckpt/b32
    python examples/convert_checkpoint.py export-hf-clip ckpt/b32 --out hf_b32/
    python examples/convert_checkpoint.py import-hf-llama /models/Llama-3.2-1B --out ckpt/llama32_1b --save-config llama32_1b.yaml
    python examples/convert_checkpoint.py export-hf-llama runs/llm/checkpoints --out hf_llama/
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
    """A CLIP ExperimentConfig whose model section is `model_cfg` (derived from the source weights).

    Other sections come from `config_file` / `section.key=value` overrides; `model.*` overrides are
    applied on top and may not change any weight shape.
    """
    from conversion.clip_layout import expected_clip_shapes
    from models.clip.config import CLIPExperimentConfig

    return _experiment_config(CLIPExperimentConfig, expected_clip_shapes, model_cfg, config_file, overrides)


def llm_experiment_config(model_cfg, config_file: str | None = None, overrides=()):
    """The same for an LLM (`LLMExperimentConfig`): model.* overrides such as model.seq_length or
    dropout are taken, ones that change a weight shape are refused."""
    from conversion.llm_layout import expected_llm_shapes
    from models.llm.config import LLMExperimentConfig

    return _experiment_config(LLMExperimentConfig, expected_llm_shapes, model_cfg, config_file, overrides)


def _experiment_config(experiment_cls, shapes, model_cfg, config_file, overrides):
    from omegaconf import OmegaConf

    from engine.config import ConfigError, _dotlist_value, load_config, parse_overrides
    from engine.schema import BARE_KEYS

    model_overrides = [o for o in overrides if o.split("=", 1)[0].startswith("model.")]
    other = [o for o in overrides if o not in model_overrides]
    exp = load_config(experiment_cls, config_file, other, bare_keys=BARE_KEYS)
    exp.model = model_cfg
    if model_overrides:
        load_config(experiment_cls, None, model_overrides)  # unknown keys and bad values stop here
        parsed = parse_overrides(model_overrides, {})
        merged = OmegaConf.merge(OmegaConf.structured(exp),
                                 OmegaConf.from_dotlist([f"{k}={_dotlist_value(v)}" for k, v in parsed.items()]))
        exp = OmegaConf.to_object(merged)
        if shapes(exp.model) != shapes(model_cfg):
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


# -- Hugging Face Llama <-> the LLM ----------------------------------------------------------------
def cmd_import_hf_llama(args) -> None:
    from conversion.hf_llama import hf_llama_config_to_llm_config, hf_to_engine_state_dict, read_hf_llama
    from engine.config import to_yaml
    from models.llm.config import llm_layout_problems

    _check_new_engine_output(args.out)
    if args.save_config and os.path.exists(args.save_config):
        raise UsageError(f"--save-config {args.save_config} exists; choose a new file (nothing was written)")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    hf_config, state = read_hf_llama(args.source)
    cfg = hf_llama_config_to_llm_config(hf_config, untie_embeddings=args.untie_embeddings)
    problems = llm_layout_problems(cfg, tp, pp)
    if problems:
        hint = " (import with --untie-embeddings)" if cfg.share_embeddings_and_output_weights and pp > 1 else ""
        raise UsageError(f"cannot write this model at --tensor-model-parallel-size {tp} --pipeline-model-parallel-size "
                         f"{pp}{hint} (nothing was written):\n  " + "\n  ".join(problems))
    full = _cast(hf_to_engine_state_dict(state, cfg), _torch_dtype(args.dtype))
    exp = llm_experiment_config(cfg, args.config, args.overrides)
    chosen = args.config is not None or any(o.startswith("data.tokenizer.") for o in args.overrides)
    tokenizer_json = os.path.join(args.source, "tokenizer.json")
    if not chosen and os.path.isfile(tokenizer_json):  # the model's own tokenizer, for training it
        exp.data.tokenizer.type, exp.data.tokenizer.path = "huggingface", os.path.abspath(tokenizer_json)
    exp.parallel.tensor_model_parallel_size, exp.parallel.pipeline_model_parallel_size = tp, pp
    _write_engine_checkpoint(args.out, exp, full, tp, pp, _torch_dtype(args.dtype))
    m = exp.model
    print(f"wrote {args.out}: {m.num_layers} layers x {m.hidden_size} (heads {m.num_attention_heads}, key/value groups "
          f"{m.query_groups}, ffn {m.ffn_hidden_size}, vocab {m.vocab_size}, "
          f"{'tied' if m.share_embeddings_and_output_weights else 'untied'}, rope base {m.rotary_base:g}"
          f"{', llama3 scaling' if m.rope_scaling.type == 'llama3' else ''}) at TP={tp} PP={pp}")
    if args.save_config:
        header = (f"# Written by convert_checkpoint.py import-hf-llama {args.source}: the model section is the import's.\n"
                  f"#   examples/pretrain_llm.py --config {args.save_config} checkpoint.init_from={args.out} ...\n")
        tmp = args.save_config + ".tmp"
        with open(tmp, "w") as fh:
            fh.write(header + to_yaml(exp))
        os.replace(tmp, args.save_config)
        print(f"wrote {args.save_config} (train it: examples/pretrain_llm.py --config {args.save_config} "
              f"checkpoint.init_from={args.out})")


def _hf_tokenizer_of(exp):
    """(tokenizer.json path, Tokenizer) the LLM experiment names, when it is a Hugging Face one that
    exists here; else (None, None)."""
    tok = exp.data.tokenizer
    path = tok.path if exp.data.train_shards is not None else os.path.join(exp.data.synthetic.out_dir, "tokenizer.json")
    if tok.type != "huggingface" or path is None:
        return None, None
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        return None, None
    from models.llm.family import load_tokenizer

    return file, load_tokenizer(tok, file)


def _parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    number = text.rstrip("BbKkMmGgIi")
    unit = text[len(number):].upper()
    try:
        value = int(float(number) * units[unit])
    except (ValueError, KeyError):
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a size such as 5GB, 500MB or 1000000 (bytes), got {text!r}")
    return value


def cmd_export_hf_llama(args) -> None:
    import glob

    from conversion.hf_dir import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME
    from conversion.hf_llama import export_hf_llama
    from engine.checkpoint.tools import read_model_checkpoint
    from models.llm.config import LLMExperimentConfig

    files = [os.path.join(args.out, n) for n in (CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME)]
    _check_export_target(args.out, args.overwrite, files, directory=True)
    exp, state = read_model_checkpoint(args.checkpoint)
    if not isinstance(exp, LLMExperimentConfig):
        raise UsageError(f"{args.checkpoint} is not an LLM checkpoint (its config is a {type(exp).__name__})")
    extra, tokenizer_file = {}, None
    if not args.no_tokenizer:
        tokenizer_file, tokenizer = _hf_tokenizer_of(exp)
        if tokenizer is not None:
            extra = {"bos_token_id": tokenizer.sot_id, "eos_token_id": tokenizer.eot_id,
                     "pad_token_id": tokenizer.pad_id}
    if args.overwrite:  # weights of an earlier export (another shard count) must not outlive this one
        for old in [os.path.join(args.out, WEIGHTS_NAME), os.path.join(args.out, INDEX_NAME),
                    *glob.glob(os.path.join(args.out, "model-*-of-*.safetensors"))]:
            if os.path.isfile(old):
                os.remove(old)
    export_hf_llama(state, exp.model, args.out, _torch_dtype(args.dtype), args.max_shard_size, **extra)
    written = ["config.json", "safetensors"]
    if tokenizer_file is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            source = os.path.join(os.path.dirname(tokenizer_file), name) if name != "tokenizer.json" else tokenizer_file
            if os.path.isfile(source):
                shutil.copyfile(source, os.path.join(args.out, name))
                written.append(name)
    print(f"wrote {args.out} ({', '.join(written)}); LlamaForCausalLM.from_pretrained loads it")


def describe_foreign(path: str) -> str | None:
    """A summary of an open_clip file/directory or HF CLIP directory; None for anything else."""
    from conversion.hf_clip_format import CONFIG_NAME, clip_config_from_hf, read_hf_clip
    from conversion.openclip_format import (
        OPENCLIP_CONFIG_NAME, clip_config_from_openclip, openclip_config_from_state_dict, read_openclip,
    )

    if os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_NAME)) and _hf_model_type(path) == "llama":
        from conversion.hf_llama import hf_llama_config_to_llm_config, read_hf_llama

        hf_cfg, state = read_hf_llama(path)
        kind, cfg = "Hugging Face Llama directory", hf_llama_config_to_llm_config(hf_cfg)
    elif os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_NAME)):
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


def _hf_model_type(path: str) -> str | None:
    from conversion.hf_dir import CONFIG_NAME, read_json

    return read_json(os.path.join(path, CONFIG_NAME)).get("model_type")


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


def _add_engine_target(p, family: str = "clip") -> None:
    p.add_argument("--out", required=True, help="engine checkpoint directory to write")
    p.add_argument("--tensor-model-parallel-size", type=_positive_int, default=1,
                   help="write it sharded for this TP size (default 1; `reshard` changes it later)")
    p.add_argument("--pipeline-model-parallel-size", type=_positive_int, default=1,
                   help="and this PP size (default 1)")
    p.add_argument("--dtype", choices=DTYPES, default="keep", help="parameter dtype to store (default: as the source)")
    if family == "clip":
        p.add_argument("--pad-ffn-to-multiple", type=_positive_int, default=1, metavar="N",
                       help="zero-pad each MLP width up to a multiple of N, an exactly equivalent model (open_clip "
                            "ViT-g-14's 6143 -> 6144 with N=8, so TP sizes divide it)")
        example, overrides = "configs/clip/b32.yaml", ("data.tokenizer.path=bpe_simple_vocab_16e6.txt.gz "
                                                      "model.text.eot_token_id=49407")
    else:
        example, overrides = "configs/llm/llama3.2-1b.yaml", "model.seq_length=4096 data.train_shards=..."
    p.add_argument("--config", help="YAML for the non-model sections of the experiment config "
                                    f"(e.g. {example}); the model section comes from the source")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help=f"config overrides, e.g. {overrides} (model.* overrides may not change weight shapes)")


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
               "  import-hf-llama   Hugging Face LlamaForCausalLM directory (config.json + safetensors, sharded or\n"
               "                    not) -> engine LLM checkpoint at any TP/PP; --untie-embeddings for PP > 1 with a\n"
               "                    tied model; --save-config writes the experiment config to train it with.\n"
               "  export-hf-llama   engine LLM checkpoint -> HF directory (LlamaForCausalLM.from_pretrained loads\n"
               "                    it), with the checkpoint's tokenizer.json when it has one.\n"
               "  inspect           summarise an engine checkpoint, an open_clip file or a HF CLIP / Llama directory.\n"
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

    p = sub.add_parser("import-hf-llama", help="Hugging Face LlamaForCausalLM directory -> engine LLM checkpoint",
                       description="Convert a Hugging Face Llama directory (config.json + safetensors, sharded or "
                                   "not) into an engine LLM checkpoint.")
    p.add_argument("source", help="directory with config.json and model.safetensors (or shards + index)")
    p.add_argument("--untie-embeddings", action="store_true",
                   help="give a tied model (Llama 3.2) its own output layer, a copy of the embedding "
                        "(pipeline parallelism needs it)")
    p.add_argument("--save-config", metavar="YAML", help="also write the experiment config to train the import "
                                                         "with (its model section is the import's); a new file")
    _add_engine_target(p, "llm")
    p.set_defaults(func=cmd_import_hf_llama)

    p = sub.add_parser("export-hf-llama", help="engine LLM checkpoint -> Hugging Face LlamaForCausalLM directory",
                       description="Convert an engine LLM checkpoint into a Hugging Face Llama directory.")
    p.add_argument("checkpoint", help="engine checkpoint directory or root (any TP/PP)")
    p.add_argument("--out", required=True, help="directory to write (never inside an engine checkpoint)")
    p.add_argument("--dtype", choices=DTYPES, default="keep", help="dtype of the written weights")
    p.add_argument("--max-shard-size", type=_parse_size, default=None, metavar="SIZE",
                   help="safetensors shards of at most SIZE (5GB, 500MB; default 5GB as save_pretrained)")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="do not copy the checkpoint's Hugging Face tokenizer files beside the weights")
    p.add_argument("--overwrite", action="store_true", help="replace the files this export writes in an existing "
                                                            "directory (config.json, the safetensors, the tokenizer)")
    p.set_defaults(func=cmd_export_hf_llama)

    p = sub.add_parser("inspect", help="summarise a checkpoint",
                       description="Summarise an engine checkpoint, an open_clip file, a HF CLIP or HF Llama "
                                   "directory.")
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
