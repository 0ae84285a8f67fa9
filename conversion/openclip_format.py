"""open_clip `CLIP` (ViT towers, `open_clip.model.CLIP` / `CustomTextCLIP`) <-> this project's CLIP.

open_clip layout (per tower; the text tower sits at the top level in `CLIP`, under `text.` in
`CustomTextCLIP`):

    visual.conv1.weight, visual.class_embedding [w], visual.positional_embedding, visual.ln_pre.*,
    visual.transformer.resblocks.<i>.{ln_1, attn.in_proj_weight/bias ([q;k;v] stacked),
        attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, visual.ln_post.*, visual.proj [w, out] (x @ proj)
    token_embedding.weight, positional_embedding, transformer.resblocks.<i>..., ln_final.*,
    text_projection [w, out] (x @ proj), logit_scale; attn_mask is a non-persistent buffer.

Mapping: ln_1/ln_2 -> input_layernorm/pre_mlp_layernorm, in_proj -> linear_qkv (re-interleaved per
head, see `clip_layout.fuse_qkv`), out_proj -> linear_proj, c_fc/c_proj -> linear_fc1/fc2,
ln_post/ln_final -> the block's final_layernorm (open_clip normalises every token before pooling,
as we do; with class-token or EOT pooling the order does not matter), proj/text_projection ->
transposed nn.Linear weights, token embedding rows zero-padded to megatron's padded vocab (trimmed
back on export).
"""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Mapping, Optional

import torch

from conversion.clip_layout import (
    CLIP_MEAN, CLIP_STD, FC1_B, FC1_W, FC2_B, FC2_W, LN1_B, LN1_W, LN2_B, LN2_W, PROJ_B, PROJ_W, QKV_B, QKV_W,
    CheckpointFileError, UnsupportedArchitectureError, add_extra_states, architecture_differences, check_divisible,
    check_clip_state_dict, check_keys_and_shapes, ffn_size, fuse_qkv, output_dims, padded_vocab, split_qkv,
    trim_ffn, with_vocab_rows,
)
from conversion.files import load_tensor_file, save_tensor_file
from models.clip.config import CLIPConfig, TextConfig, VisionConfig

DEFAULT_EPS = 1e-5  # torch.nn.LayerNorm's, which open_clip uses unless norm_kwargs says otherwise

