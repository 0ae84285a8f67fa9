"""Hugging Face `CLIPModel` (a directory: config.json + model.safetensors) <-> this project's CLIP.

HF layout:

    vision_model.embeddings.{class_embedding [w], patch_embedding.weight, position_embedding.weight}
    vision_model.pre_layrnorm.*  (sic)
    {vision,text}_model.encoder.layers.<i>.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2,
        mlp.fc1, mlp.fc2}
    vision_model.post_layernorm.*   (applied to the pooled class token)
    text_model.embeddings.{token_embedding.weight, position_embedding.weight}
    text_model.final_layer_norm.*
    visual_projection.weight, text_projection.weight (nn.Linear, no bias), logit_scale
    *.embeddings.position_ids: buffers (persistent in older checkpoints; ignored on import)

Semantics kept exactly: post_layernorm on the class token == our per-token final norm then
class-token pooling; HF pools text at argmax(input_ids) when `eos_token_id == 2` (its legacy rule)
and otherwise at the first `eos_token_id`, which are our `eot_token_id = -1` and `eot_token_id = id`.
The library needs neither transformers nor process groups; config.json is read and written as JSON.
"""
from __future__ import annotations

import json
import os
from typing import Mapping, Optional

import torch

from conversion.clip_layout import (
    CLIP_MEAN, CLIP_STD, FC1_B, FC1_W, FC2_B, FC2_W, LN1_B, LN1_W, LN2_B, LN2_W, PROJ_B, PROJ_W, QKV_B,
    QKV_W,
    CheckpointFileError, UnsupportedArchitectureError, add_extra_states, check_clip_state_dict,
    check_divisible, check_keys_and_shapes, fuse_qkv, image_stats, output_dims, padded_vocab, split_qkv,
    with_vocab_rows,
)
from conversion.files import load_tensor_file, save_tensor_file
from models.clip.config import CLIPConfig, TextConfig, VisionConfig

# transformers' CLIPTextConfig / CLIPVisionConfig defaults: config.json files written by
# `save_pretrained` leave out values equal to these.
HF_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "projection_dim": 512,
                    "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
                    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
                    "pad_token_id": 1, "bos_token_id": 49406, "eos_token_id": 49407}
HF_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "projection_dim": 512, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
                      "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0}
HF_TOP_DEFAULTS = {"projection_dim": 512, "logit_scale_init_value": 2.6592}
HF_LEGACY_EOS = 2  # HF's CLIPTextModel pools at argmax(input_ids) when eos_token_id == 2
ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}  # HF hidden_act -> ours (and back)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PREPROCESSOR_NAME = "preprocessor_config.json"
IGNORED_KEYS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def _sub_config(hf_cfg: Mapping, name: str, defaults: dict) -> dict:
    sub = hf_cfg.get(f"{name}_config") or hf_cfg.get(f"{name}_config_dict") or {}  # *_dict: old configs
    return {**defaults, **sub}


def _activation(act: str, what: str) -> str:
    if act not in ACTIVATIONS:
        raise UnsupportedArchitectureError(f"{what}.hidden_act={act!r}: the project's CLIP implements "
                                           f"{', '.join(ACTIVATIONS)} only")
    return ACTIVATIONS[act]


