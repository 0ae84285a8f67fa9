"""CLIP: an image tower, a text tower and a learnable temperature."""
from __future__ import annotations


import torch
import torch.nn.functional as F

from models.clip.config import CLIPConfig
from models.clip.towers import TextTower, VisionTower
from models.common.attention import resolve_attention_backend
from models.common.transformer_config import make_transformer_config


def recompute_settings(tower) -> dict:
    """NeMo's activation-checkpointing keys -> megatron-core's TransformerConfig fields."""
    granularity = tower.activations_checkpoint_granularity
    method, num_layers = tower.activations_checkpoint_method, tower.activations_checkpoint_num_layers
    if granularity is None:
        return {}
    if granularity == "full":
        if method not in ("uniform", "block") or not num_layers:
            raise ValueError("activations_checkpoint_granularity=full needs activations_checkpoint_method "
                             "(uniform or block) and activations_checkpoint_num_layers >= 1")
        return {"recompute_granularity": "full", "recompute_method": method, "recompute_num_layers": num_layers}
    if granularity == "selective":
        if method is not None or num_layers is not None:
            raise ValueError("activations_checkpoint_granularity=selective takes no method or num_layers")
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    raise ValueError(f"activations_checkpoint_granularity={granularity!r}: use full, selective or null")


def tower_transformer_config(tower, **overrides):
    """The megatron `TransformerConfig` of one tower section (vision or text)."""
    overrides = {**recompute_settings(tower), **overrides}
    return make_transformer_config(
        num_layers=tower.num_layers,
        hidden_size=tower.hidden_size,
        ffn_hidden_size=tower.ffn_hidden_size,
        num_attention_heads=tower.num_attention_heads,
        hidden_dropout=tower.hidden_dropout,
        attention_dropout=tower.attention_dropout,
        layernorm_epsilon=tower.layernorm_epsilon,
        activation=tower.activation,
        **overrides,
    )


class CLIPModel(torch.nn.Module):
    def __init__(self, cfg: CLIPConfig, **transformer_overrides):
        """`transformer_overrides` go to both towers' TransformerConfig (dtype, init, recompute...)."""
        super().__init__()
        self.cfg = cfg
        backend = resolve_attention_backend(cfg.attention_backend, cfg.use_flash_attention)
        self.attention_backend = backend
        self.visual = VisionTower(cfg.vision, tower_transformer_config(cfg.vision, **transformer_overrides), backend)
        self.text = TextTower(cfg.text, tower_transformer_config(cfg.text, **transformer_overrides), backend)
        self.logit_scale = torch.nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.visual(images)
        return F.normalize(features.float(), dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.text(tokens)
        return F.normalize(features.float(), dim=-1) if normalize else features

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped as open_clip (max 100) to keep the softmax from collapsing."""
        return self.logit_scale.float().exp().clamp(max=self.cfg.max_logit_scale)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        return self.encode_image(images), self.encode_text(tokens), self.scale()


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


