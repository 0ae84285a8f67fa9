"""LLM model configuration, with NeMo/Megatron key names (model.*), and size presets.

The defaults are Llama-3.2-1B's shape; `PRESETS` holds `tiny` (tests and the CPU demo),
`llama3.2-1b` and `llama3-8b` with the dimensions Meta published (config.json of the Hugging Face
releases).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

ROPE_SCALING_TYPES = ("none", "llama3")


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling. `llama3` (Llama 3.1/3.2): frequencies with wavelengths above
    original_max_position_embeddings / low_freq_factor are divided by `factor`, those below
    original_max_position_embeddings / high_freq_factor kept, the band between interpolated."""

    type: str = "none"  # none | llama3 (Hugging Face: rope_scaling.rope_type)
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class LLMConfig:
    num_layers: int = 16
    hidden_size: int = 2048
    ffn_hidden_size: int = 8192
    num_attention_heads: int = 32
    num_query_groups: int | None = 8  # key/value heads (grouped-query attention); None: one per head
    kv_channels: int | None = None  # head size; None: hidden_size / num_attention_heads
    seq_length: int = 2048  # training sequence length (the data packs documents into it)
    max_position_embeddings: int = 131072  # longest sequence the model accepts (generation included)
    vocab_size: int = 128256  # true vocabulary; the embedding is padded (make_vocab_size_divisible_by x TP)
    make_vocab_size_divisible_by: int = 128
    normalization: str = "RMSNorm"  # RMSNorm | LayerNorm
    activation: str = "swiglu"  # swiglu (silu GLU) | geglu | gelu | silu | relu
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    qk_layernorm: bool = False  # per-head query/key norm (OLMo-2, Qwen3); not in Llama
    position_embedding_type: str = "rope"  # rope only
    rotary_base: float = 500000.0  # Hugging Face: rope_theta
    rotary_percent: float = 1.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    share_embeddings_and_output_weights: bool = True  # tied input/output embeddings (Llama-3.2-1B: tied)
    layernorm_epsilon: float = 1e-5  # Hugging Face: rms_norm_eps
    init_method_std: float = 0.02  # output projections get std / sqrt(2 * num_layers) (Megatron)
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    attention_backend: str = "sdpa"  # sdpa | flash | te
    use_flash_attention: bool = False  # NeMo's switch; true asks for flash-attn (falls back to sdpa)
    # Activation checkpointing (NeMo's keys): granularity full | selective | null; method uniform |
    # block and num_layers for full. selective recomputes core attention only.
    activations_checkpoint_granularity: str | None = None
    activations_checkpoint_method: str | None = None
    activations_checkpoint_num_layers: int | None = None
    megatron_amp_O2: bool = False  # with bf16/fp16: low-precision params, fp32 master weights and grads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads


def validate_llm_config(cfg: LLMConfig) -> None:
    """Errors that name the key, for what the TransformerConfig builder does not see."""
    if cfg.position_embedding_type != "rope":
        raise ValueError(f"model.position_embedding_type={cfg.position_embedding_type!r}: only rope is implemented")
    if cfg.rope_scaling.type not in ROPE_SCALING_TYPES:
        raise ValueError(f"model.rope_scaling.type={cfg.rope_scaling.type!r}: use one of {', '.join(ROPE_SCALING_TYPES)}")
    if cfg.rope_scaling.type == "llama3" and not cfg.rope_scaling.high_freq_factor > cfg.rope_scaling.low_freq_factor:
        raise ValueError("model.rope_scaling: high_freq_factor must be larger than low_freq_factor")
    if not 0.0 < cfg.rotary_percent <= 1.0:
        raise ValueError(f"model.rotary_percent={cfg.rotary_percent}: must be in (0, 1]")
    if cfg.seq_length > cfg.max_position_embeddings:
        raise ValueError(f"model.seq_length={cfg.seq_length} exceeds model.max_position_embeddings="
                         f"{cfg.max_position_embeddings}")
    if cfg.vocab_size < 1:
        raise ValueError(f"model.vocab_size={cfg.vocab_size} must be positive")


PRESETS = {
    # A few hundred thousand parameters: CPU tests and the demo on the synthetic corpus.
    "tiny": LLMConfig(num_layers=4, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2,
                      seq_length=128, max_position_embeddings=1024, vocab_size=512, rotary_base=10000.0,
                      make_vocab_size_divisible_by=64, share_embeddings_and_output_weights=True),
    # meta-llama/Llama-3.2-1B config.json.
    "llama3.2-1b": LLMConfig(num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
                             num_query_groups=8, seq_length=8192, max_position_embeddings=131072, vocab_size=128256,
                             rotary_base=500000.0, share_embeddings_and_output_weights=True,
                             rope_scaling=RopeScalingConfig("llama3", 32.0, 1.0, 4.0, 8192)),
    # meta-llama/Meta-Llama-3-8B config.json.
    "llama3-8b": LLMConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                           num_query_groups=8, seq_length=8192, max_position_embeddings=8192, vocab_size=128256,
                           rotary_base=500000.0, share_embeddings_and_output_weights=False),
}


def llm_preset(name: str, **overrides) -> LLMConfig:
    """A copy of a preset, with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown LLM preset {name!r}: use one of {', '.join(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[name])
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def llm_layout_problems(cfg: LLMConfig, tp: int, pp: int) -> list[str]:
    """Every way TP and PP do not fit this model, each naming its key (for a family's layout check,
    before any process group exists); empty when the layout works."""
    problems = []

    def divides(key: str, value: int, degree_key: str, degree: int) -> None:
        if degree and value % degree:
            problems.append(f"model.{key}={value} is not divisible by {degree_key}={degree}")

    divides("num_attention_heads", cfg.num_attention_heads, "tensor_model_parallel_size", tp)
    divides("num_query_groups", cfg.query_groups, "tensor_model_parallel_size", tp)
    divides("ffn_hidden_size", cfg.ffn_hidden_size, "tensor_model_parallel_size", tp)
    divides("num_layers", cfg.num_layers, "pipeline_model_parallel_size", pp)
    if cfg.num_attention_heads % cfg.query_groups:
        problems.append(f"model.num_attention_heads={cfg.num_attention_heads} is not divisible by "
                        f"model.num_query_groups={cfg.query_groups}")
    if cfg.share_embeddings_and_output_weights and pp > 1:
        problems.append(f"model.share_embeddings_and_output_weights=true with pipeline_model_parallel_size={pp}: "
                        "untie the embeddings (false) or use pipeline_model_parallel_size=1")
    try:
        validate_llm_config(cfg)
    except ValueError as exc:
        problems.append(str(exc))
    return problems


def llm_vocab_rows(cfg: LLMConfig, tp: int) -> int:
    """Rows of the vocab-parallel embedding / output layer at tensor-parallel size `tp` (full size)."""
    multiple = cfg.make_vocab_size_divisible_by * tp
    return -(-cfg.vocab_size // multiple) * multiple