def clip_config_from_hf(hf_cfg: Mapping, preprocessor: Optional[Mapping] = None) -> CLIPConfig:
    """Our `CLIPConfig` from a Hugging Face CLIP config.json dict (and preprocessor_config.json)."""
    model_type = hf_cfg.get("model_type", "clip")
    if model_type != "clip":
        raise UnsupportedArchitectureError(f"model_type={model_type!r}: only Hugging Face CLIPModel ('clip') "
                                           "checkpoints are supported")
    t = _sub_config(hf_cfg, "text", HF_TEXT_DEFAULTS)
    v = _sub_config(hf_cfg, "vision", HF_VISION_DEFAULTS)
    projection_dim = int(hf_cfg.get("projection_dim", HF_TOP_DEFAULTS["projection_dim"]))
    check_divisible(int(v["hidden_size"]), int(v["num_attention_heads"]), "vision_config")
    check_divisible(int(t["hidden_size"]), int(t["num_attention_heads"]), "text_config")
    image_size, patch = int(v["image_size"]), int(v["patch_size"])
    if image_size % patch:
        raise UnsupportedArchitectureError(f"vision_config: image_size {image_size} is not divisible by "
                                           f"patch_size {patch}")
    eos = t.get("eos_token_id")
    vision = VisionConfig(
        patch_dim=patch, img_h=image_size, img_w=image_size, num_channels=int(v["num_channels"]),
        class_token_length=1, global_average_pool=False, output_dim=projection_dim,
        num_layers=int(v["num_hidden_layers"]), hidden_size=int(v["hidden_size"]),
        ffn_hidden_size=int(v["intermediate_size"]), num_attention_heads=int(v["num_attention_heads"]),
        layernorm_epsilon=float(v["layer_norm_eps"]), activation=_activation(v["hidden_act"], "vision_config"),
    )
    if preprocessor:
        vision.image_mean, vision.image_std = image_stats(preprocessor.get("image_mean"), preprocessor.get("image_std"))
    text = TextConfig(
        vocab_size=int(t["vocab_size"]), encoder_seq_length=int(t["max_position_embeddings"]),
        output_dim=projection_dim, num_layers=int(t["num_hidden_layers"]), hidden_size=int(t["hidden_size"]),
        ffn_hidden_size=int(t["intermediate_size"]), num_attention_heads=int(t["num_attention_heads"]),
        layernorm_epsilon=float(t["layer_norm_eps"]), activation=_activation(t["hidden_act"], "text_config"),
        eot_token_id=-1 if eos is None or int(eos) == HF_LEGACY_EOS else int(eos),
    )
    return CLIPConfig(output_dim=projection_dim, vision=vision, text=text,
                      init_logit_scale=float(hf_cfg.get("logit_scale_init_value", HF_TOP_DEFAULTS[
                          "logit_scale_init_value"])))


def hf_config_from_clip(cfg: CLIPConfig, dtype: Optional[torch.dtype] = None) -> dict:
    """A Hugging Face CLIP config.json dict for our `CLIPConfig` (loads with `CLIPModel.from_pretrained`)."""
    v, t = cfg.vision, cfg.text
    v_out, t_out = output_dims(cfg)
    problems = []
    if v.class_token_length != 1:
        problems.append(f"model.vision.class_token_length={v.class_token_length} (HF CLIP has one class token)")
    if v.global_average_pool:
        problems.append("model.vision.global_average_pool=true (HF CLIP pools the class token)")
    if v.img_h != v.img_w:
        problems.append(f"image size {v.img_h}x{v.img_w} (HF CLIP takes square images)")
    if v_out != t_out:
        problems.append(f"vision output_dim {v_out} != text output_dim {t_out} (HF CLIP has one projection_dim)")
    if t.eot_token_id == HF_LEGACY_EOS:
        problems.append("model.text.eot_token_id=2 (HF reads eos_token_id=2 as 'pool at the highest token id')")
    for tower, name in ((v, "vision"), (t, "text")):
        if tower.activation not in ACTIVATIONS:
            problems.append(f"model.{name}.activation={tower.activation!r} (HF CLIP: gelu or quick_gelu)")
    if problems:
        raise UnsupportedArchitectureError("cannot express this CLIP as a Hugging Face CLIPModel: "
                                           + "; ".join(problems))
    text_config = {
        "model_type": "clip_text_model", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
        "intermediate_size": t.ffn_hidden_size, "projection_dim": t_out, "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_attention_heads, "max_position_embeddings": t.encoder_seq_length,
        "hidden_act": t.activation, "layer_norm_eps": t.layernorm_epsilon, "attention_dropout": t.attention_dropout,
    }
    if t.eot_token_id < 0:  # argmax pooling: HF's legacy ids, as in OpenAI's own HF configs
        text_config.update(bos_token_id=0, eos_token_id=HF_LEGACY_EOS, pad_token_id=1)
    else:
        text_config.update(eos_token_id=t.eot_token_id)
        if t.vocab_size <= HF_TEXT_DEFAULTS["bos_token_id"]:  # HF warns about ids outside the vocab
            text_config.update(bos_token_id=None, pad_token_id=None)
    vision_config = {
        "model_type": "clip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.ffn_hidden_size,
        "projection_dim": v_out, "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_attention_heads,
        "num_channels": v.num_channels, "image_size": v.img_h, "patch_size": v.patch_dim, "hidden_act": v.activation,
        "layer_norm_eps": v.layernorm_epsilon, "attention_dropout": v.attention_dropout,
    }
    out = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": v_out,
           "logit_scale_init_value": float(cfg.init_logit_scale), "initializer_factor": 1.0,
           "text_config": text_config, "vision_config": vision_config}
    if dtype is not None:
        out["torch_dtype"] = str(dtype).replace("torch.", "")
    return out


