"""A VLM's pretrained parts: the vision tower from a CLIP checkpoint, the LLM from an LLM checkpoint or
a Hugging Face Llama directory (`model.init.vision` / `model.init.llm`), through key maps on the
canonical (TP=1/PP=1) names, so any layout loads from any layout.

- CLIP: `vision.*` reads the checkpoint's `visual.*`; the text tower, the temperature, the visual
  projection and final norm and the layers after feature_select_index are left unread.
- open_clip state dict file (.safetensors/.pt/.pth/.bin, its model config from `<file>.json` as
  conversion writes it, else inferred from the shapes with model.vision's head count) or `local-dir:`
  directory, and Hugging Face CLIP directories: converted in memory by conversion/openclip_format.py
  and conversion/hf_clip_format.py (what examples/convert_checkpoint.py writes to disk), then the
  tower's share cut to this rank's TP shard; the converted tower's shape must equal model.vision.
- LLM: `llm.*` reads the checkpoint's own names; LoRA adapters are new (kept at B = 0).
- Hugging Face Llama directory: converted by conversion/hf_llama.py (the engine's own import),
  then cut to this rank's stage and TP shard; its config must give the LLM section's shape.
"""
from __future__ import annotations

import logging
import os

import torch

from engine.checkpoint import KeyMap, load_model_weights
from models.common.lora import is_lora_key

log = logging.getLogger("engine")

VISION_FROM_CLIP = KeyMap(
    rename=[(r"^vision\.", "visual.")],
    allow_missing=["connector.*", "llm.*"],
    allow_unused=["text.*", "logit_scale", "visual.proj.*", "visual.transformer.final_layernorm.*",
                  "visual.transformer.layers.*"],  # the layers after feature_select_index (the used ones must load)
)
LLM_FROM_LLM = KeyMap(rename=[(r"^llm\.", "")], allow_missing=["vision.*", "connector.*", "*.lora.*"])
# The LLM's shape keys a Hugging Face config must agree with.
SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "vocab_size",
              "normalization", "activation", "rotary_base", "layernorm_epsilon")


# The CLIP `model.vision` keys that fix the tower's weights and what they compute; a checkpoint's must
# equal the VLM's (feature_select_index and use_cls are the VLM's own choice).
TOWER_KEYS = ("patch_dim", "img_h", "img_w", "num_channels", "class_token_length", "num_layers", "hidden_size",
              "ffn_hidden_size", "num_attention_heads", "activation", "layernorm_epsilon")
CLIP_DEMO = ("torchrun --nproc_per_node=2 examples/pretrain_clip.py --config configs/clip/tiny.yaml "
             "tensor_model_parallel_size=2")


def vision_checkpoint_problems(path: str, vision) -> list[str]:
    """Why `model.init.vision=path` cannot give the tower `vision` (a VLMVisionConfig), read from the
    checkpoint's meta.json only (no tensors), so preflight says it before any process group exists:
    no such path (and what writes the demo's), no complete checkpoint, not a CLIP, another shape."""
    from engine.checkpoint import CheckpointError
    from engine.checkpoint.storage import read_json
    from engine.checkpoint.tools import saved_experiment

    key = f"model.init.vision={path}"
    if not os.path.exists(path):
        return [f"{key}: no such file or directory. It takes an engine CLIP checkpoint (or checkpoint root), an "
                f"open_clip state dict file or local-dir, or a Hugging Face CLIP directory; the "
                f"README CLIP demo writes runs/clip_tiny/checkpoints for configs/vlm/tiny_from_clip.yaml, run it "
                f"first from the repository root: {CLIP_DEMO}"]
    kind = clip_source_kind(path)
    if kind == "hf":
        from conversion.hf_clip_format import clip_config_from_hf

        try:
            hf_cfg = read_json(os.path.join(path, "config.json"), "Hugging Face config")
            theirs = clip_config_from_hf(hf_cfg).vision
        except (CheckpointError, ValueError) as exc:
            return [f"{key}: {exc}"]
        differ = tower_differences(theirs, vision)
        return [f"{key}: the Hugging Face CLIP tower has another shape than model.vision: " + "; ".join(differ)] \
            if differ else []
    if kind == "open_clip":
        return []  # its shape (from a config or the weights) is checked when it loads
    try:  # model.init.vision reads a CLIP's visual tower
        _, saved = saved_experiment(path, "clip", verify=False)
    except CheckpointError as exc:
        return [f"{key}: {exc}"]
    differ = tower_differences(saved.model.vision, vision)
    if differ:
        return [f"{key}: the CLIP tower has another shape than model.vision (set model.vision to the CLIP's "
                f"vision section): " + "; ".join(differ)]
    return []


