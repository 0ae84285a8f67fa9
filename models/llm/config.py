"""LLM model configuration, with NeMo/Megatron key names (model.*), and size presets.

The defaults are Llama-3.2-1B's shape; `PRESETS` holds `tiny` (tests and the CPU demo),
`llama3.2-1b` and `llama3-8b` with the dimensions Meta published (config.json of the Hugging Face
releases). `LLMExperimentConfig` adds the model, data and eval sections to the engine's generic ones.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from engine.config_checks import at_least, greater_than, one_of, probability
from engine.schema import ExperimentConfig, OptimConfig, TrainerConfig

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


# -- the experiment (configs/llm/*.yaml mirror it 1:1) ---------------------------------------------
@dataclass
class LLMTokenizerConfig:
    type: str = "huggingface"  # huggingface (a tokenizer.json or its directory) | sentencepiece (a .model)
    # None: the synthetic corpus's word-level tokenizer.json (only without data.train_shards)
    path: Optional[str] = None
    # huggingface: special-token names; None reads tokenizer_config.json beside the file, then common names
    # (Llama 3's <|begin_of_text|> / <|end_of_text|>, </s>, ...). The eos token ends each document.
    bos_token: Optional[str] = None
    eos_token: Optional[str] = None


@dataclass
class MarkovCorpusConfig:
    """The synthetic corpus written when `data.train_shards` is empty: an order-2 Markov source over
    made-up words with a known entropy rate (data/text_synthetic.py), so validation loss has a floor."""

    out_dir: str = "data_cache/markov"
    num_train: int = 20000  # documents
    num_eval: int = 1000
    docs_per_shard: int = 2000
    num_words: int = 64
    branching: int = 6  # words each two-word context can continue with
    alpha: float = 0.5  # Dirichlet concentration of each context's next-word distribution
    mean_doc_words: float = 40.0
    seed: int = 0


@dataclass
class LLMDataConfig:
    # WebDataset tar shards with txt members or jsonl files (brace pattern, glob, directory);
    # None: the synthetic Markov corpus
    train_shards: Optional[str] = None
    eval_shards: Optional[str] = None
    text_key: str = "text"  # the field of a jsonl line that holds the document
    tokenizer: LLMTokenizerConfig = field(default_factory=LLMTokenizerConfig)
    synthetic: MarkovCorpusConfig = field(default_factory=MarkovCorpusConfig)
    shuffle_buffer: int = 1000  # documents
    eod_mask_loss: bool = False  # Megatron's --eod-mask-loss: no loss on predictions made at an EOD input
    add_bos: bool = False  # start every document with the tokenizer's bos token (Llama 3 pretraining)


@dataclass
class LLMEvalConfig:
    batch_size: int = 16  # sequences per forward pass
    num_batches: int = 0  # validation batches per evaluation, split over DP (0: the whole eval set)


@dataclass
class LLMExperimentConfig(ExperimentConfig):
    """One LLM pre-training experiment."""

    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(output_dir="runs/llm"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3.0e-4, weight_decay=0.1, betas=[0.9, 0.95],
                                                                   eps=1.0e-8))
    model: LLMConfig = field(default_factory=LLMConfig)
    data: LLMDataConfig = field(default_factory=LLMDataConfig)
    eval: LLMEvalConfig = field(default_factory=LLMEvalConfig)

    RULES: ClassVar[list] = [
        ("model.num_query_groups", at_least(1, integer=True)),
        ("model.kv_channels", at_least(1, integer=True)),
        ("model.seq_length", at_least(1, integer=True)),
        ("model.max_position_embeddings", at_least(1, integer=True)),
        ("model.vocab_size", at_least(1, integer=True)),
        ("model.make_vocab_size_divisible_by", at_least(1, integer=True)),
        ("model.normalization", one_of("RMSNorm", "LayerNorm")),
        ("model.activation", one_of("swiglu", "geglu", "gelu", "silu", "relu")),
        ("model.position_embedding_type", one_of("rope")),
        ("model.rotary_base", greater_than(0)),
        ("model.rotary_percent", probability(upper_open=False)),
        ("model.rope_scaling.type", one_of(*ROPE_SCALING_TYPES)),
        ("model.rope_scaling.factor", greater_than(0)),
        ("model.rope_scaling.*_freq_factor", greater_than(0)),
        ("model.rope_scaling.original_max_position_embeddings", at_least(1, integer=True)),
        ("model.layernorm_epsilon", greater_than(0)),
        ("model.init_method_std", greater_than(0)),
        ("model.attention_backend", one_of("sdpa", "flash", "te")),
        ("model.activations_checkpoint_granularity", one_of("full", "selective")),
        ("model.activations_checkpoint_method", one_of("uniform", "block")),
        ("model.activations_checkpoint_num_layers", at_least(1, integer=True)),
        ("data.tokenizer.type", one_of("huggingface", "sentencepiece")),
        ("data.shuffle_buffer", at_least(0, integer=True)),
        ("data.synthetic.num_train", at_least(1, integer=True)),
        ("data.synthetic.num_eval", at_least(0, integer=True)),
        ("data.synthetic.docs_per_shard", at_least(1, integer=True)),
        ("data.synthetic.num_words", at_least(2, integer=True)),
        ("data.synthetic.branching", at_least(1, integer=True)),
        ("data.synthetic.alpha", greater_than(0)),
        ("data.synthetic.mean_doc_words", greater_than(1)),
        ("eval.num_batches", at_least(0, integer=True)),
    ]
