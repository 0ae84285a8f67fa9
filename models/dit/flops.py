"""Analytic model FLOPs of one DiT training sample (forward + backward), for TFLOP/s and MFU, with
engine/flops.py's conventions and building blocks: matrix multiplies only, 2 FLOPs per
multiply-add, the backward twice the forward (input and weight gradients) except where the input
needs no gradient, no activation recompute (model FLOPs, not hardware FLOPs).

Per sample (P patch tokens, s = P or 2P tokens in the block, h the width):
- embedding: the conditioning [P, condition_dim] -> h, and the noisy vector -> h once (before it
  is broadcast over the tokens); their inputs are data, so backward = weight gradient only, except
  that the conditioning passes a LayerNorm with gain and bias first (model.condition_norm), whose
  gradient needs the projection's input gradient as well;
- timestep MLP: sinusoid (frequency_dim) -> h -> h; its first input is data as well;
- per layer: fused QKV, core attention over s x s, output projection, MLP fc1/fc2, and the
  adaLN modulation h -> 6h of the conditioning vector (once per sample, not per token);
- head: final modulation h -> 2h, attention pooling (one learned query: its projection, the keys
  and values of the s tokens, scores and weighted sum, the output projection), the adapter MLP,
  the CLIP projection;
- contrastive term (when on): the B x B logits of predicted clean vectors against the targets over
  the contrastive batch B (micro-batch x DP, as CLIP's similarity), 2*B*d per sample forward; the
  targets are data, so its backward is one product.
The 3D RoPE tables are computed once per model and cached (not per sample), so they are not counted.

Checked against torch.utils.flop_counter.FlopCounterMode on tiny DiTs (tests/unit/test_dit_flops.py).
"""
from __future__ import annotations

from engine.flops import (
    TRAINING_MULTIPLIER,
    attention_core_flops,
    linear_flops,
    transformer_layer_flops,
)
from models.dit.config import DiTConfig

# Backward FLOPs per forward FLOP of parts whose input needs no gradient (the default is 2).
BACKWARD_PER_FORWARD = {"condition_projection": 1, "noisy_projection": 1, "timestep_input": 1, "contrastive": 1}


def forward_flops(cfg: DiTConfig, contrastive_batch: int | None = None) -> dict:
    """Forward FLOPs of one sample, by part. `contrastive_batch`: samples in one contrastive
    problem (micro-batch x DP); None leaves the contrastive term out."""
    h, s, p = cfg.hidden_size, cfg.seq_length, cfg.num_patches
    layer = transformer_layer_flops(s, h, cfg.ffn_hidden_size, cfg.num_attention_heads)
    layer["modulation"] = linear_flops(1, h, 6 * h)
    parts = {
        "condition_projection": linear_flops(p, cfg.condition_dim, h),
        "noisy_projection": linear_flops(1, cfg.output_dim, h),
        "timestep_input": linear_flops(1, cfg.timestep_frequency_dim, h),
        "timestep_mlp": linear_flops(1, h, h),
        "layers": cfg.num_layers * sum(layer.values()),
        "final_modulation": linear_flops(1, h, 2 * h),
        "pooling": (linear_flops(1, h, h) + linear_flops(s, h, 2 * h)  # query; keys and values
                    + attention_core_flops(1, s, h) + linear_flops(1, h, h)),  # scores and values; output
        "adapter": linear_flops(1, h, cfg.adapter_hidden_size) + linear_flops(1, cfg.adapter_hidden_size, cfg.clip_width),
        "projection": linear_flops(1, cfg.clip_width, cfg.output_dim),
    }
    flow = cfg.flow
    if contrastive_batch and flow.use_contrastive_loss and flow.contrastive_weight > 0:
        parts["contrastive"] = 2 * contrastive_batch * cfg.output_dim
    return parts


def backward_per_forward(cfg: DiTConfig, part: str) -> int:
    if part == "condition_projection" and cfg.condition_norm:
        return TRAINING_MULTIPLIER - 1  # the norm's gain and bias need the input gradient
    return BACKWARD_PER_FORWARD.get(part, TRAINING_MULTIPLIER - 1)


def training_flops_breakdown(cfg: DiTConfig, contrastive_batch: int | None = None) -> dict:
    """Forward + backward FLOPs of one sample, by part, plus "total"."""
    out = {part: flops * (1 + backward_per_forward(cfg, part))
           for part, flops in forward_flops(cfg, contrastive_batch).items()}
    out["total"] = sum(out.values())
    return out


def forward_flops_per_sample(cfg: DiTConfig, contrastive_batch: int | None = None) -> float:
    return float(sum(forward_flops(cfg, contrastive_batch).values()))


def training_flops_per_sample(cfg: DiTConfig, contrastive_batch: int | None = None) -> float:
    """The DiT family's `flops_per_sample`: model FLOPs of one training sample."""
    return float(training_flops_breakdown(cfg, contrastive_batch)["total"])
