"""This project's LLM state dict layout (that of megatron-core's `GPTModel` with the local spec),
megatron's fused QKV for grouped-query attention, and the fused gate/up projection.

Names and shapes are computed from the config alone (no process group, nothing allocated); a test
checks them against a built `models.llm.model.LLMModel`.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from conversion.clip_layout import check_keys_and_shapes, padded_vocab
from models.llm.config import LLMConfig

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"
LAYER = "decoder.layers.{}."
# Per layer, relative to LAYER.
INPUT_NORM, QKV, PROJ = "input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight"
MLP_NORM, FC1, FC2 = "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"
Q_NORM, K_NORM = "self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"
QKV_BIAS = "self_attention.linear_qkv.bias"
EXTRA_STATES = ("self_attention.linear_proj._extra_state", "self_attention.linear_qkv._extra_state",
                "mlp.linear_fc1._extra_state", "mlp.linear_fc2._extra_state")


def expected_llm_shapes(cfg: LLMConfig, tp: int = 1) -> dict:
    """Name -> shape of `LLMModel(cfg).state_dict()` at TP=1/PP=1 (None for `_extra_state`
    entries); `tp` only changes the vocabulary padding (the full, gathered size)."""
    if cfg.add_bias_linear or cfg.normalization != "RMSNorm":
        raise NotImplementedError("the LLM layout here covers RMSNorm without linear biases (Llama)")
    h, d, heads, groups = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.query_groups
    vocab = padded_vocab(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp)
    shapes = {EMBEDDING: (vocab, h), FINAL_NORM: (h,), "output_layer._extra_state": None}
    if not cfg.share_embeddings_and_output_weights:
        shapes[OUTPUT] = (vocab, h)
    for i in range(cfg.num_layers):
        p = LAYER.format(i)
        shapes.update({p + INPUT_NORM: (h,), p + QKV: ((heads + 2 * groups) * d, h), p + PROJ: (h, heads * d),
                       p + MLP_NORM: (h,), p + FC1: (2 * cfg.ffn_hidden_size, h), p + FC2: (h, cfg.ffn_hidden_size)})
        if cfg.add_qkv_bias:
            shapes[p + QKV_BIAS] = ((heads + 2 * groups) * d,)
        if cfg.qk_layernorm:
            shapes[p + Q_NORM] = shapes[p + K_NORM] = (d,)
        for extra in EXTRA_STATES:
            shapes[p + extra] = None
    return shapes


def check_llm_state_dict(state: Mapping, cfg: LLMConfig, what: str = "LLM state dict") -> None:
    """A full (TP=1/PP=1) state dict of our LLM; the vocabulary may carry any amount of padding."""
    expected = expected_llm_shapes(cfg)
    flexible = {EMBEDDING, OUTPUT}
    for name in flexible & expected.keys():
        expected[name] = (cfg.vocab_size, cfg.hidden_size)
    check_keys_and_shapes(state, expected, what, flexible_rows=flexible,
                          hint="(expected the full TP=1/PP=1 state dict of models.llm.model.LLMModel; gather a "
                               "sharded model with parallel.tp_sharding / parallel.pp_sharding)")


def add_llm_extra_states(state: dict, cfg: LLMConfig) -> dict:
    """megatron's `_extra_state` entries (None), so `load_state_dict(strict=True)` accepts the dict."""
    state.setdefault("output_layer._extra_state", None)
    for i in range(cfg.num_layers):
        for extra in EXTRA_STATES:
            state.setdefault(LAYER.format(i) + extra, None)
    return state


def fuse_qkv_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """Separate projections q [heads*d, ...], k and v [groups*d, ...] -> megatron's `linear_qkv`.

    megatron-core's SelfAttention reads the fused output group by group (get_query_key_value_tensors):
    [q heads of group g (heads/groups of them), k_g, v_g] for g = 0..groups-1, head_dim rows each.
    Query head j belongs to group j // (heads/groups), as in Hugging Face's repeat_kv. A TP chunk
    on dim 0 is then a whole set of groups with their query heads.
    """
    d = q.shape[0] // heads
    if q.shape[0] != heads * d or k.shape[0] != groups * d or v.shape[0] != groups * d:
        raise ValueError(f"q/k/v rows {q.shape[0]}/{k.shape[0]}/{v.shape[0]} do not fit {heads} heads and "
                         f"{groups} key/value groups")
    rest = q.shape[1:]
    parts = (q.reshape(groups, heads // groups * d, *rest), k.reshape(groups, d, *rest), v.reshape(groups, d, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv_gqa(qkv: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv_gqa`."""
    rows, rest = qkv.shape[0], qkv.shape[1:]
    d = rows // (heads + 2 * groups)
    if d * (heads + 2 * groups) != rows:
        raise ValueError(f"fused QKV rows {rows} do not fit {heads} heads and {groups} key/value groups")
    grouped = qkv.reshape(groups, (heads // groups + 2) * d, *rest)
    q, k, v = grouped.split([heads // groups * d, d, d], dim=1)
    return (q.reshape(heads * d, *rest).contiguous(), k.reshape(groups * d, *rest).contiguous(),
            v.reshape(groups * d, *rest).contiguous())


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's two input projections -> megatron's `linear_fc1` at TP=1: [gate; up] (the MLP
    computes silu(first half) * second half). At TP > 1 each rank holds [gate_r; up_r]
    (`partition_stride` 2, see parallel.tp_sharding)."""
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()