def hf_preprocessor_config(cfg: CLIPConfig) -> dict:
    """CLIPImageProcessor settings for the exported model's image size and normalisation."""
    v = cfg.vision
    return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": v.img_h},
            "resample": 3, "do_center_crop": True, "crop_size": {"height": v.img_h, "width": v.img_w},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
            "image_mean": list(v.image_mean or CLIP_MEAN), "image_std": list(v.image_std or CLIP_STD)}


def expected_hf_shapes(cfg: CLIPConfig) -> dict:
    """Name -> shape of a HF `CLIPModel` state dict for the model our `cfg` describes."""
    v, t = cfg.vision, cfg.text
    v_out, t_out = output_dims(cfg)
    vw, tw = v.hidden_size, t.hidden_size
    shapes = {
        "logit_scale": (),
        "text_model.embeddings.token_embedding.weight": (t.vocab_size, tw),
        "text_model.embeddings.position_embedding.weight": (t.encoder_seq_length, tw),
    }
    shapes.update(_encoder_shapes("text_model.encoder", t.num_layers, tw, t.ffn_hidden_size))
    shapes.update({"text_model.final_layer_norm.weight": (tw,), "text_model.final_layer_norm.bias": (tw,),
                   "vision_model.embeddings.class_embedding": (vw,),
                   "vision_model.embeddings.patch_embedding.weight": (vw, v.num_channels, v.patch_dim, v.patch_dim),
                   "vision_model.embeddings.position_embedding.weight": (v.num_patches + 1, vw),
                   "vision_model.pre_layrnorm.weight": (vw,), "vision_model.pre_layrnorm.bias": (vw,)})
    shapes.update(_encoder_shapes("vision_model.encoder", v.num_layers, vw, v.ffn_hidden_size))
    shapes.update({"vision_model.post_layernorm.weight": (vw,), "vision_model.post_layernorm.bias": (vw,),
                   "visual_projection.weight": (v_out, vw), "text_projection.weight": (t_out, tw)})
    return shapes


def _encoder_shapes(prefix: str, layers: int, width: int, ffn: int) -> dict:
    shapes = {}
    for i in range(layers):
        p = f"{prefix}.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (width, width)
            shapes[p + f"self_attn.{proj}.bias"] = (width,)
        shapes.update({p + "layer_norm1.weight": (width,), p + "layer_norm1.bias": (width,),
                       p + "mlp.fc1.weight": (ffn, width), p + "mlp.fc1.bias": (ffn,),
                       p + "mlp.fc2.weight": (width, ffn), p + "mlp.fc2.bias": (width,),
                       p + "layer_norm2.weight": (width,), p + "layer_norm2.bias": (width,)})
    return shapes


_LAYER_MAP = (("layer_norm1.weight", LN1_W), ("layer_norm1.bias", LN1_B), ("self_attn.out_proj.weight", PROJ_W),
              ("self_attn.out_proj.bias", PROJ_B), ("layer_norm2.weight", LN2_W), ("layer_norm2.bias", LN2_B),
              ("mlp.fc1.weight", FC1_W), ("mlp.fc1.bias", FC1_B), ("mlp.fc2.weight", FC2_W),
              ("mlp.fc2.bias", FC2_B))


