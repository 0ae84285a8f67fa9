"""CLIP image and text towers on megatron-core's `TransformerBlock`.

Both towers are pre-norm transformers in megatron's [sequence, batch, hidden] layout. The model code
knows nothing of process groups: the tensor-parallel split lives inside megatron's layers
(column/row-parallel linears, the vocab-parallel embedding); everything outside the block
(patch embedding, class token, position embeddings, norms, projections) is replicated.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import VocabParallelEmbedding
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_block import get_num_layers_to_build

from models.clip.config import TextConfig, VisionConfig
from models.common.norm import Norm, build_norm
from models.common.spec import transformer_layer_spec


def build_block(config: TransformerConfig, backend: str, causal: bool) -> TransformerBlock:
    spec = transformer_layer_spec(backend, causal=causal)
    layers = get_num_layers_to_build(config)
    submodules = TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=Norm)
    # The block's final norm is CLIP's ln_post / ln_final (applied per token, so before pooling).
    return TransformerBlock(config, submodules, post_layer_norm=True)


def padded_vocab_size(vocab_size: int, divisible_by: int) -> int:
    """Megatron's rule: pad so every TP rank holds an equal slice of a multiple of `divisible_by`."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


class VisionTower(torch.nn.Module):
    """Conv patch embedding + class token(s) + learned positions -> ln_pre -> block -> pool -> proj."""

    def __init__(self, cfg: VisionConfig, config: TransformerConfig, backend: str = "sdpa"):
        super().__init__()
        if cfg.img_h % cfg.patch_dim or cfg.img_w % cfg.patch_dim:
            raise ValueError(
                f"image size {cfg.img_h}x{cfg.img_w} is not divisible by patch_dim={cfg.patch_dim}"
            )
        self.cfg = cfg
        width, dtype = cfg.hidden_size, config.params_dtype
        scale = width ** -0.5
        self.conv1 = torch.nn.Conv2d(cfg.num_channels, width, kernel_size=cfg.patch_dim,
                                     stride=cfg.patch_dim, bias=False, dtype=dtype)
        self.class_embedding = torch.nn.Parameter(scale * torch.randn(cfg.class_token_length, width, dtype=dtype))
        self.positional_embedding = torch.nn.Parameter(scale * torch.randn(cfg.seq_length, width, dtype=dtype))
        self.ln_pre = build_norm(config, width, eps=cfg.layernorm_epsilon)
        self.transformer = build_block(config, backend, causal=False)
        self.proj = torch.nn.Linear(width, cfg.output_dim, bias=False, dtype=dtype)
        torch.nn.init.normal_(self.proj.weight, std=scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images.to(self.conv1.weight.dtype))  # [b, w, gh, gw]
        x = x.flatten(2).transpose(1, 2)  # [b, patches, w]
        cls = self.class_embedding.unsqueeze(0).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x)
        x = x.transpose(0, 1).contiguous()  # megatron layout [s, b, h]
        x = self.transformer(x, attention_mask=None)
        if self.cfg.global_average_pool:
            pooled = x[self.cfg.class_token_length:].mean(dim=0)
        else:
            pooled = x[0]
        return self.proj(pooled)


class TextTower(torch.nn.Module):
    """Vocab-parallel token embedding + learned positions -> causal block -> pool at EOT -> proj."""

    def __init__(self, cfg: TextConfig, config: TransformerConfig, backend: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        width, dtype = cfg.hidden_size, config.params_dtype
        self.padded_vocab_size = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by)
        init = lambda w: torch.nn.init.normal_(w, std=0.02)  # noqa: E731
        self.token_embedding = VocabParallelEmbedding(
            self.padded_vocab_size, width, init_method=init, config=config
        )
        self.positional_embedding = torch.nn.Parameter(torch.empty(cfg.encoder_seq_length, width, dtype=dtype))
        torch.nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer = build_block(config, backend, causal=True)
        self.text_projection = torch.nn.Linear(width, cfg.output_dim, bias=False, dtype=dtype)
        torch.nn.init.normal_(self.text_projection.weight, std=width ** -0.5)

    def eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cfg.eot_token_id < 0:
            return tokens.argmax(dim=-1)
        return (tokens == self.cfg.eot_token_id).int().argmax(dim=-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.cfg.encoder_seq_length:
            raise ValueError(
                f"text length {tokens.shape[1]} exceeds model.text.encoder_seq_length={self.cfg.encoder_seq_length}"
            )
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]  # [b, s, h]
        x = x.transpose(0, 1).contiguous()
        x = self.transformer(x, attention_mask=None)  # causal through the layer spec's mask type
        pooled = x[self.eot_positions(tokens), torch.arange(tokens.shape[0], device=tokens.device)]
        return self.text_projection(pooled)
