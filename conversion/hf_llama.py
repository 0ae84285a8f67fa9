"""Hugging Face `LlamaForCausalLM` (a directory: config.json + safetensors, sharded or not) <-> this
project's LLM.

HF layout (per layer i, under model.layers.i.):

    input_layernorm.weight                   -> decoder.layers.i.input_layernorm.weight
    self_attn.{q,k,v}_proj.weight            -> decoder.layers.i.self_attention.linear_qkv.weight
                                                (megatron's per-group interleaving, llm_layout.fuse_qkv_gqa)
    self_attn.o_proj.weight                  -> decoder.layers.i.self_attention.linear_proj.weight
    post_attention_layernorm.weight          -> decoder.layers.i.pre_mlp_layernorm.weight
    mlp.{gate,up}_proj.weight                -> decoder.layers.i.mlp.linear_fc1.weight ([gate; up])
    mlp.down_proj.weight                     -> decoder.layers.i.mlp.linear_fc2.weight
    model.embed_tokens.weight                -> embedding.word_embeddings.weight (zero rows pad the vocab)
    model.norm.weight                        -> decoder.final_layernorm.weight
    lm_head.weight (absent when tied)        -> output_layer.weight (absent when tied)

No permutation of q/k is needed: HF's checkpoints (and megatron's non-interleaved RoPE) rotate
halves. Everything goes through the *full* (TP=1, PP=1) state dict of `LLMModel`: cut it for a
TP rank / PP stage with `parallel.tp_sharding.shard_full_state_dict` and
`parallel.pp_sharding.stage_state_from_full` (fc1's strided TP split is handled there). Unsupported
HF options (attention or MLP biases, sliding windows, other RoPE scalings, other activations) are
named in the error. Neither `transformers` nor a process group is needed.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from conversion.clip_layout import (
    CheckpointFileError,
    UnsupportedArchitectureError,
    check_keys_and_shapes,
    padded_vocab,
    with_vocab_rows,
)
from conversion.hf_dir import (
    CONFIG_NAME,
    dtype_name,
    read_hf_weights,
    read_json,
    write_hf_weights,
    write_json,
)
from conversion.llm_layout import (
    EMBEDDING,
    FC1,
    FC2,
    FINAL_NORM,
    INPUT_NORM,
    LAYER,
    MLP_NORM,
    OUTPUT,
    PROJ,
    QKV,
    add_llm_extra_states,
    check_llm_state_dict,
    fuse_gate_up,
    fuse_qkv_gqa,
    split_gate_up,
    split_qkv_gqa,
)
from models.llm.config import LLMConfig, RopeScalingConfig

# transformers' LlamaConfig defaults: a config.json written by save_pretrained leaves these out.
HF_LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048,
                     "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0,
                     "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved
HF_LAYER = "model.layers.{}."
_NORMS_AND_LINEARS = (("input_layernorm.weight", INPUT_NORM), ("self_attn.o_proj.weight", PROJ),
                      ("post_attention_layernorm.weight", MLP_NORM), ("mlp.down_proj.weight", FC2))


def _rope(hf: Mapping) -> tuple[float, RopeScalingConfig]:
    """(rope_theta, scaling) from either transformers 5's `rope_parameters` or the older
    `rope_theta` + `rope_scaling` (what Meta's config.json files hold)."""
    params = hf.get("rope_parameters")
    if isinstance(params, Mapping) and params:
        theta, scaling = params.get("rope_theta", hf.get("rope_theta", HF_LLAMA_DEFAULTS["rope_theta"])), params
    else:
        theta, scaling = hf.get("rope_theta", HF_LLAMA_DEFAULTS["rope_theta"]), hf.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind in (None, "default"):
        return float(theta), RopeScalingConfig()
    if kind != "llama3":
        raise UnsupportedArchitectureError(f"rope_scaling type {kind!r}: only 'llama3' scaling (or none) is implemented")
    return float(theta), RopeScalingConfig(
        "llama3", float(scaling["factor"]), float(scaling.get("low_freq_factor", 1.0)),
        float(scaling.get("high_freq_factor", 4.0)), int(scaling.get("original_max_position_embeddings", 8192)))


def hf_llama_config_to_llm_config(hf_config: Mapping, untie_embeddings: bool = False, **overrides) -> LLMConfig:
    """Our `LLMConfig` from a Hugging Face Llama config.json dict.

    `untie_embeddings`: a tied model gets its own output layer (a copy of the embedding), which
    pipeline parallelism needs. `overrides`: LLMConfig fields for training (seq_length, dropout,
    attention_backend, make_vocab_size_divisible_by, ...).
    """
    hf = {**HF_LLAMA_DEFAULTS, **hf_config}
    model_type = hf.get("model_type", "llama")
    problems = []
    if model_type != "llama":
        problems.append(f"model_type={model_type!r} (only 'llama' is supported)")
    if hf["hidden_act"] != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (Llama's MLP is SwiGLU: silu)")
    if hf["attention_bias"]:
        problems.append("attention_bias=true (biases on q/k/v/o projections)")
    if hf["mlp_bias"]:
        problems.append("mlp_bias=true (biases on gate/up/down projections)")
    if hf.get("sliding_window") or hf.get("use_sliding_window"):
        problems.append(f"sliding_window={hf.get('sliding_window')!r} (attention is full causal)")
    heads = int(hf["num_attention_heads"])
    groups = int(hf.get("num_key_value_heads") or heads)
    hidden = int(hf["hidden_size"])
    head_dim = int(hf.get("head_dim") or hidden // heads)
    if heads % groups:
        problems.append(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={groups}")
    if problems:
        raise UnsupportedArchitectureError("cannot import this Hugging Face model as the project's LLM: "
                                           + "; ".join(problems))
    theta, scaling = _rope(hf)
    tied = bool(hf["tie_word_embeddings"])
    max_pos = int(hf["max_position_embeddings"])
    fields = dict(
        num_layers=int(hf["num_hidden_layers"]), hidden_size=hidden, ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=heads, num_query_groups=groups,
        kv_channels=None if head_dim * heads == hidden else head_dim,
        seq_length=min(max_pos, 4096), max_position_embeddings=max_pos, vocab_size=int(hf["vocab_size"]),
        normalization="RMSNorm", activation="swiglu", add_bias_linear=False, rotary_base=theta,
        rope_scaling=scaling, share_embeddings_and_output_weights=tied and not untie_embeddings,
        layernorm_epsilon=float(hf["rms_norm_eps"]), init_method_std=float(hf.get("initializer_range", 0.02)),
        attention_dropout=float(hf["attention_dropout"]))
    fields.update(overrides)
    return LLMConfig(**fields)


def llm_config_to_hf_config(cfg: LLMConfig, dtype: torch.dtype | None = None, **extra) -> dict:
    """A Hugging Face Llama config.json dict (loads with `LlamaForCausalLM.from_pretrained`).
    `extra`: more keys, e.g. bos_token_id / eos_token_id / pad_token_id from the tokenizer."""
    problems = []
    if cfg.normalization != "RMSNorm":
        problems.append(f"model.normalization={cfg.normalization!r} (HF Llama: RMSNorm)")
    if cfg.activation != "swiglu":
        problems.append(f"model.activation={cfg.activation!r} (HF Llama: swiglu)")
    if cfg.add_bias_linear or cfg.add_qkv_bias:
        problems.append("linear biases (HF Llama has attention_bias and mlp_bias, not megatron's)")
    if cfg.qk_layernorm:
        problems.append("model.qk_layernorm=true (HF Llama has no qk-norm)")
    if cfg.rotary_percent != 1.0:
        problems.append(f"model.rotary_percent={cfg.rotary_percent} (HF Llama rotates the whole head)")
    if problems:
        raise UnsupportedArchitectureError("cannot express this LLM as a Hugging Face LlamaForCausalLM: "
                                           + "; ".join(problems))
    out = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.query_groups,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.layernorm_epsilon, "initializer_range": cfg.init_method_std,
        "tie_word_embeddings": cfg.share_embeddings_and_output_weights, "rope_theta": cfg.rotary_base,
        "rope_scaling": None, "attention_bias": False, "mlp_bias": False, "attention_dropout": cfg.attention_dropout,
        "pretraining_tp": 1, "use_cache": True,
    }
    if cfg.rope_scaling.type == "llama3":
        rs = cfg.rope_scaling
        out["rope_scaling"] = {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                               "high_freq_factor": rs.high_freq_factor,
                               "original_max_position_embeddings": rs.original_max_position_embeddings}
    if dtype is not None:
        out["torch_dtype"] = dtype_name(dtype)
    out.update(extra)
    return out


def expected_hf_llama_shapes(cfg: LLMConfig, tied: bool | None = None) -> dict:
    h, d, heads, groups = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.query_groups
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not (cfg.share_embeddings_and_output_weights if tied is None else tied):
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        p = HF_LAYER.format(i)
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (heads * d, h), p + "self_attn.k_proj.weight": (groups * d, h),
                       p + "self_attn.v_proj.weight": (groups * d, h), p + "self_attn.o_proj.weight": (h, heads * d),
                       p + "mlp.gate_proj.weight": (cfg.ffn_hidden_size, h),
                       p + "mlp.up_proj.weight": (cfg.ffn_hidden_size, h),
                       p + "mlp.down_proj.weight": (h, cfg.ffn_hidden_size)})
    return shapes


def hf_to_engine_state_dict(hf_state: Mapping, cfg: LLMConfig) -> dict:
    """HF LlamaForCausalLM state dict -> the full (TP=1/PP=1) state dict of `LLMModel(cfg)`, the
    vocabulary zero-padded to megatron's multiple. A tied HF model (no lm_head) imported untied
    gets a copy of the embedding as its output layer."""
    hf_state = {k: v for k, v in hf_state.items() if not k.endswith(IGNORED_SUFFIXES)}
    hf_tied = "lm_head.weight" not in hf_state
    if hf_tied and not cfg.share_embeddings_and_output_weights and "model.embed_tokens.weight" in hf_state:
        hf_state["lm_head.weight"] = hf_state["model.embed_tokens.weight"]
    tied_in_hf = "lm_head.weight" not in hf_state
    check_keys_and_shapes(hf_state, expected_hf_llama_shapes(cfg, tied=tied_in_hf), "Hugging Face Llama state dict",
                          hint="(does config.json describe these weights?)")
    if tied_in_hf != cfg.share_embeddings_and_output_weights:
        raise UnsupportedArchitectureError("the weights have an lm_head.weight but the config ties it to the embedding "
                                           "(model.share_embeddings_and_output_weights=true)")
    rows = padded_vocab(cfg.vocab_size, cfg.make_vocab_size_divisible_by)
    heads, groups = cfg.num_attention_heads, cfg.query_groups
    out = {EMBEDDING: with_vocab_rows(hf_state["model.embed_tokens.weight"], rows),
           FINAL_NORM: hf_state["model.norm.weight"]}
    if not cfg.share_embeddings_and_output_weights:
        out[OUTPUT] = with_vocab_rows(hf_state["lm_head.weight"], rows)
    for i in range(cfg.num_layers):
        s, d = HF_LAYER.format(i), LAYER.format(i)
        for hf_name, ours in _NORMS_AND_LINEARS:
            out[d + ours] = hf_state[s + hf_name]
        q, k, v = (hf_state[s + f"self_attn.{x}_proj.weight"] for x in "qkv")
        out[d + QKV] = fuse_qkv_gqa(q, k, v, heads, groups)
        out[d + FC1] = fuse_gate_up(hf_state[s + "mlp.gate_proj.weight"], hf_state[s + "mlp.up_proj.weight"])
    return add_llm_extra_states(out, cfg)


def engine_to_hf_state_dict(state: Mapping, cfg: LLMConfig) -> dict:
    """The full (TP=1/PP=1) state dict of `LLMModel(cfg)` -> HF LlamaForCausalLM's (vocabulary
    padding trimmed; no lm_head.weight when tied, as save_pretrained writes it)."""
    llm_config_to_hf_config(cfg)  # raises for what HF Llama cannot express
    check_llm_state_dict(state, cfg)
    heads, groups = cfg.num_attention_heads, cfg.query_groups
    out = {"model.embed_tokens.weight": state[EMBEDDING][: cfg.vocab_size], "model.norm.weight": state[FINAL_NORM]}
    if not cfg.share_embeddings_and_output_weights:
        out["lm_head.weight"] = state[OUTPUT][: cfg.vocab_size]
    for i in range(cfg.num_layers):
        s, d = LAYER.format(i), HF_LAYER.format(i)
        for hf_name, ours in _NORMS_AND_LINEARS:
            out[d + hf_name] = state[s + ours]
        for x, tensor in zip("qkv", split_qkv_gqa(state[s + QKV], heads, groups)):
            out[d + f"self_attn.{x}_proj.weight"] = tensor
        out[d + "mlp.gate_proj.weight"], out[d + "mlp.up_proj.weight"] = split_gate_up(state[s + FC1])
    return out


def read_hf_llama(directory: str) -> tuple[dict, dict]:
    """(config.json dict, state dict) of a HF Llama model directory."""
    if not os.path.isdir(directory):
        raise CheckpointFileError(directory, "not a directory (expected a Hugging Face model directory)")
    return read_json(os.path.join(directory, CONFIG_NAME)), read_hf_weights(directory)


def import_hf_llama(directory: str, untie_embeddings: bool = False, **overrides) -> tuple[LLMConfig, dict]:
    """(our LLMConfig, our full TP=1/PP=1 state dict) from a HF Llama model directory."""
    hf_config, state = read_hf_llama(directory)
    cfg = hf_llama_config_to_llm_config(hf_config, untie_embeddings=untie_embeddings, **overrides)
    return cfg, hf_to_engine_state_dict(state, cfg)


def export_hf_llama(state: Mapping, cfg: LLMConfig, directory: str, dtype: torch.dtype | None = None,
                    max_shard_bytes: int | None = None, **config_extra) -> None:
    """Write a HF Llama model directory (config.json + safetensors, sharded above `max_shard_bytes`)."""
    hf_state = engine_to_hf_state_dict(state, cfg)
    if dtype is not None:
        hf_state = {k: v.to(dtype) for k, v in hf_state.items()}
    weight_dtype = hf_state["model.embed_tokens.weight"].dtype
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    write_hf_weights(hf_state, directory, **kwargs)
    write_json(llm_config_to_hf_config(cfg, weight_dtype, **config_extra), os.path.join(directory, CONFIG_NAME))
