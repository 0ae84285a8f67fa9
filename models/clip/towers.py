"""CLIP image and text towers on megatron-core's `TransformerBlock`.

Both towers are pre-norm transformers in megatron's [sequence, batch, hidden] layout, cut into three
parts so a pipeline stage can hold any slice of them:

- `embed` (first pipeline stage only): patch or token embedding, class token(s), positions, ln_pre;
- `encode`: this stage's layers of the block (`get_num_layers_to_build`, megatron's PP split);
- `head` (last stage only): the block's final norm, pooling and the projection.

The model code knows nothing of process groups: the tensor-parallel split lives inside megatron's
layers (column/row-parallel linears, the vocab-parallel embedding). With sequence parallelism the
block's input is scattered over the TP ranks along the sequence (padded to a multiple of TP) and
gathered again before pooling; everything outside the block is replicated.
"""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel.layers import VocabParallelEmbedding
from megatron.core.transformer.transformer_config import TransformerConfig

from models.clip.config import TextConfig, VisionConfig
from models.common.sequence_parallel import SequenceParallelRegion
from models.common.spec import transformer_layer_spec
from models.common.stage import build_block, padded_vocab_size, replicated_norm


class VisionTower(torch.nn.Module):
    """Conv patch embedding + class token(s) + learned positions -> ln_pre -> block -> pool -> proj."""

    def __init__(self, cfg: VisionConfig, config: TransformerConfig, backend: str = "sdpa",
                 pre_process: bool = True, post_process: bool = True):
        super().__init__()
        if cfg.img_h % cfg.patch_dim or cfg.img_w % cfg.patch_dim:
            raise ValueError(
                f"image size {cfg.img_h}x{cfg.img_w} is not divisible by patch_dim={cfg.patch_dim}"
            )
        self.cfg, self.pre_process, self.post_process = cfg, pre_process, post_process
        self.sequence_parallel = SequenceParallelRegion(config)
        if self.sequence_parallel.padding(cfg.seq_length) and backend != "sdpa":
            raise ValueError(
                f"sequence parallelism pads the vision sequence ({cfg.seq_length} tokens) to a multiple of TP and "
                f"masks the padding, which only the sdpa attention backend supports (got {backend!r}); choose "
                "model.vision.class_token_length so the sequence divides TP, or attention_backend=sdpa"
            )
        width, dtype = cfg.hidden_size, config.params_dtype
        scale = width ** -0.5
        if pre_process:
            self.conv1 = torch.nn.Conv2d(cfg.num_channels, width, kernel_size=cfg.patch_dim,
                                         stride=cfg.patch_dim, bias=False, dtype=dtype)
            self.class_embedding = torch.nn.Parameter(scale * torch.randn(cfg.class_token_length, width, dtype=dtype))
            self.positional_embedding = torch.nn.Parameter(scale * torch.randn(cfg.seq_length, width, dtype=dtype))
            self.ln_pre = replicated_norm(config, width, cfg.layernorm_epsilon)
        self.transformer = build_block(config, transformer_layer_spec(backend, causal=False), post_process=post_process)
        if post_process:
            self.proj = torch.nn.Linear(width, cfg.output_dim, bias=False, dtype=dtype)
            torch.nn.init.normal_(self.proj.weight, std=scale)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> [s, b, h] (this TP rank's slice of the sequence under SP)."""
        x = self.conv1(images.to(self.conv1.weight.dtype))  # [b, w, gh, gw]
        x = x.flatten(2).transpose(1, 2)  # [b, patches, w]
        cls = self.class_embedding.unsqueeze(0).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x)
        x = x.transpose(0, 1).contiguous()  # megatron layout [s, b, h]
        return self.sequence_parallel.scatter(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.sequence_parallel.key_padding_mask(self.cfg.seq_length, x.shape[1], x.device)
        return self.transformer(x, attention_mask=mask)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.sequence_parallel.gather(x)
        if self.cfg.global_average_pool:
            pooled = x[self.cfg.class_token_length:self.cfg.seq_length].mean(dim=0)
        else:
            pooled = x[0]
        return self.proj(pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The whole tower (a single pipeline stage)."""
        return self.head(self.encode(self.embed(images)))


# Trimmed text lengths are rounded up to this: few distinct shapes for kernel and allocator caches,
# and GPU matrix units want multiples of 8.
TRIM_MULTIPLE = 8


class TextTower(torch.nn.Module):
    """Vocab-parallel token embedding + learned positions -> causal block -> pool at EOT -> proj."""

    def __init__(self, cfg: TextConfig, config: TransformerConfig, backend: str = "sdpa",
                 pre_process: bool = True, post_process: bool = True):
        super().__init__()
        self.cfg, self.pre_process, self.post_process = cfg, pre_process, post_process
        self.sequence_parallel = SequenceParallelRegion(config)
        width, dtype = cfg.hidden_size, config.params_dtype
        self.padded_vocab_size = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by,
                                                   config.tensor_model_parallel_size)
        if pre_process:
            init = lambda w: torch.nn.init.normal_(w, std=0.02)
            self.token_embedding = VocabParallelEmbedding(
                self.padded_vocab_size, width, init_method=init, config=config
            )
            self.positional_embedding = torch.nn.Parameter(torch.empty(cfg.encoder_seq_length, width, dtype=dtype))
            torch.nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer = build_block(config, transformer_layer_spec(backend, causal=True), post_process=post_process)
        if post_process:
            self.text_projection = torch.nn.Linear(width, cfg.output_dim, bias=False, dtype=dtype)
            torch.nn.init.normal_(self.text_projection.weight, std=width ** -0.5)

    def eot_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cfg.eot_token_id < 0:
            return tokens.argmax(dim=-1)
        return (tokens == self.cfg.eot_token_id).int().argmax(dim=-1)

    def trimmed_length(self, tokens: torch.Tensor) -> int:
        """The tokens each row of `tokens` [b, s] needs: up to the batch's last end-of-text position
        (rounded up to TRIM_MULTIPLE, at most s). Positions after a row's end of text only feed
        positions after it (causal mask), and the row is pooled at its end of text, so dropping them
        changes no feature or gradient. Reads the tokens: call it on the host copy (no GPU sync)."""
        if tokens.numel() == 0:  # no rows (or no positions): nothing to read, keep the shape
            return tokens.shape[1]
        longest = int(self.eot_positions(tokens).max()) + 1
        return min(tokens.shape[1], -(-longest // TRIM_MULTIPLE) * TRIM_MULTIPLE)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.cfg.encoder_seq_length:
            raise ValueError(
                f"text length {tokens.shape[1]} exceeds model.text.encoder_seq_length={self.cfg.encoder_seq_length}"
            )
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]  # [b, s, h]
        # Causal attention: padding appended for SP is never attended to by real tokens.
        return self.sequence_parallel.scatter(x.transpose(0, 1).contiguous())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.transformer(x, attention_mask=None)  # causal through the layer spec's mask type

    def head(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """Pool each row at its end-of-text position `eot` [b] (computed from the tokens on stage 0)."""
        x = self.sequence_parallel.gather(x)
        pooled = x[eot, torch.arange(eot.shape[0], device=eot.device)]
        return self.text_projection(pooled)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(self.embed(tokens)), self.eot_positions(tokens))
