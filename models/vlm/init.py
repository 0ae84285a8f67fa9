"""A VLM's pretrained parts: the vision tower from a CLIP checkpoint, the LLM from an LLM checkpoint or
a Hugging Face Llama directory (`model.init.vision` / `model.init.llm`), through key maps on the
canonical (TP=1/PP=1) names, so any layout loads from any layout.

- CLIP: `vision.*` reads the checkpoint's `visual.*`; the text tower, the temperature, the visual
  projection and final norm and the layers after feature_select_index are left unread.
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


def is_hf_directory(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json"))


def load_vision(path: str, model, place) -> None:
    load_model_weights(path, model, place, VISION_FROM_CLIP)


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
