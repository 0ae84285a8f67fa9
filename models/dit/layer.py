"""DiT layers on megatron-core: a `TransformerLayer` whose norms are modulated by the timestep
embedding (adaLN-zero, DiT / Lumina-Next), and the timestep embedder.

The layer spec is the shared one (`models.common.spec.transformer_layer_spec`: megatron's
`SelfAttention` with column/row-parallel linears and the configured core attention, megatron's MLP)
with two changes: the layer class, and affine-free input and pre-MLP norms (the modulation supplies
scale and shift). So TP, SP, recompute and checkpoint naming are megatron-core's.

The conditioning vector c [b, h] reaches every layer through the block's `context` argument
(megatron's `TransformerBlock` hands `context` to each layer and through full recompute); there is
no cross-attention, so nothing else reads it. Each layer computes

    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = Linear(SiLU(c))       (zero-initialised)
    x = x + gate_a * Attention(LN(x) * (1 + scale_a) + shift_a)
    x = x + gate_m * MLP(LN(x) * (1 + scale_m) + shift_m)

so at initialisation every layer is the identity (adaLN-zero).

Replicated conditioning parameters under tensor parallelism: c and the modulation are the same on
every TP rank. Without sequence parallelism the hidden states are replicated too, so every rank
gets the full gradient. With sequence parallelism each rank modulates only its slice of the
sequence: the modulation's parameters get partial gradients, marked `sequence_parallel` for the
engine's TP sum (as the norms), and the gradient reaching c is partial as well, which the model
sums over TP where c enters the sequence-parallel region (`copy_to_tensor_model_parallel_region`,
see models/dit/model.py).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor

from models.common.spec import transformer_layer_spec


class AffineFreeLayerNorm:
    """Spec-compatible LayerNorm without gain or bias (adaLN supplies them): no parameters, so
    nothing to sum over TP under sequence parallelism."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **_unused) -> torch.nn.Module:
        return torch.nn.LayerNorm(hidden_size, eps=eps, elementwise_affine=False)


def modulation_linear(config: TransformerConfig, chunks: int) -> torch.nn.Linear:
    """SiLU(c) -> chunks x hidden modulation, zero-initialised; its gradient is summed over TP
    under sequence parallelism (each rank modulates its slice of the sequence)."""
    linear = torch.nn.Linear(config.hidden_size, chunks * config.hidden_size, dtype=config.params_dtype)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    for param in linear.parameters():
        param.sequence_parallel = bool(config.sequence_parallel)
    return linear


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [s, b, h] with per-sample shift/scale [b, h]."""
    return x * (1 + scale.unsqueeze(0)) + shift.unsqueeze(0)


class AdaLNTransformerLayer(TransformerLayer):
    """megatron-core's TransformerLayer with adaLN-zero modulation from `context` (the conditioning
    vector [b, h]); attention and MLP are the spec's modules."""

    def __init__(self, config: TransformerConfig, submodules, layer_number: int = 1, hidden_dropout=None, **kwargs):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         hidden_dropout=hidden_dropout, **kwargs)
        self.adaLN_modulation = modulation_linear(config, 6)

    def _residual(self, x: torch.Tensor, output_with_bias, gate: torch.Tensor) -> torch.Tensor:
        out, bias = output_with_bias
        if bias is not None:
            out = out + bias
        out = F.dropout(out, p=self.hidden_dropout, training=self.training)
        return x + gate.unsqueeze(0) * out

    def forward(self, hidden_states, attention_mask=None, context=None, context_mask=None, rotary_pos_emb=None,
                attention_bias=None, packed_seq_params=None, **_unused):
        if context is None:
            raise ValueError("AdaLNTransformerLayer needs the conditioning vector as `context` [batch, hidden]")
        mod = self.adaLN_modulation(F.silu(context)).to(hidden_states.dtype)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)
        x = hidden_states
        attn = self.self_attention(modulate(self.input_layernorm(x), shift_a, scale_a), attention_mask=attention_mask,
                                   rotary_pos_emb=rotary_pos_emb, attention_bias=attention_bias,
                                   packed_seq_params=packed_seq_params)
        x = self._residual(x, attn, gate_a)
        x = self._residual(x, self.mlp(modulate(self.pre_mlp_layernorm(x), shift_m, scale_m)), gate_m)
        # Viewless, as megatron's own layer returns it (recompute and the pipeline keep the tensor).
        return make_viewless_tensor(inp=x, requires_grad=x.requires_grad, keep_graph=True), context


def adaln_layer_spec(backend: str = "sdpa") -> ModuleSpec:
    """The shared layer spec (bidirectional attention) with the adaLN layer class and affine-free norms."""
    if backend == "te":
        raise ValueError("attention_backend=te fuses the pre-attention norm into the QKV linear, which leaves no "
                         "place for the adaLN modulation; the DiT runs with sdpa or flash")
    spec = transformer_layer_spec(backend, causal=False, normalization="LayerNorm")
    submodules = dataclasses.replace(spec.submodules, input_layernorm=AffineFreeLayerNorm,
                                     pre_mlp_layernorm=AffineFreeLayerNorm)
    return ModuleSpec(module=AdaLNTransformerLayer, submodules=submodules)


def timestep_features(t: torch.Tensor, dim: int, scale: float = 1000.0, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [b, dim] of t [b] (DiT's: cos then sin of scale * t at geometric frequencies)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (scale * t.float())[:, None] * freqs[None]
    features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        features = torch.cat([features, torch.zeros_like(features[:, :1])], dim=-1)
    return features


class TimestepEmbedder(torch.nn.Module):
    """t -> sinusoidal features -> Linear -> SiLU -> Linear: the conditioning vector c [b, hidden]."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256, scale: float = 1000.0, dtype=torch.float32):
        super().__init__()
        self.frequency_dim, self.scale = frequency_dim, scale
        self.mlp = torch.nn.Sequential(torch.nn.Linear(frequency_dim, hidden_size, dtype=dtype), torch.nn.SiLU(),
                                       torch.nn.Linear(hidden_size, hidden_size, dtype=dtype))
        for layer in (self.mlp[0], self.mlp[2]):
            torch.nn.init.normal_(layer.weight, std=0.02)
            torch.nn.init.zeros_(layer.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_features(t, self.frequency_dim, self.scale)
        return self.mlp(features.to(self.mlp[0].weight.dtype))