def _layers_in(src: Mapping, dst: dict, src_prefix: str, dst_prefix: str, layers: int, heads: int) -> None:
    for i in range(layers):
        s, d = f"{src_prefix}.layers.{i}.", f"{dst_prefix}.layers.{i}."
        for hf_name, our_name in _LAYER_MAP:
            dst[d + our_name] = src[s + hf_name]
        for kind, our_name in (("weight", QKV_W), ("bias", QKV_B)):
            q, k, v = (src[s + f"self_attn.{x}_proj.{kind}"] for x in "qkv")
            dst[d + our_name] = fuse_qkv(q, k, v, heads)


def _layers_out(src: Mapping, dst: dict, src_prefix: str, dst_prefix: str, layers: int, heads: int) -> None:
    for i in range(layers):
        s, d = f"{src_prefix}.layers.{i}.", f"{dst_prefix}.layers.{i}."
        for hf_name, our_name in _LAYER_MAP:
            dst[d + hf_name] = src[s + our_name]
        for kind, our_name in (("weight", QKV_W), ("bias", QKV_B)):
            for x, tensor in zip("qkv", split_qkv(src[s + our_name], heads)):
                dst[d + f"self_attn.{x}_proj.{kind}"] = tensor


def hf_to_clip_state_dict(state: Mapping, cfg: CLIPConfig) -> dict:
    """HF `CLIPModel` state dict -> our full (TP=1) state dict for `CLIPModel(cfg)`."""
    check_keys_and_shapes(state, expected_hf_shapes(cfg), "Hugging Face CLIP state dict", ignore=IGNORED_KEYS,
                          hint="(does config.json describe these weights?)")
    v, t = cfg.vision, cfg.text
    out = {
        "logit_scale": state["logit_scale"].reshape(()),
        "visual.class_embedding": state["vision_model.embeddings.class_embedding"].reshape(1, -1),
        "visual.positional_embedding": state["vision_model.embeddings.position_embedding.weight"],
        "visual.conv1.weight": state["vision_model.embeddings.patch_embedding.weight"],
        "visual.ln_pre.weight": state["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": state["vision_model.pre_layrnorm.bias"],
    }
    _layers_in(state, out, "vision_model.encoder", "visual.transformer", v.num_layers, v.num_attention_heads)
    out["visual.transformer.final_layernorm.weight"] = state["vision_model.post_layernorm.weight"]
    out["visual.transformer.final_layernorm.bias"] = state["vision_model.post_layernorm.bias"]
    out["visual.proj.weight"] = state["visual_projection.weight"]
    out["text.positional_embedding"] = state["text_model.embeddings.position_embedding.weight"]
    out["text.token_embedding.weight"] = with_vocab_rows(state["text_model.embeddings.token_embedding.weight"],
                                                         padded_vocab(t.vocab_size, t.make_vocab_size_divisible_by))
    _layers_in(state, out, "text_model.encoder", "text.transformer", t.num_layers, t.num_attention_heads)
    out["text.transformer.final_layernorm.weight"] = state["text_model.final_layer_norm.weight"]
    out["text.transformer.final_layernorm.bias"] = state["text_model.final_layer_norm.bias"]
    out["text.text_projection.weight"] = state["text_projection.weight"]
    return add_extra_states(out, cfg)


def clip_to_hf_state_dict(state: Mapping, cfg: CLIPConfig) -> dict:
    """Our full (TP=1) state dict -> HF `CLIPModel`'s (vocab trimmed to `cfg.text.vocab_size`)."""
    hf_config_from_clip(cfg)  # raises for what HF CLIP cannot express
    check_clip_state_dict(state, cfg)
    v, t = cfg.vision, cfg.text
    out = {
        "logit_scale": state["logit_scale"].reshape(()),
        "text_model.embeddings.token_embedding.weight": state["text.token_embedding.weight"][: t.vocab_size],
        "text_model.embeddings.position_embedding.weight": state["text.positional_embedding"],
    }
    _layers_out(state, out, "text.transformer", "text_model.encoder", t.num_layers, t.num_attention_heads)
    out["text_model.final_layer_norm.weight"] = state["text.transformer.final_layernorm.weight"]
    out["text_model.final_layer_norm.bias"] = state["text.transformer.final_layernorm.bias"]
    out["vision_model.embeddings.class_embedding"] = state["visual.class_embedding"].reshape(-1)
    out["vision_model.embeddings.patch_embedding.weight"] = state["visual.conv1.weight"]
    out["vision_model.embeddings.position_embedding.weight"] = state["visual.positional_embedding"]
    out["vision_model.pre_layrnorm.weight"] = state["visual.ln_pre.weight"]
    out["vision_model.pre_layrnorm.bias"] = state["visual.ln_pre.bias"]
    _layers_out(state, out, "visual.transformer", "vision_model.encoder", v.num_layers, v.num_attention_heads)
    out["vision_model.post_layernorm.weight"] = state["visual.transformer.final_layernorm.weight"]
    out["vision_model.post_layernorm.bias"] = state["visual.transformer.final_layernorm.bias"]
    out["visual_projection.weight"] = state["visual.proj.weight"]
    out["text_projection.weight"] = state["text.text_projection.weight"]
    return out


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError as exc:
        raise CheckpointFileError(path, "no such file") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointFileError(path, f"truncated or corrupt JSON ({exc})") from exc


def read_hf_weights(directory: str) -> dict:
    """All tensors of a HF model directory: model.safetensors, a sharded *.index.json, or
    pytorch_model.bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = os.path.join(directory, index_name)
        if os.path.isfile(index_path):
            index = _read_json(index_path)
            if not isinstance(index.get("weight_map"), dict):
                raise CheckpointFileError(index_path, "has no weight_map")
            state = {}
            for shard in sorted(set(index["weight_map"].values())):
                state.update(load_tensor_file(os.path.join(directory, shard)))
            return state
    for name in (WEIGHTS_NAME, "pytorch_model.bin"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return load_tensor_file(path)
    raise CheckpointFileError(os.path.join(directory, WEIGHTS_NAME), "no such file (nor a sharded index or "
                                                                      "pytorch_model.bin) in the model directory")


def read_hf_clip(directory: str) -> tuple[dict, dict, Optional[dict]]:
    """(config.json dict, state dict, preprocessor_config.json dict or None) of a HF CLIP directory."""
    if not os.path.isdir(directory):
        raise CheckpointFileError(directory, "not a directory (expected a Hugging Face model directory)")
    hf_cfg = _read_json(os.path.join(directory, CONFIG_NAME))
    preprocessor_path = os.path.join(directory, PREPROCESSOR_NAME)
    preprocessor = _read_json(preprocessor_path) if os.path.isfile(preprocessor_path) else None
    return hf_cfg, read_hf_weights(directory), preprocessor


def import_hf_clip(directory: str) -> tuple[CLIPConfig, dict]:
    """(our CLIPConfig, our full state dict) from a HF CLIP model directory."""
    hf_cfg, state, preprocessor = read_hf_clip(directory)
    cfg = clip_config_from_hf(hf_cfg, preprocessor)
    return cfg, hf_to_clip_state_dict(state, cfg)


def export_hf_clip(state: Mapping, cfg: CLIPConfig, directory: str, dtype: Optional[torch.dtype] = None) -> None:
    """Write a HF CLIP model directory (config.json, model.safetensors, preprocessor_config.json)."""
    hf_state = clip_to_hf_state_dict(state, cfg)
    if dtype is not None:
        hf_state = {k: v.to(dtype) for k, v in hf_state.items()}
    weight_dtype = hf_state["visual_projection.weight"].dtype
    os.makedirs(directory, exist_ok=True)
    save_tensor_file(hf_state, os.path.join(directory, WEIGHTS_NAME))
    for name, content in ((CONFIG_NAME, hf_config_from_clip(cfg, weight_dtype)),
                          (PREPROCESSOR_NAME, hf_preprocessor_config(cfg))):
        with open(os.path.join(directory, name), "w") as f:
            json.dump(content, f, indent=2)
            f.write("\n")
