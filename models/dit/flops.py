"""Analytic training FLOPs of the DiT per sample (matrix multiplies only, forward + backward = 3 x
forward, no recompute), for TFLOP/s and MFU. Kept here until engine/flops.py holds every family's
formula."""
from __future__ import annotations

from models.dit.config import DiTConfig


def forward_flops_per_sample(cfg: DiTConfig) -> float:
    h, s, p = cfg.hidden_size, cfg.seq_length, cfg.num_patches
    embed = 2 * p * cfg.condition_dim * h + 2 * cfg.output_dim * h
    timestep = 2 * (cfg.timestep_frequency_dim * h + h * h)
    layer = (2 * s * h * 3 * h  # fused QKV
             + 2 * 2 * s * s * h  # scores and the weighted sum of values
             + 2 * s * h * h  # output projection
             + 2 * 2 * s * h * cfg.ffn_hidden_size  # MLP fc1 and fc2
             + 2 * h * 6 * h)  # adaLN modulation (once per sample)
    head = (2 * h * 2 * h  # final modulation
            + 2 * h * h + 2 * s * h * 2 * h + 2 * 2 * s * h + 2 * h * h  # attention pooling: q, k/v, scores+values, out
            + 2 * (h * cfg.adapter_hidden_size + cfg.adapter_hidden_size * cfg.clip_width)  # adapter MLP
            + 2 * cfg.clip_width * cfg.output_dim)  # CLIP projection
    return float(embed + timestep + cfg.num_layers * layer + head)


def training_flops_per_sample(cfg: DiTConfig) -> float:
    return 3.0 * forward_flops_per_sample(cfg)
