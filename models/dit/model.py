"""The global DiT (BLIP3-o's): conditioning patch features and a noisy global vector in, the
flow-matching velocity of that vector out.

    condition [b, P, condition_dim] -> LayerNorm -> Linear -> [b, P, h]            (first stage)
    x_t [b, output_dim] -> Linear -> broadcast over the P patch tokens ("expand to patches"):
        added to the conditioning tokens (token_layout=add) or P tokens of their own (concat)
    t [b] -> sinusoid -> MLP -> c [b, h]                                            (first stage)
    megatron TransformerBlock of adaLN-zero layers (c modulates every norm), 3D RoPE over
        (token type, row, column)                                                   (every stage)
    final norm modulated by c -> attention pooling -> adapter MLP (h -> 2048 -> clip_width)
        -> CLIP projection (clip_width -> output_dim)                               (last stage)

Pipeline parallelism: the first stage embeds and computes c; later stages get the hidden states
and c in the pipeline message (`stage_forward`), so the timestep MLP exists once, on the first
stage, and its gradient is the sum of what every stage sends back through c. Nothing replicated
needs syncing over stages.

Tensor/sequence parallelism: see models/dit/layer.py. With SP, c enters the sequence-parallel
region through `copy_to_tensor_model_parallel_region` (identity forward, TP all-reduce of the
gradient backward), so the gradient of c, and of everything before it, is the full one on every
TP rank.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

from models.common.attention import resolve_attention_backend
from models.common.recompute import recompute_settings
from models.common.sequence_parallel import SequenceParallelRegion
from models.common.stage import build_block, pipeline_stage_flags
from models.common.transformer_config import make_transformer_config, parallel_sizes
from models.dit.config import DiTConfig, model_problems
from models.dit.layer import (
    TimestepEmbedder,
    adaln_layer_spec,
    modulate,
    modulation_linear,
)
from models.dit.rope import Rotary3D, sequence_positions


def dit_transformer_config(cfg: DiTConfig, **overrides):
    return make_transformer_config(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads, hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout, layernorm_epsilon=cfg.layernorm_epsilon, activation=cfg.activation,
        normalization="LayerNorm", **{**recompute_settings(cfg), **overrides})


class AttentionPool(torch.nn.Module):
    """One learned query attends over the tokens: [s, b, h] -> [b, h] (then a LayerNorm)."""

    def __init__(self, width: int, heads: int, eps: float, dtype=torch.float32):
        super().__init__()
        self.query = torch.nn.Parameter(0.02 * torch.randn(1, 1, width, dtype=dtype))
        self.attention = torch.nn.MultiheadAttention(width, heads, dtype=dtype)
        self.norm = torch.nn.LayerNorm(width, eps=eps, dtype=dtype)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        query = self.query.expand(1, x.shape[1], -1)
        pooled, _ = self.attention(query, x, x, key_padding_mask=key_padding_mask, need_weights=False)
        return self.norm(pooled[0])


def _xavier(linear: torch.nn.Linear) -> torch.nn.Linear:
    torch.nn.init.xavier_uniform_(linear.weight)
    if linear.bias is not None:
        torch.nn.init.zeros_(linear.bias)
    return linear


class GlobalDiT(torch.nn.Module):
    """This rank's pipeline stage of the DiT (the whole model at PP=1)."""

    def __init__(self, cfg: DiTConfig, pre_process: bool | None = None, post_process: bool | None = None,
                 tensor_model_parallel_size: int | None = None, pipeline_model_parallel_size: int | None = None,
                 **transformer_overrides):
        super().__init__()
        problems = model_problems(cfg)
        if problems:
            raise ValueError("; ".join(problems))
        self.cfg = cfg
        self.pre_process, self.post_process = pipeline_stage_flags(pre_process, post_process)
        running_tp, running_pp = parallel_sizes()
        config = dit_transformer_config(cfg, **{"tensor_model_parallel_size": tensor_model_parallel_size or running_tp,
                                                "pipeline_model_parallel_size": pipeline_model_parallel_size or running_pp,
                                                **transformer_overrides})
        self.config = config
        self.attention_backend = resolve_attention_backend(cfg.attention_backend, cfg.use_flash_attention)
        self.sequence_parallel = SequenceParallelRegion(config)
        width, dtype, eps = cfg.hidden_size, config.params_dtype, cfg.layernorm_epsilon
        if self.sequence_parallel.padding(cfg.seq_length) and self.attention_backend != "sdpa":
            raise ValueError(f"sequence parallelism pads the DiT's {cfg.seq_length} tokens to a multiple of TP and masks "
                             "the padding, which only attention_backend=sdpa supports")
        if self.pre_process:
            self.condition_norm = (torch.nn.LayerNorm(cfg.condition_dim, eps=eps, dtype=dtype) if cfg.condition_norm
                                   else torch.nn.Identity())
            self.condition_proj = _xavier(torch.nn.Linear(cfg.condition_dim, width, dtype=dtype))
            self.noisy_proj = _xavier(torch.nn.Linear(cfg.output_dim, width, dtype=dtype))
            # The projected conditioning token of a dropped condition (classifier-free guidance).
            self.null_condition = torch.nn.Parameter(0.02 * torch.randn(width, dtype=dtype))
            self.timestep = TimestepEmbedder(width, cfg.timestep_frequency_dim, cfg.timestep_scale, dtype=dtype)
        self.rotary = Rotary3D(cfg.head_dim, cfg.rope_sections, cfg.rope_base, cfg.rope_frequencies)
        self._rope_cache: dict = {}
        self.block = build_block(config, adaln_layer_spec(self.attention_backend), post_process=self.post_process)
        if self.post_process:
            self.final_modulation = modulation_linear(config, 2)
            self.pool = AttentionPool(width, cfg.attention_pool_heads or cfg.num_attention_heads, eps, dtype=dtype)
            self.adapter = torch.nn.Sequential(_xavier(torch.nn.Linear(width, cfg.adapter_hidden_size, dtype=dtype)),
                                               torch.nn.GELU(),
                                               _xavier(torch.nn.Linear(cfg.adapter_hidden_size, cfg.clip_width,
                                                                       dtype=dtype)))
            self.projection = torch.nn.Linear(cfg.clip_width, cfg.output_dim, bias=False, dtype=dtype)
            torch.nn.init.normal_(self.projection.weight, std=cfg.clip_width ** -0.5)

    # -- pieces ----------------------------------------------------------------------------------
    def embed(self, condition: torch.Tensor, x_t: torch.Tensor, keep_condition: torch.Tensor | None = None):
        """[b, P, condition_dim] and [b, output_dim] -> tokens [s, b, h] (megatron layout, unscattered).
        `keep_condition` [b]: 1 keeps a sample's conditioning, 0 replaces it by the null condition."""
        cfg, dtype = self.cfg, self.condition_proj.weight.dtype
        if condition.shape[1:] != (cfg.num_patches, cfg.condition_dim):
            raise ValueError(f"conditioning features of shape {tuple(condition.shape[1:])}; the model expects "
                             f"({cfg.num_patches}, {cfg.condition_dim}) (model.condition_grid, model.condition_dim)")
        cond = self.condition_proj(self.condition_norm(condition.to(dtype)))
        if keep_condition is not None:
            keep = keep_condition.to(dtype).view(-1, 1, 1)
            cond = keep * cond + (1 - keep) * self.null_condition
        noisy = self.noisy_proj(x_t.to(dtype)).unsqueeze(1)
        if cfg.token_layout == "add":
            tokens = cond + noisy
        else:
            tokens = torch.cat([cond, noisy.expand(-1, cfg.num_patches, -1)], dim=1)
        return tokens.transpose(0, 1).contiguous()

    def rotary_pos_emb(self, device) -> torch.Tensor:
        """[s_padded, 1, 1, head_dim], the same for every sample (positions are the fixed grid)."""
        key = str(device)
        if key not in self._rope_cache:
            rows, cols = self.cfg.condition_grid
            positions = sequence_positions(rows, cols, self.cfg.token_layout,
                                           self.sequence_parallel.padding(self.cfg.seq_length)).to(device)
            self._rope_cache[key] = self.rotary(positions)
        return self._rope_cache[key]

    def _into_sequence_region(self, c: torch.Tensor) -> torch.Tensor:
        # The gradient of c from the sequence-sharded layers is partial per TP rank: sum it.
        return copy_to_tensor_model_parallel_region(c) if self.sequence_parallel.enabled else c

    def head(self, hidden: torch.Tensor, c_region: torch.Tensor) -> torch.Tensor:
        """Last stage: the block's output (normalised) [s_local, b, h] -> velocity [b, output_dim]."""
        shift, scale = self.final_modulation(F.silu(c_region)).to(hidden.dtype).chunk(2, dim=-1)
        x = self.sequence_parallel.gather(modulate(hidden, shift, scale))[: self.cfg.seq_length]
        return self.projection(self.adapter(self.pool(x)))

    # -- one pipeline stage ----------------------------------------------------------------------
    def stage_forward(self, inputs: dict | None = None, condition: torch.Tensor | None = None,
                      x_t: torch.Tensor | None = None, t: torch.Tensor | None = None,
                      keep_condition: torch.Tensor | None = None):
        """First stage: `condition`, `x_t`, `t` (and `keep_condition`); later stages: `inputs`, the
        previous stage's {"hidden": [s_local, b, h], "condition_vector": [b, h]}. Returns that
        message for the next stage, or on the last stage the predicted velocity [b, output_dim]."""
        if self.pre_process:
            c = self.timestep(t)
            hidden = self.sequence_parallel.scatter(self.embed(condition, x_t, keep_condition))
        else:
            hidden, c = inputs["hidden"], inputs["condition_vector"]
        c_region = self._into_sequence_region(c)
        mask = self.sequence_parallel.key_padding_mask(self.cfg.seq_length, hidden.shape[1], hidden.device)
        hidden = self.block(hidden, attention_mask=mask, context=c_region,
                            rotary_pos_emb=self.rotary_pos_emb(hidden.device))
        if not self.post_process:
            return {"hidden": hidden, "condition_vector": c}
        return self.head(hidden, c_region)

    def forward(self, condition: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                keep_condition: torch.Tensor | None = None) -> torch.Tensor:
        """The whole model (one pipeline stage): the velocity at (x_t, t) given the conditioning."""
        if not (self.pre_process and self.post_process):
            raise RuntimeError("GlobalDiT.forward runs the whole model; under pipeline parallelism use stage_forward "
                               "(engine.schedules for training, models.dit.sampling for generation)")
        return self.stage_forward(condition=condition, x_t=x_t, t=t, keep_condition=keep_condition)

    # Not decayed: biases and norm gains, the learned pooling query and the null condition.
    NO_DECAY_NAME_PARTS = ("null_condition", "pool.query", "norm")

    def no_weight_decay(self, name: str, param: torch.nn.Parameter) -> bool:
        return param.ndim < 2 or any(part in name for part in self.NO_DECAY_NAME_PARTS)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