# open_clip's own model configs (open_clip/model_configs/<name>.json, open_clip_torch 3.3) for the
# sizes this project trains, so `--model-name` works without open_clip installed. When open_clip
# is installed, its file wins (`openclip_model_config`).
BUILTIN_MODEL_CONFIGS = {
    "ViT-B-32": {"embed_dim": 512,
                 "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}},
    "ViT-B-16": {"embed_dim": 512,
                 "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}},
    "ViT-L-14": {"embed_dim": 768,
                 "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12}},
    "ViT-L-14-336": {"embed_dim": 768,
                     "vision_cfg": {"image_size": 336, "layers": 24, "width": 1024, "patch_size": 14},
                     "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12,
                                  "layers": 12}},
    "ViT-H-14": {"embed_dim": 1024,
                 "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}},
    "ViT-g-14": {"embed_dim": 1024,
                 "vision_cfg": {"image_size": 224, "layers": 40, "width": 1408, "head_width": 88,
                                "mlp_ratio": 4.3637, "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}},
    "ViT-bigG-14": {"embed_dim": 1280,
                    "vision_cfg": {"image_size": 224, "layers": 48, "width": 1664, "head_width": 104,
                                   "mlp_ratio": 4.9231, "patch_size": 14},
                    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1280, "heads": 20,
                                 "layers": 32}},
}
for _name in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-bigG-14"):
    BUILTIN_MODEL_CONFIGS[_name + "-quickgelu"] = {"embed_dim": BUILTIN_MODEL_CONFIGS[_name]["embed_dim"],
                                                   "quick_gelu": True,
                                                   **{k: v for k, v in BUILTIN_MODEL_CONFIGS[_name].items()
                                                      if k != "embed_dim"}}

# Keys older open_clip / OpenAI checkpoints carry that hold no weights of the architecture.
IGNORED_KEYS = ("attn_mask", "text.attn_mask", "input_resolution", "context_length", "vocab_size")

_VISION_DEFAULTS = {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16,
                    "image_size": 224, "pool_type": "tok", "pos_embed_type": "learnable"}
_TEXT_DEFAULTS = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
                  "mlp_ratio": 4.0, "pool_type": "argmax", "eos_id": 2, "proj_type": "linear"}
# open_clip switches that change the computation and have no counterpart in our towers.
_UNSUPPORTED_FLAGS = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn",
                      "scale_fc", "attentional_pool", "no_ln_pre", "embed_cls", "no_causal_mask", "proj_bias")


def openclip_model_config(name_or_path: str) -> dict:
    """An open_clip model config: a JSON file path, a name from the installed open_clip package
    (read from its model_configs/ without importing open_clip), or a built-in name."""
    if os.path.isfile(name_or_path):
        with open(name_or_path) as f:
            cfg = json.load(f)
        return cfg.get("model_cfg", cfg)  # open_clip_config.json nests it under model_cfg
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            path = os.path.join(location, "model_configs", f"{name_or_path}.json")
            if os.path.isfile(path):
                with open(path) as f:
                    return json.load(f)
    if name_or_path in BUILTIN_MODEL_CONFIGS:
        return json.loads(json.dumps(BUILTIN_MODEL_CONFIGS[name_or_path]))
    raise UnsupportedArchitectureError(f"unknown open_clip model {name_or_path!r}: give a JSON config file or one of "
                   f"{', '.join(sorted(BUILTIN_MODEL_CONFIGS))} (more with open_clip installed)")


def _square(value, what: str) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise UnsupportedArchitectureError(f"{what}={value!r}: expected an int or (h, w)")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _eps(tower_cfg: dict, what: str) -> float:
    kwargs = tower_cfg.get("norm_kwargs") or {}
    unknown = set(kwargs) - {"eps"}
    if unknown:
        raise UnsupportedArchitectureError(f"{what}.norm_kwargs {sorted(unknown)} are not supported (only eps)")
    return float(kwargs.get("eps", DEFAULT_EPS))


def _check_flags(tower_cfg: dict, what: str) -> None:
    problems = [f"{what}.{flag}={tower_cfg[flag]!r}" for flag in _UNSUPPORTED_FLAGS if tower_cfg.get(flag)]
    if tower_cfg.get("block_type") not in (None, "default"):
        problems.append(f"{what}.block_type={tower_cfg['block_type']!r}")
    if tower_cfg.get("ls_init_value") is not None:
        problems.append(f"{what}.ls_init_value={tower_cfg['ls_init_value']!r} (layer scale)")
    if tower_cfg.get("act_kwargs"):
        problems.append(f"{what}.act_kwargs={tower_cfg['act_kwargs']!r}")
    for key in ("hf_model_name", "timm_model_name"):
        if tower_cfg.get(key):
            problems.append(f"{what}.{key}={tower_cfg[key]!r} (not a ViT/text transformer tower)")
    if problems:
        raise UnsupportedArchitectureError(
            "this open_clip model uses features the project's CLIP does not implement: " + "; ".join(problems))


def clip_config_from_openclip(model_cfg: Mapping) -> CLIPConfig:
    """Our `CLIPConfig` for an open_clip model config (embed_dim, quick_gelu, vision_cfg, text_cfg).

    Raises `UnsupportedArchitectureError` naming each feature our towers lack (layer scale,
    attentional pooling, timm/HF towers, SigLIP's logit bias, ...).
    """
    top_problems = []
    if model_cfg.get("init_logit_bias") is not None:
        top_problems.append(f"init_logit_bias={model_cfg['init_logit_bias']} (SigLIP logit bias)")
    if model_cfg.get("nonscalar_logit_scale"):
        top_problems.append("nonscalar_logit_scale=true")
    if model_cfg.get("multimodal_cfg"):
        top_problems.append("multimodal_cfg (CoCa text decoder)")
    if top_problems:
        raise UnsupportedArchitectureError("this open_clip model uses features the project's CLIP does not "
                                           "implement: " + "; ".join(top_problems))
    vcfg = {**_VISION_DEFAULTS, **(model_cfg.get("vision_cfg") or {})}
    tcfg = {**_TEXT_DEFAULTS, **(model_cfg.get("text_cfg") or {})}
    _check_flags(vcfg, "vision_cfg")
    _check_flags(tcfg, "text_cfg")
    if isinstance(vcfg["layers"], (list, tuple)):
        raise UnsupportedArchitectureError(f"vision_cfg.layers={vcfg['layers']!r}: ModifiedResNet towers are not "
                                           "supported (ViT only)")
    if vcfg["pos_embed_type"] != "learnable":
        raise UnsupportedArchitectureError(f"vision_cfg.pos_embed_type={vcfg['pos_embed_type']!r}: only learnable")
    if vcfg["pool_type"] not in ("tok", "avg"):
        raise UnsupportedArchitectureError(f"vision_cfg.pool_type={vcfg['pool_type']!r}: only tok or avg")
    if vcfg["pool_type"] == "avg" and vcfg.get("final_ln_after_pool"):
        raise UnsupportedArchitectureError("vision_cfg.final_ln_after_pool with pool_type=avg: our tower "
                                           "normalises tokens before pooling")
    if tcfg["pool_type"] not in ("argmax", "eos"):
        raise UnsupportedArchitectureError(f"text_cfg.pool_type={tcfg['pool_type']!r}: only argmax or eos")
    if tcfg["proj_type"] != "linear":
        raise UnsupportedArchitectureError(f"text_cfg.proj_type={tcfg['proj_type']!r}: only linear")
    img_h, img_w = _square(vcfg["image_size"], "vision_cfg.image_size")
    patch_h, patch_w = _square(vcfg["patch_size"], "vision_cfg.patch_size")
    if patch_h != patch_w:
        raise UnsupportedArchitectureError(f"vision_cfg.patch_size={vcfg['patch_size']!r}: only square patches")
    width = int(vcfg["width"])
    if width % int(vcfg["head_width"]):
        raise UnsupportedArchitectureError(f"vision_cfg: width {width} is not a multiple of head_width "
                                           f"{vcfg['head_width']}")
    check_divisible(int(tcfg["width"]), int(tcfg["heads"]), "text_cfg")
    activation = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    embed_dim = int(model_cfg["embed_dim"])
    vision = VisionConfig(
        patch_dim=patch_h, img_h=img_h, img_w=img_w, num_channels=3, class_token_length=1,
        global_average_pool=vcfg["pool_type"] == "avg", output_dim=embed_dim,
        num_layers=int(vcfg["layers"]), hidden_size=width, ffn_hidden_size=ffn_size(width, float(vcfg["mlp_ratio"])),
        num_attention_heads=width // int(vcfg["head_width"]), layernorm_epsilon=_eps(vcfg, "vision_cfg"),
        activation=activation,
    )
    text = TextConfig(
        vocab_size=int(tcfg["vocab_size"]), encoder_seq_length=int(tcfg["context_length"]), output_dim=embed_dim,
        num_layers=int(tcfg["layers"]), hidden_size=int(tcfg["width"]),
        ffn_hidden_size=ffn_size(int(tcfg["width"]), float(tcfg["mlp_ratio"])),
        num_attention_heads=int(tcfg["heads"]), layernorm_epsilon=_eps(tcfg, "text_cfg"), activation=activation,
        eot_token_id=-1 if tcfg["pool_type"] == "argmax" else int(tcfg["eos_id"]),
    )
    return CLIPConfig(output_dim=embed_dim, vision=vision, text=text)


def _mlp_ratio(width: int, ffn: int) -> float:
    """A ratio open_clip turns back into exactly `ffn` with int(width * ratio)."""
    for ratio in (ffn / width, round(ffn / width, 4), (ffn + 0.5) / width):
        if int(width * ratio) == ffn:
            return ratio
    raise UnsupportedArchitectureError(f"no open_clip mlp_ratio gives ffn_hidden_size={ffn} at width {width}")


def openclip_config_from_clip(cfg: CLIPConfig) -> dict:
    """The open_clip model config (as in open_clip's model_configs/*.json) of our `CLIPConfig`."""
    v, t = cfg.vision, cfg.text
    v_out, t_out = output_dims(cfg)
    problems = []
    if v.class_token_length != 1:
        problems.append(f"model.vision.class_token_length={v.class_token_length} (open_clip has one class token)")
    if v.num_channels != 3:
        problems.append(f"model.vision.num_channels={v.num_channels} (open_clip's conv1 takes 3)")
    if v_out != t_out:
        problems.append(f"vision output_dim {v_out} != text output_dim {t_out} (open_clip has one embed_dim)")
    if v.activation != t.activation:
        problems.append(f"vision activation {v.activation} != text activation {t.activation} (one quick_gelu flag)")
    for tower in (v, t):
        if tower.activation not in ("gelu", "quick_gelu"):
            problems.append(f"activation {tower.activation!r} (open_clip: gelu or quick_gelu)")
    if v.hidden_size % v.num_attention_heads:
        problems.append("vision hidden_size not divisible by num_attention_heads")
    if problems:
        raise UnsupportedArchitectureError("cannot express this CLIP as an open_clip model: " + "; ".join(problems))
    vision_cfg = {
        "image_size": v.img_h if v.img_h == v.img_w else [v.img_h, v.img_w],
        "layers": v.num_layers, "width": v.hidden_size, "head_width": v.hidden_size // v.num_attention_heads,
        "mlp_ratio": _mlp_ratio(v.hidden_size, v.ffn_hidden_size), "patch_size": v.patch_dim,
    }
    if v.global_average_pool:
        vision_cfg["pool_type"] = "avg"
    text_cfg = {
        "context_length": t.encoder_seq_length, "vocab_size": t.vocab_size, "width": t.hidden_size,
        "heads": t.num_attention_heads, "layers": t.num_layers,
        "mlp_ratio": _mlp_ratio(t.hidden_size, t.ffn_hidden_size),
    }
    if t.eot_token_id >= 0:
        text_cfg.update(pool_type="eos", eos_id=t.eot_token_id)
    for section, tower in ((vision_cfg, v), (text_cfg, t)):
        if tower.layernorm_epsilon != DEFAULT_EPS:
            section["norm_kwargs"] = {"eps": tower.layernorm_epsilon}
    out = {"embed_dim": v_out, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    if v.activation == "quick_gelu":
        out["quick_gelu"] = True
    return out


def _text_prefix(state: Mapping) -> str:
    """'' for open_clip's CLIP (text tower at the top level), 'text.' for CustomTextCLIP."""
    return "text." if "text.token_embedding.weight" in state else ""


def expected_openclip_shapes(cfg: CLIPConfig, text_prefix: str = "") -> dict:
    """Name -> shape of open_clip's state dict for the model our `cfg` describes."""
    v, t = cfg.vision, cfg.text
    v_out, t_out = output_dims(cfg)
    vw, tw = v.hidden_size, t.hidden_size
    shapes = {
        "logit_scale": (),
        "visual.class_embedding": (vw,),
        "visual.positional_embedding": (v.seq_length, vw),
        "visual.proj": (vw, v_out),
        "visual.conv1.weight": (vw, v.num_channels, v.patch_dim, v.patch_dim),
        "visual.ln_pre.weight": (vw,), "visual.ln_pre.bias": (vw,),
    }
    shapes.update(_resblock_shapes("visual.transformer", v.num_layers, vw, v.ffn_hidden_size))
    shapes.update({"visual.ln_post.weight": (vw,), "visual.ln_post.bias": (vw,)})
    p = text_prefix
    shapes.update({p + "text_projection": (tw, t_out), p + "positional_embedding": (t.encoder_seq_length, tw),
                   p + "token_embedding.weight": (t.vocab_size, tw)})
    shapes.update(_resblock_shapes(p + "transformer", t.num_layers, tw, t.ffn_hidden_size))
    shapes.update({p + "ln_final.weight": (tw,), p + "ln_final.bias": (tw,)})
    return shapes


def _resblock_shapes(prefix: str, layers: int, width: int, ffn: int) -> dict:
    shapes = {}
    for i in range(layers):
        p = f"{prefix}.resblocks.{i}."
        shapes.update({
            p + "ln_1.weight": (width,), p + "ln_1.bias": (width,),
            p + "attn.in_proj_weight": (3 * width, width), p + "attn.in_proj_bias": (3 * width,),
            p + "attn.out_proj.weight": (width, width), p + "attn.out_proj.bias": (width,),
            p + "ln_2.weight": (width,), p + "ln_2.bias": (width,),
            p + "mlp.c_fc.weight": (ffn, width), p + "mlp.c_fc.bias": (ffn,),
            p + "mlp.c_proj.weight": (width, ffn), p + "mlp.c_proj.bias": (width,),
        })
    return shapes


# (open_clip name within a resblock, our name within a layer) for the one-to-one tensors.
_LAYER_MAP = (("ln_1.weight", LN1_W), ("ln_1.bias", LN1_B), ("attn.out_proj.weight", PROJ_W),
              ("attn.out_proj.bias", PROJ_B), ("ln_2.weight", LN2_W), ("ln_2.bias", LN2_B),
              ("mlp.c_fc.weight", FC1_W), ("mlp.c_fc.bias", FC1_B), ("mlp.c_proj.weight", FC2_W),
              ("mlp.c_proj.bias", FC2_B))


def _layers_in(src: Mapping, dst: dict, src_prefix: str, dst_prefix: str, layers: int, heads: int) -> None:
    for i in range(layers):
        s, d = f"{src_prefix}.resblocks.{i}.", f"{dst_prefix}.layers.{i}."
        for oc_name, our_name in _LAYER_MAP:
            dst[d + our_name] = src[s + oc_name]
        dst[d + QKV_W] = fuse_qkv(*src[s + "attn.in_proj_weight"].chunk(3, dim=0), heads)
        dst[d + QKV_B] = fuse_qkv(*src[s + "attn.in_proj_bias"].chunk(3, dim=0), heads)


def _layers_out(src: Mapping, dst: dict, src_prefix: str, dst_prefix: str, layers: int, heads: int) -> None:
    for i in range(layers):
        s, d = f"{src_prefix}.layers.{i}.", f"{dst_prefix}.resblocks.{i}."
        for oc_name, our_name in _LAYER_MAP:
            dst[d + oc_name] = src[s + our_name]
        dst[d + "attn.in_proj_weight"] = torch.cat(split_qkv(src[s + QKV_W], heads), dim=0)
        dst[d + "attn.in_proj_bias"] = torch.cat(split_qkv(src[s + QKV_B], heads), dim=0)


def openclip_to_clip_state_dict(state: Mapping, cfg: CLIPConfig) -> dict:
    """open_clip state dict -> our full (TP=1) state dict for `CLIPModel(cfg)`.

    Checks every key and shape first and raises one `CheckpointMismatchError` listing them all.
    """
    p = _text_prefix(state)
    check_keys_and_shapes(state, expected_openclip_shapes(cfg, p), "open_clip state dict",
                          ignore=IGNORED_KEYS,
                          hint="(is --model-name / the model config the one this checkpoint was trained with?)")
    v, t = cfg.vision, cfg.text
    out = {
        "logit_scale": state["logit_scale"].reshape(()),
        "visual.class_embedding": state["visual.class_embedding"].reshape(1, -1),
        "visual.positional_embedding": state["visual.positional_embedding"],
        "visual.conv1.weight": state["visual.conv1.weight"],
        "visual.ln_pre.weight": state["visual.ln_pre.weight"],
        "visual.ln_pre.bias": state["visual.ln_pre.bias"],
    }
    _layers_in(state, out, "visual.transformer", "visual.transformer", v.num_layers, v.num_attention_heads)
    out["visual.transformer.final_layernorm.weight"] = state["visual.ln_post.weight"]
    out["visual.transformer.final_layernorm.bias"] = state["visual.ln_post.bias"]
    out["visual.proj.weight"] = state["visual.proj"].t().contiguous()
    out["text.positional_embedding"] = state[p + "positional_embedding"]
    out["text.token_embedding.weight"] = with_vocab_rows(
        state[p + "token_embedding.weight"], padded_vocab(t.vocab_size, t.make_vocab_size_divisible_by))
    _layers_in(state, out, p + "transformer", "text.transformer", t.num_layers, t.num_attention_heads)
    out["text.transformer.final_layernorm.weight"] = state[p + "ln_final.weight"]
    out["text.transformer.final_layernorm.bias"] = state[p + "ln_final.bias"]
    out["text.text_projection.weight"] = state[p + "text_projection"].t().contiguous()
    return add_extra_states(out, cfg)


def clip_to_openclip_state_dict(state: Mapping, cfg: CLIPConfig, text_prefix: str = "") -> dict:
    """Our full (TP=1) state dict -> open_clip's (`CLIP` layout; `text_prefix='text.'` for
    `CustomTextCLIP`). The token embedding is trimmed to `cfg.text.vocab_size` rows."""
    openclip_config_from_clip(cfg)  # raises for what open_clip cannot express
    check_clip_state_dict(state, cfg)
    v, t = cfg.vision, cfg.text
    p = text_prefix
    out = {
        "logit_scale": state["logit_scale"].reshape(()),
        "visual.class_embedding": state["visual.class_embedding"].reshape(-1),
        "visual.positional_embedding": state["visual.positional_embedding"],
        "visual.proj": state["visual.proj.weight"].t().contiguous(),
        "visual.conv1.weight": state["visual.conv1.weight"],
        "visual.ln_pre.weight": state["visual.ln_pre.weight"],
        "visual.ln_pre.bias": state["visual.ln_pre.bias"],
    }
    _layers_out(state, out, "visual.transformer", "visual.transformer", v.num_layers, v.num_attention_heads)
    out["visual.ln_post.weight"] = state["visual.transformer.final_layernorm.weight"]
    out["visual.ln_post.bias"] = state["visual.transformer.final_layernorm.bias"]
    out[p + "text_projection"] = state["text.text_projection.weight"].t().contiguous()
    out[p + "positional_embedding"] = state["text.positional_embedding"]
    out[p + "token_embedding.weight"] = state["text.token_embedding.weight"][: t.vocab_size]
    _layers_out(state, out, "text.transformer", p + "transformer", t.num_layers, t.num_attention_heads)
    out[p + "ln_final.weight"] = state["text.transformer.final_layernorm.weight"]
    out[p + "ln_final.bias"] = state["text.transformer.final_layernorm.bias"]
    return out


def openclip_config_from_state_dict(state: Mapping, *, vision_head_width: int = 64, text_heads: Optional[int] = None,
                                    quick_gelu: bool = False, eps: float = DEFAULT_EPS) -> dict:
    """Infer an open_clip model config from tensor shapes (as open_clip does for OpenAI weights).

    Head counts are not visible in the weights: the vision tower's default to width // 64
    (`vision_head_width`) and the text tower's to width // 64 unless `text_heads` is given;
    the activation (`quick_gelu`) cannot be inferred either.
    """
    p = _text_prefix(state)
    try:
        width, _, patch, _ = state["visual.conv1.weight"].shape
        layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        ffn = state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        embed_dim = state[p + "text_projection"].shape[1]
        vocab, t_width = state[p + "token_embedding.weight"].shape
        context = state[p + "positional_embedding"].shape[0]
        t_blocks = p + "transformer.resblocks."
        t_layers = len({k[len(t_blocks):].split(".")[0] for k in state if k.startswith(t_blocks)})
        t_ffn = state[p + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as exc:
        raise UnsupportedArchitectureError(f"cannot infer an open_clip ViT config from this state dict ({exc!r}); "
                                           "pass --model-name or --model-config") from exc
    vision_cfg = {"image_size": grid * patch, "layers": layers, "width": width, "head_width": vision_head_width,
                  "mlp_ratio": _mlp_ratio(width, ffn), "patch_size": patch}
    text_cfg = {"context_length": context, "vocab_size": vocab, "width": t_width,
                "heads": text_heads or t_width // 64, "layers": t_layers, "mlp_ratio": _mlp_ratio(t_width, t_ffn)}
    if eps != DEFAULT_EPS:
        vision_cfg["norm_kwargs"] = text_cfg["norm_kwargs"] = {"eps": eps}
    cfg = {"embed_dim": embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    if quick_gelu:
        cfg["quick_gelu"] = True
    return cfg


def import_openclip(state: Mapping, model_cfg: Mapping) -> tuple[CLIPConfig, dict]:
    """(our CLIPConfig, our full state dict) from an open_clip model config and state dict."""
    cfg = clip_config_from_openclip(model_cfg)
    return cfg, openclip_to_clip_state_dict(state, cfg)


def export_openclip(state: Mapping, cfg: CLIPConfig, text_prefix: str = "",
                    target: Optional[Mapping] = None) -> tuple[dict, dict]:
    """(open_clip model config, open_clip state dict) from our config and full state dict.

    `target`: the open_clip model config to write for (e.g. `openclip_model_config('ViT-g-14')`); it
    must describe the same architecture, except that an MLP padded on import (`pad_ffn`) is trimmed
    back to the target's width. Without it the config is derived from ours.
    """
    if target is None:
        return openclip_config_from_clip(cfg), clip_to_openclip_state_dict(state, cfg, text_prefix)
    target_cfg = clip_config_from_openclip(target)
    trimmable = {f"model.{name}.ffn_hidden_size" for name in ("vision", "text")
                 if getattr(target_cfg, name).ffn_hidden_size < getattr(cfg, name).ffn_hidden_size}
    diffs = [d for d in architecture_differences(cfg, target_cfg) if d.split(":")[0] not in trimmable]
    if diffs:
        raise UnsupportedArchitectureError("the checkpoint's model differs from the target open_clip config: "
                                           + "; ".join(diffs))
    if trimmable:  # MLP units padded on import (pad_ffn); trim_ffn refuses units that are not zero padding
        check_clip_state_dict(state, cfg)
        cfg, state = trim_ffn(cfg, state, target_cfg.vision.ffn_hidden_size, target_cfg.text.ffn_hidden_size)
    return json.loads(json.dumps(dict(target))), clip_to_openclip_state_dict(state, cfg, text_prefix)


# open_clip's `local-dir:` layout (open_clip.create_model('local-dir:/path') reads it).
OPENCLIP_CONFIG_NAME = "open_clip_config.json"
OPENCLIP_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                         "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")


def read_openclip(path: str) -> tuple[dict, Optional[dict], Optional[dict]]:
    """(state dict, model config or None, preprocess config or None) from a state dict file, or
    from a `local-dir:` directory holding open_clip_config.json and open_clip_model.safetensors."""
    if os.path.isdir(path):
        config_path = os.path.join(path, OPENCLIP_CONFIG_NAME)
        model_cfg = preprocess_cfg = None
        if os.path.isfile(config_path):
            try:
                with open(config_path) as f:
                    full = json.load(f)
            except (OSError, ValueError) as exc:
                raise CheckpointFileError(config_path, f"truncated or corrupt JSON ({exc})") from exc
            model_cfg, preprocess_cfg = full.get("model_cfg", full), full.get("preprocess_cfg")
        for name in OPENCLIP_WEIGHT_NAMES:
            weights = os.path.join(path, name)
            if os.path.isfile(weights):
                return load_tensor_file(weights), model_cfg, preprocess_cfg
        raise CheckpointFileError(os.path.join(path, OPENCLIP_WEIGHT_NAMES[0]),
                                  f"no such file (nor {', '.join(OPENCLIP_WEIGHT_NAMES[1:])})")
    return load_tensor_file(path), None, None


def write_openclip(state: Mapping, model_cfg: Mapping, out: str, dtype: Optional[torch.dtype] = None,
                   image_mean=None, image_std=None) -> list[str]:
    """Write an open_clip state dict. `out` ending in .safetensors/.pt/.pth/.bin: that one file
    (plus `<out>.json`, the model config); otherwise a directory in open_clip's `local-dir:` layout
    (open_clip_config.json + open_clip_model.safetensors). Returns the paths written."""
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    if out.endswith((".safetensors", ".pt", ".pth", ".bin")):
        weights, config_path, config = out, out + ".json", dict(model_cfg)
    else:
        os.makedirs(out, exist_ok=True)
        weights, config_path = os.path.join(out, OPENCLIP_WEIGHT_NAMES[0]), os.path.join(out, OPENCLIP_CONFIG_NAME)
        config = {"model_cfg": dict(model_cfg),
                  "preprocess_cfg": {"size": model_cfg["vision_cfg"]["image_size"], "mode": "RGB",
                                     "mean": list(image_mean or CLIP_MEAN), "std": list(image_std or CLIP_STD),
                                     "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}}
    save_tensor_file(state, weights)
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return [weights, config_path]
