"""Tiny CLIP configs and batches shared by the distributed tests (deterministic, seed-driven)."""
from __future__ import annotations

import torch

from models.clip.config import CLIPConfig, TextConfig, VisionConfig


def tiny_clip_config(**overrides) -> CLIPConfig:
    vision = VisionConfig(patch_dim=8, img_h=32, img_w=32, num_layers=2, hidden_size=64, ffn_hidden_size=128,
                          num_attention_heads=4, output_dim=32)
    text = TextConfig(vocab_size=512, encoder_seq_length=12, num_layers=2, hidden_size=64, ffn_hidden_size=128,
                      num_attention_heads=4, output_dim=32, make_vocab_size_divisible_by=128)
    cfg = CLIPConfig(output_dim=32, vision=vision, text=text)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_batch(batch_size: int, seed: int = 0, cfg: CLIPConfig | None = None):
    cfg = cfg or tiny_clip_config()
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, cfg.vision.img_h, cfg.vision.img_w, generator=gen)
    tokens = torch.randint(1, cfg.text.vocab_size - 1, (batch_size, cfg.text.encoder_seq_length), generator=gen)
    # An explicit end-of-text position per row (the highest id, as CLIP BPE), varying by row.
    eot = torch.randint(3, cfg.text.encoder_seq_length, (batch_size,), generator=gen)
    tokens[torch.arange(batch_size), eot] = cfg.text.vocab_size - 1
    return images, tokens
