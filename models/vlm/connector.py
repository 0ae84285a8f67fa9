"""Connectors from image features [n, s, vision_width] to LLM input embeddings [n, k, llm_width], on
megatron-core's tensor-parallel linears (column-parallel then row-parallel, as an MLP is split):

- `MLPConnector`: LLaVA's `mlp<depth>x_gelu` (LLaVA-1.5: two linears with a GELU between,
  Megatron-LM's `MultimodalProjector` "mlp"); one output vector per feature (k = s).
- `PerceiverResampler`: the seed's resampler (Idefics2 / Flamingo): `n_latents` learned queries, in
  `depth` pre-norm layers, cross-attend to the features (and to themselves with
  `concat_latents_kv`, as Idefics2) with grouped-query attention, then an MLP; k = n_latents
  whatever the image size. Heads and query groups are split over TP ranks.

Everything stays replicated outside the linears: every TP rank returns the same embeddings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from models.vlm.config import ConnectorConfig, PerceiverResamplerConfig


def _column(config, inp: int, out: int, *, bias: bool, gather_output: bool = False) -> ColumnParallelLinear:
    return ColumnParallelLinear(inp, out, config=config, init_method=config.init_method, bias=bias,
                                gather_output=gather_output)


def _row(config, inp: int, out: int, *, bias: bool) -> RowParallelLinear:
    return RowParallelLinear(inp, out, config=config, init_method=config.output_layer_init_method, bias=bias,
                             input_is_parallel=True, skip_bias_add=False)


class MLPConnector(torch.nn.Module):
    """Linear(vision -> llm), then (depth - 1) x [GELU, Linear(llm -> llm)]: `linear_fc1..N`.
    Odd layers are column-parallel, even ones row-parallel (input already split), so activations
    stay split between a pair; a column-parallel last layer gathers its output."""

    def __init__(self, in_features: int, out_features: int, depth: int, config):
        super().__init__()
        self.depth = depth
        for i in range(depth):
            inp = in_features if i == 0 else out_features
            if i % 2 == 0:
                layer = _column(config, inp, out_features, bias=True, gather_output=i == depth - 1)
            else:
                layer = _row(config, inp, out_features, bias=True)
            setattr(self, f"linear_fc{i + 1}", layer)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features
        for i in range(self.depth):
            if i:
                x = F.gelu(x)
            x, _ = getattr(self, f"linear_fc{i + 1}")(x)
        return x


class PerceiverLayer(torch.nn.Module):
    """latents += Attn(norm(latents), norm(context) [+ norm(latents)]); latents += MLP(norm(latents))."""

    def __init__(self, cfg: PerceiverResamplerConfig, width: int, config):
        super().__init__()
        tp = config.tensor_model_parallel_size
        self.heads, self.groups, self.head_dim = cfg.n_heads // tp, cfg.n_query_groups // tp, cfg.head_dim
        self.concat_latents_kv, self.dropout = cfg.concat_latents_kv, cfg.attention_dropout
        dtype, eps = config.params_dtype, cfg.layernorm_epsilon
        self.norm_latents = torch.nn.LayerNorm(width, eps=eps, dtype=dtype)
        self.norm_context = torch.nn.LayerNorm(width, eps=eps, dtype=dtype)
        self.linear_q = _column(config, width, cfg.n_heads * cfg.head_dim, bias=False)
        # Output rows per query group: [k_g; v_g], so a TP rank's rows are its own groups' keys and values.
        self.linear_kv = _column(config, width, 2 * cfg.n_query_groups * cfg.head_dim, bias=False)
        self.linear_proj = _row(config, cfg.n_heads * cfg.head_dim, width, bias=False)
        self.norm_mlp = torch.nn.LayerNorm(width, eps=eps, dtype=dtype)
        ffn = cfg.ffn_hidden_size or 4 * width
        self.linear_fc1 = _column(config, width, ffn, bias=False)
        self.linear_fc2 = _row(config, ffn, width, bias=False)

    def attention(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, k, _ = latents.shape
        q = self.norm_latents(latents)
        kv_input = self.norm_context(context)
        if self.concat_latents_kv:
            kv_input = torch.cat([kv_input, q], dim=1)
        query, _ = self.linear_q(q)  # [n, k, heads * d] (this rank's heads)
        kv, _ = self.linear_kv(kv_input)  # [n, s, groups * 2 * d]
        query = query.view(n, k, self.heads, self.head_dim).transpose(1, 2)
        kv = kv.view(n, kv.shape[1], self.groups, 2, self.head_dim)
        key, value = kv[..., 0, :].transpose(1, 2), kv[..., 1, :].transpose(1, 2)  # [n, groups, s, d]
        if self.groups != self.heads:
            key = key.repeat_interleave(self.heads // self.groups, dim=1)
            value = value.repeat_interleave(self.heads // self.groups, dim=1)
        dropout = self.dropout if self.training else 0.0
        if dropout:
            with get_cuda_rng_tracker().fork():  # each TP rank's heads drop their own entries
                out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout)
        else:
            out = F.scaled_dot_product_attention(query, key, value)
        out = out.transpose(1, 2).reshape(n, k, self.heads * self.head_dim)
        return self.linear_proj(out)[0]

    def forward(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attention(latents, context)
        hidden, _ = self.linear_fc1(self.norm_mlp(latents))
        return latents + self.linear_fc2(F.gelu(hidden))[0]


class PerceiverResampler(torch.nn.Module):
    """in_proj (vision width -> resampler width, when they differ) -> `depth` PerceiverLayers over
    `n_latents` learned latents -> final norm -> out_proj (-> LLM width)."""

    def __init__(self, cfg: PerceiverResamplerConfig, in_features: int, out_features: int, config):
        super().__init__()
        width = cfg.hidden_size or in_features
        dtype = config.params_dtype
        self.in_proj = _column(config, in_features, width, bias=True, gather_output=True) if width != in_features else None
        self.latents = torch.nn.Parameter(torch.empty(cfg.n_latents, width, dtype=dtype))
        torch.nn.init.normal_(self.latents, std=config.init_method_std)
        self.layers = torch.nn.ModuleList(PerceiverLayer(cfg, width, config) for _ in range(cfg.depth))
        self.final_norm = torch.nn.LayerNorm(width, eps=cfg.layernorm_epsilon, dtype=dtype)
        self.out_proj = _column(config, width, out_features, bias=True, gather_output=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        context = features if self.in_proj is None else self.in_proj(features)[0]
        latents = self.latents.unsqueeze(0).expand(features.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(latents, context)
        return self.out_proj(self.final_norm(latents))[0]


def build_connector(cfg: ConnectorConfig, in_features: int, out_features: int, config) -> torch.nn.Module:
    if cfg.type == "mlp":
        return MLPConnector(in_features, out_features, cfg.mlp_depth, config)
    if cfg.type == "perceiver":
        return PerceiverResampler(cfg.perceiver, in_features, out_features, config)
    raise ValueError(f"model.connector.type={cfg.type!r}: use mlp or perceiver")


def connector_layout_problems(cfg: ConnectorConfig, vision_width: int, llm_width: int, tp: int) -> list[str]:
    """What TP must divide in the connector, each naming its key."""
    problems = []

    def divides(key: str, value: int) -> None:
        if value % tp:
            problems.append(f"model.{key}={value} is not divisible by tensor_model_parallel_size={tp}")

    if cfg.type == "mlp":
        divides("llm.hidden_size", llm_width)  # the MLP's width is the LLM's (LLaVA)
        return problems
    p = cfg.perceiver
    width = p.hidden_size or vision_width
    divides("connector.perceiver.n_heads", p.n_heads)
    divides("connector.perceiver.n_query_groups", p.n_query_groups)
    divides("connector.perceiver.ffn_hidden_size" if p.ffn_hidden_size else "connector.perceiver.hidden_size (4x: the "
            "MLP width)", p.ffn_hidden_size or 4 * width)
    if width != vision_width:
        divides("connector.perceiver.hidden_size", width)
    divides("llm.hidden_size", llm_width)
    if p.n_heads % p.n_query_groups:
        problems.append(f"model.connector.perceiver.n_heads={p.n_heads} is not divisible by "
                        f"model.connector.perceiver.n_query_groups={p.n_query_groups}")
    return problems
