"""Predicted memory per rank for a CLIP config and parallel layout (parameters, gradients,
optimizer state, activations), for planning runs from B/32 to e/14 before launching them.

Parameters are counted from the config the way the towers are built (TP splits QKV/FC1 rows,
PROJ/FC2 columns and the vocab; norms, biases of row-parallel layers, embeddings outside the
block and projections are replicated; PP splits the layers, the worst stage is reported).

Activations per transformer layer and micro-batch follow Korthikanti et al. 2022 ("Reducing
Activation Recomputation in Large Transformer Models"), written for 2-byte activations:
    s*b*h*(10 + 24/t + 5*a*s/(h*t))  bytes       (TP degree t, no sequence parallelism)
minus the dropout masks when dropout is 0 (2*s*b*h + a*s*s*b/t bytes), minus the attention-score
term 5*a*s/(h*t) when attention does not store scores (flash kernels, or selective recompute),
scaled by the activation element size / 2. Full recompute keeps only each layer's input (2*s*b*h
at 2 bytes) plus one layer's full activations while it is recomputed. Activations of the
embeddings, pooling and loss are small for CLIP and are not counted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class TowerCounts:
    per_layer: int  # parameters of one transformer layer on one TP rank
    outside: int  # parameters outside the layers (embeddings, norms, projection) on one TP rank
    layers: int


def _layer_params(h: int, f: int, tp: int) -> int:
    split = (3 * h * h + 3 * h) + h * h + (h * f + f) + f * h  # qkv w+b, proj w, fc1 w+b, fc2 w
    replicated = h + h + 4 * h  # proj bias, fc2 bias, two layer norms
    return split // tp + replicated


def vision_counts(v, tp: int) -> TowerCounts:
    outside = v.num_channels * v.hidden_size * v.patch_dim ** 2 + v.class_token_length * v.hidden_size \
        + v.seq_length * v.hidden_size + 2 * v.hidden_size + 2 * v.hidden_size + v.hidden_size * v.output_dim
    return TowerCounts(_layer_params(v.hidden_size, v.ffn_hidden_size, tp), outside, v.num_layers)


def text_counts(t, tp: int) -> TowerCounts:
    multiple = t.make_vocab_size_divisible_by * tp
    vocab = math.ceil(t.vocab_size / multiple) * multiple
    outside = vocab * t.hidden_size // tp + t.encoder_seq_length * t.hidden_size + 2 * t.hidden_size \
        + t.hidden_size * t.output_dim
    return TowerCounts(_layer_params(t.hidden_size, t.ffn_hidden_size, tp), outside, t.num_layers)


def params_per_rank(model_cfg, tp: int, pp: int = 1) -> int:
    """Parameters held by the most loaded rank (+1 for logit_scale)."""
    total = 1
    for counts in (vision_counts(model_cfg.vision, tp), text_counts(model_cfg.text, tp)):
        total += math.ceil(counts.layers / pp) * counts.per_layer + counts.outside
    return total


def _activation_bytes_per_layer(s: int, b: int, h: int, a: int, tp: int, dropout: bool, stores_scores: bool,
                                elem_bytes: int) -> float:
    per = s * b * h * (10 + 24 / tp)
    if stores_scores:
        per += 5 * a * s * s * b / tp
    if not dropout:
        per -= 2 * s * b * h + (a * s * s * b / tp if stores_scores else 0)
    return per * elem_bytes / 2


def tower_activation_bytes(tower, seq: int, micro_batch: int, tp: int, pp: int, elem_bytes: int,
                           stores_scores: bool) -> float:
    layers = math.ceil(tower.num_layers / pp)
    dropout = tower.hidden_dropout > 0 or tower.attention_dropout > 0
    granularity = tower.activations_checkpoint_granularity
    scores = stores_scores and granularity != "selective"
    full_layer = _activation_bytes_per_layer(seq, micro_batch, tower.hidden_size, tower.num_attention_heads, tp,
                                             dropout, scores, elem_bytes)
    if granularity == "full":
        layer_input = seq * micro_batch * tower.hidden_size * elem_bytes
        return layers * layer_input + full_layer
    # PP with 1F1B keeps up to pp micro-batches in flight on the first stage
    return layers * full_layer * pp


def estimate(cfg, tp: int, pp: int, dp: int, flash_attention: bool | None = None) -> dict:
    """Bytes per rank; `cfg` is an `ExperimentConfig`."""
    precision = cfg.trainer.precision
    o2 = cfg.model.megatron_amp_O2 and precision != "fp32"
    param_bytes = 4 if precision == "fp32" or not o2 else 2
    act_bytes = DTYPE_BYTES.get(precision, 4)
    n = params_per_rank(cfg.model, tp, pp)
    sharded = cfg.optim.name == "distributed_fused_adam"
    flat = sharded or o2  # FlatAdamW: fp32 main_grad buffer + fp32 master and moments
    shards = dp if sharded else 1
    # FlatAdamW: fp32 main_grad buffer (+ this rank's reduce-scattered shard), two fp32 moments,
    # and an fp32 master copy only for low-precision parameters. torch AdamW: .grad + two moments.
    grads = 4 * n + (4 * n / shards if sharded else 0) if flat else param_bytes * n
    optimizer = (12 if param_bytes == 2 else 8) * n / shards if flat else 8 * n
    if flash_attention is None:
        # torch SDPA without an explicit mask runs a fused kernel (flash on GPU, and a flash-style
        # kernel on CPU), as do flash-attn and TE: none of them stores the attention scores.
        flash_attention = True
    mb = cfg.trainer.micro_batch_size
    v, t = cfg.model.vision, cfg.model.text
    activations = tower_activation_bytes(v, v.seq_length, mb, tp, pp, act_bytes, not flash_attention) + \
        tower_activation_bytes(t, t.encoder_seq_length, mb, tp, pp, act_bytes, not flash_attention)
    total = n * param_bytes + grads + optimizer + activations
    return {"parameters": n, "param_bytes": n * param_bytes, "grad_bytes": grads, "optimizer_bytes": optimizer,
            "activation_bytes": activations, "total_bytes": total}


def format_report(est: dict, label: str) -> str:
    gib = 2 ** 30
    return (f"{label}: {est['parameters'] / 1e6:.1f}M parameters per rank | params {est['param_bytes'] / gib:.2f} GiB"
            f" | grads {est['grad_bytes'] / gib:.2f} GiB | optimizer {est['optimizer_bytes'] / gib:.2f} GiB"
            f" | activations {est['activation_bytes'] / gib:.2f} GiB | total {est['total_bytes'] / gib:.2f} GiB")