def is_hf_directory(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


OPENCLIP_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def clip_source_kind(path: str) -> str:
    """What `model.init.vision` points at: "open_clip" (a state dict file, or a `local-dir:` with
    open_clip_config.json), "hf" (a directory with config.json: a Hugging Face CLIPModel) or
    "engine" (anything else: an engine CLIP checkpoint or checkpoint root, checked by its reader)."""
    from conversion.openclip_format import OPENCLIP_CONFIG_NAME

    if os.path.isfile(path) and path.endswith(OPENCLIP_SUFFIXES):
        return "open_clip"
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, OPENCLIP_CONFIG_NAME)):
        return "open_clip"
    if is_hf_directory(path):
        return "hf"
    return "engine"


def import_foreign_clip(path: str, vision) -> tuple:
    """(CLIPConfig, full TP=1 state dict in this project's CLIP names) of an open_clip or Hugging
    Face CLIP at `path`, through the project's converters, in memory. `vision` (the VLM's
    VLMVisionConfig) gives the head count when an open_clip file has no config to say it."""
    import json

    if clip_source_kind(path) == "hf":
        from conversion.hf_clip_format import import_hf_clip

        return import_hf_clip(path)
    from conversion.openclip_format import (
        clip_config_from_openclip,
        openclip_config_from_state_dict,
        openclip_to_clip_state_dict,
        read_openclip,
    )

    state, model_cfg, _ = read_openclip(path)
    if model_cfg is None and os.path.isfile(path + ".json"):  # the model config conversion writes beside a file
        with open(path + ".json") as fh:
            model_cfg = json.load(fh)
    if model_cfg is None:
        # Head counts are not in the weights: the VLM's own for the tower; the text tower is never
        # read, so one head (any width divides) keeps its inferred config valid.
        model_cfg = openclip_config_from_state_dict(state, vision_head_width=vision.hidden_size // vision.num_attention_heads,
                                                    text_heads=1, quick_gelu=vision.activation == "quick_gelu",
                                                    eps=vision.layernorm_epsilon)
        log.info("model.init.vision=%s: no open_clip model config beside it, inferred from the weights with "
                 "model.vision's %d heads", path, vision.num_attention_heads)
    cfg = clip_config_from_openclip(model_cfg)
    return cfg, openclip_to_clip_state_dict(state, cfg)


def tower_differences(theirs, vision) -> list[str]:
    """model.vision keys whose value differs from a CLIP `VisionConfig`'s."""
    return [f"model.vision.{k}={getattr(vision, k)!r} here, {getattr(theirs, k)!r} in the checkpoint"
            for k in TOWER_KEYS if getattr(theirs, k, None) is not None and getattr(theirs, k) != getattr(vision, k)]


