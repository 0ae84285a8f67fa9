"""Analytic model FLOPs of one training sample (forward + backward), per model family.

Model FLOPs count the matrix multiplies the model needs, 2 FLOPs per multiply-add, as the MFU of
PaLM (Chowdhery et al. 2022), Megatron-LM and torchtitan does:

- a linear layer on t tokens: 2*t*in*out forward; backward computes the input gradient and the
  weight gradient, 2x forward; so 3x forward in training;
- core attention on s queries and s keys: 4*s*s*(heads*head_dim) forward (QK^T and AV), counted
  over the whole s x s square also for causal masks (PaLM's 12*L*h*s term; a causal flash kernel
  skips about half of it, so causal towers are credited with slightly more than they run);
- the backward of a flash / SDPA kernel recomputes the scores (another QK^T); that recompute, and
  activation recompute (`with_recompute=True` adds it), are hardware FLOPs, not model FLOPs;
- elementwise work (norms, activations, softmax, residuals, the optimizer) is not counted, nor are
  embedding lookups (no multiply).

A model family supplies `flops_per_sample(model_cfg, batch: BatchLayout) -> float` (the CLIP one is
`clip_flops_per_sample`); the trainer multiplies it by samples/s and divides by the number of
devices to get achieved TFLOP/s per device, and by the device's peak (`peak_tflops`) for MFU.
Every formula is checked against `torch.utils.flop_counter.FlopCounterMode` on tiny models
(tests/unit/test_flops.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

TRAINING_MULTIPLIER = 3  # forward + backward (input and weight gradients)


@dataclass(frozen=True)
class BatchLayout:
    """The batch shape a per-sample FLOP count may depend on (CLIP: the B x B similarity)."""

    micro_batch_size: int  # per data-parallel rank and forward pass
    data_parallel_size: int = 1
    global_batch_size: int | None = None

    @property
    def contrastive_batch(self) -> int:
        """Samples in one contrastive problem: features are gathered over DP per micro-batch."""
        return self.micro_batch_size * self.data_parallel_size


# -- building blocks (forward FLOPs) -----------------------------------------------------------------

def linear_flops(tokens: int, in_features: int, out_features: int) -> int:
    return 2 * tokens * in_features * out_features


def attention_core_flops(seq_q: int, seq_k: int, attention_width: int) -> int:
    """QK^T and AV for all heads; `attention_width` = heads x head_dim."""
    return 4 * seq_q * seq_k * attention_width


def transformer_layer_flops(seq: int, hidden: int, ffn: int, num_heads: int, num_query_groups: int | None = None,
                            kv_channels: int | None = None, gated_mlp: bool = False) -> dict:
    """Forward FLOPs of one pre-norm transformer layer on one sequence of `seq` tokens, by part.
    `num_query_groups` < heads is grouped-query attention; a gated MLP (SwiGLU) has three matrices."""
    head_dim = kv_channels or hidden // num_heads
    q_width = num_heads * head_dim
    kv_width = (num_query_groups or num_heads) * head_dim
    return {
        "qkv": linear_flops(seq, hidden, q_width + 2 * kv_width),
        "attention": attention_core_flops(seq, seq, q_width),
        "attention_proj": linear_flops(seq, q_width, hidden),
        "mlp": linear_flops(seq, hidden, ffn) * (3 if gated_mlp else 2),
    }


def _recompute_forward_flops(tower, layer: dict) -> int:
    """Forward FLOPs that activation checkpointing runs again in backward, per sequence."""
    granularity = getattr(tower, "activations_checkpoint_granularity", None)
    if granularity == "full":
        layers = tower.num_layers
        if getattr(tower, "activations_checkpoint_method", None) == "block":
            layers = min(tower.num_layers, tower.activations_checkpoint_num_layers or 0)
        return layers * sum(layer.values())
    if granularity == "selective":  # core attention only
        return tower.num_layers * layer["attention"]
    return 0


# -- CLIP ---------------------------------------------------------------------------------------------

# Backward FLOPs per forward FLOP of each CLIP part: the patch embedding's input (the image) needs
# no gradient, so its backward is the weight gradient alone.
CLIP_BACKWARD_PER_FORWARD = {"vision_patch_embedding": 1}


def _clip_layer_flops(model_cfg, text_seq_length: int | None) -> tuple[dict, dict]:
    """Forward FLOPs of one vision and one text layer, by part, per sequence (text: `text_seq_length`
    tokens, default the context length)."""
    v, t = model_cfg.vision, model_cfg.text
    v_layer = transformer_layer_flops(v.seq_length, v.hidden_size, v.ffn_hidden_size, v.num_attention_heads)
    t_layer = transformer_layer_flops(text_seq_length or t.encoder_seq_length, t.hidden_size, t.ffn_hidden_size,
                                      t.num_attention_heads)
    return v_layer, t_layer


def clip_forward_flops(model_cfg, contrastive_batch: int, text_seq_length: int | None = None) -> dict:
    """Forward FLOPs per sample of a `CLIPConfig`, by part.

    Vision: patch embedding (a conv of kernel = stride = patch), the layers on num_patches + class
    tokens, the projection of the pooled token. Text: the layers on `text_seq_length` tokens (default
    the context length; a tower trimmed to the batch's longest caption runs fewer), the projection at
    the end-of-text token. Similarity: image @ text.T over the contrastive batch B, 2*B*B*d per
    micro-batch, so 2*B*d per sample (logits_per_text is its transpose, no second product).
    """
    v, t = model_cfg.vision, model_cfg.text
    dim = model_cfg.output_dim
    v_layer, t_layer = _clip_layer_flops(model_cfg, text_seq_length)
    return {
        "vision_patch_embedding": linear_flops(v.num_patches, v.num_channels * v.patch_dim ** 2, v.hidden_size),
        "vision_layers": v.num_layers * sum(v_layer.values()),
        "vision_projection": linear_flops(1, v.hidden_size, dim),
        "text_layers": t.num_layers * sum(t_layer.values()),
        "text_projection": linear_flops(1, t.hidden_size, dim),
        "similarity": 2 * contrastive_batch * dim,
    }


def clip_recompute_flops(model_cfg, text_seq_length: int | None = None) -> int:
    """Forward FLOPs per sample that the towers' activation checkpointing runs again in backward."""
    v_layer, t_layer = _clip_layer_flops(model_cfg, text_seq_length)
    return _recompute_forward_flops(model_cfg.vision, v_layer) + _recompute_forward_flops(model_cfg.text, t_layer)


def clip_flops_breakdown(model_cfg, contrastive_batch: int, with_recompute: bool = False,
                         text_seq_length: int | None = None) -> dict:
    """Training FLOPs (forward + backward) per sample, by part, plus "total"; `with_recompute` adds
    the activation recompute (hardware FLOPs, for HFU rather than MFU)."""
    forward = clip_forward_flops(model_cfg, contrastive_batch, text_seq_length)
    out = {part: flops * (1 + CLIP_BACKWARD_PER_FORWARD.get(part, 2)) for part, flops in forward.items()}
    if with_recompute:
        out["recompute"] = clip_recompute_flops(model_cfg, text_seq_length)
    out["total"] = sum(out.values())
    return out


def clip_flops_per_sample(model_cfg, batch: BatchLayout, with_recompute: bool = False,
                          text_seq_length: int | None = None) -> float:
    """The CLIP family's `flops_per_sample`: model FLOPs of one training sample whose text tower
    ran on `text_seq_length` tokens (default: the whole context)."""
    return float(clip_flops_breakdown(model_cfg, batch.contrastive_batch, with_recompute, text_seq_length)["total"])


# -- decoder-only LLM (Llama-style) ------------------------------------------------------------------

def gpt_flops_per_token(*, num_layers: int, hidden: int, ffn: int, num_heads: int, seq_len: int, vocab_size: int,
                        num_query_groups: int | None = None, kv_channels: int | None = None,
                        gated_mlp: bool = True) -> float:
    """Training FLOPs per token of a decoder-only transformer with an output layer over the vocab:
    the matmul terms equal 6*N per token (N = parameters in matrices, the output layer included,
    the input embedding not), plus the attention term 12*L*s*(heads*head_dim)."""
    layer = transformer_layer_flops(seq_len, hidden, ffn, num_heads, num_query_groups, kv_channels, gated_mlp)
    forward = num_layers * sum(layer.values()) + linear_flops(seq_len, hidden, vocab_size)
    return TRAINING_MULTIPLIER * forward / seq_len


# -- peak throughput of accelerators -------------------------------------------------------------------

# Dense BF16 tensor-core TFLOP/s from the vendors' data sheets (no sparsity), by a pattern of the
# name `torch.cuda.get_device_name()` reports; the first match wins, so variants come first.
PEAK_BF16_DENSE_TFLOPS = [
    (r"\bGH200\b", 989.0),
    (r"\bH200\b", 989.0),
    (r"\bH100\b.*\bPCIE\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b", 989.0),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    (r"\bH800\b", 989.0),
    (r"\bB200\b", 2250.0),
    (r"\bA100\b", 312.0),
    (r"\bA800\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL4\b", 121.0),
]


def peak_tflops(device_name: str) -> float | None:
    """Dense BF16 peak of a device by its name, or None when the table does not know it."""
    name = device_name.upper()
    for pattern, tflops in PEAK_BF16_DENSE_TFLOPS:
        if re.search(pattern, name):
            return tflops
    return None