def load_foreign_vision(path: str, model, place) -> None:
    """The tower from an open_clip or Hugging Face CLIP (see `import_foreign_clip`), cut to this TP rank."""
    from parallel.tp_sharding import shard_full_state_dict

    if not model.pre_process:  # the tower lives on the first pipeline stage only
        return
    clip_cfg, full = import_foreign_clip(path, model.cfg.vision)
    differ = tower_differences(clip_cfg.vision, model.cfg.vision)
    if differ:
        raise ValueError(f"model.init.vision={path}: the CLIP tower has another shape than model.vision: "
                         + "; ".join(differ))
    tower = model.vision
    own = tower.state_dict()
    stage = {k[len("visual."):]: v for k, v in full.items() if k.startswith("visual.") and k[len("visual."):] in own}
    missing = [k for k in own if k not in stage and not k.endswith("_extra_state")]
    if missing:
        raise ValueError(f"model.init.vision={path}: no weights for vision.{', vision.'.join(missing[:5])}")
    result = tower.load_state_dict(shard_full_state_dict(stage, tower, place.tp_rank, place.tp_size), strict=False)
    if [k for k in result.missing_keys if not k.endswith("_extra_state")] or result.unexpected_keys:
        raise ValueError(f"model.init.vision={path}: {result.missing_keys or result.unexpected_keys}")
    mean = clip_cfg.vision.image_mean
    if mean is not None and list(mean) != list(model.cfg.vision.image_mean or mean):
        log.warning("model.init.vision=%s normalises images with mean %s, model.vision.image_mean is %s", path, mean,
                    model.cfg.vision.image_mean)
    log.info("vision tower from the %s CLIP %s (%d tensors, layers up to %d)", clip_source_kind(path), path,
             len(stage), model.cfg.vision.layers_used)


def load_vision(path: str, model, place) -> None:
    if clip_source_kind(path) == "engine":
        load_model_weights(path, model, place, VISION_FROM_CLIP)
    else:
        load_foreign_vision(path, model, place)


def load_llm(path: str, model, place, tp_rank: int, tp_size: int) -> None:
    if is_hf_directory(path):
        load_llm_from_hf(path, model, tp_rank, tp_size)
    else:
        load_model_weights(path, model, place, LLM_FROM_LLM)


def load_llm_from_hf(directory: str, model, tp_rank: int, tp_size: int) -> None:
    from conversion.hf_llama import import_hf_llama
    from parallel.pp_sharding import global_names
    from parallel.tp_sharding import shard_full_state_dict

    llm = model.llm
    hf_cfg, full = import_hf_llama(directory, untie_embeddings=not llm.cfg.share_embeddings_and_output_weights)
    differ = [f"model.llm.{k}: {getattr(hf_cfg, k)!r} in {directory}, {getattr(llm.cfg, k)!r} here" for k in SHAPE_KEYS
              if getattr(hf_cfg, k) != getattr(llm.cfg, k)]
    if differ:
        raise ValueError("model.init.llm: the Hugging Face model has another shape than model.llm: " + "; ".join(differ))
    names = {local: canonical for local, canonical in global_names(llm).items() if not is_lora_key(local)}
    stage = {local: full[canonical] for local, canonical in names.items() if canonical in full}
    missing = [n for n in names if n not in stage and not n.endswith("_extra_state")]
    if missing:
        raise ValueError(f"model.init.llm={directory}: no weights for {', '.join(missing[:5])}")
    result = llm.load_state_dict(shard_full_state_dict(stage, llm, tp_rank, tp_size), strict=False)
    unexpected_missing = [k for k in result.missing_keys if not is_lora_key(k) and not k.endswith("_extra_state")]
    if unexpected_missing or result.unexpected_keys:
        raise ValueError(f"model.init.llm={directory}: {unexpected_missing or result.unexpected_keys}")
    log.info("LLM weights from the Hugging Face model %s (%d tensors)", directory, len(stage))


@torch.no_grad()
def load_pretrained_parts(cfg, model, ctx) -> None:
    """Collective: `model.init.vision` and `model.init.llm`, when set."""
    from engine.checkpoint.state import Placement

    place = Placement.from_ctx(ctx)
    init = cfg.model.init
    if init.vision:
        load_vision(init.vision, model, place)
    if init.llm:
        load_llm(init.llm, model, place, ctx.tp_rank, ctx.dims.tp)
