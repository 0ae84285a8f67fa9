"""CLIP's configuration: the model (NeMo's key names, model.vision.*, model.text.*), its data and
evaluation sections, and the experiment that adds them to the engine's generic sections."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from data.config import TokenizerConfig
from engine.config_checks import at_least, greater_than, one_of, pair_in, probability
from engine.schema import ExperimentConfig, TrainerConfig
from models.clip.distill import DISTILL_MODES, DistillConfig
from models.clip.fastclip import GAMMA_SCHEDULES, TAU_SCHEDULES
from models.clip.finetune import SCENARIOS, FinetuneConfig
from models.clip.loss_factory import LOSS_NAMES, LossConfig


@dataclass
class VisionConfig:
    """ViT image tower. Sizes per model live in configs/clip/<size>.yaml."""

    patch_dim: int = 16
    img_h: int = 224
    img_w: int = 224
    num_channels: int = 3
    image_mean: Optional[list] = None  # None -> the CLIP mean; used by the data transforms
    image_std: Optional[list] = None
    # NeMo's yaml pads with 8 class tokens; 1 matches open_clip and the parameter counts of NeMo's table.
    class_token_length: int = 1
    global_average_pool: bool = False  # mean over patch tokens instead of the first class token
    output_dim: int = "${model.output_dim}"  # type: ignore[assignment]
    num_layers: int = 12
    hidden_size: int = 768
    ffn_hidden_size: int = 3072
    num_attention_heads: int = 12
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1e-5
    activation: str = "gelu"  # gelu (open_clip), quick_gelu (OpenAI weights)
    # Activation checkpointing (NeMo's keys): granularity full | selective | null; method uniform |
    # block and num_layers for full. selective recomputes core attention only (megatron-core's other
    # selective modules need Transformer Engine).
    activations_checkpoint_granularity: Optional[str] = None
    activations_checkpoint_method: Optional[str] = None
    activations_checkpoint_num_layers: Optional[int] = None

    @property
    def num_patches(self) -> int:
        return (self.img_h // self.patch_dim) * (self.img_w // self.patch_dim)

    @property
    def seq_length(self) -> int:
        return self.num_patches + self.class_token_length


@dataclass
class TextConfig:
    """Causal text transformer pooled at the end-of-text token."""

    vocab_size: int = 49408  # embedding rows (CLIP BPE: 49408); raised to the tokenizer's size if smaller
    encoder_seq_length: int = 77  # context length
    output_dim: int = "${model.output_dim}"  # type: ignore[assignment]
    num_layers: int = 12
    hidden_size: int = 512
    ffn_hidden_size: int = 2048
    num_attention_heads: int = 8
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1e-5
    activation: str = "gelu"
    # -1: pool at the highest token id (open_clip: the CLIP BPE end-of-text id is the largest);
    # otherwise the first position holding this id. The training script sets it from the tokenizer.
    eot_token_id: int = -1
    make_vocab_size_divisible_by: int = 128  # Megatron pads the vocab to a multiple of this x TP
    # Run the tower on each batch's tokens up to its last end-of-text position (rounded up to a
    # multiple of 8), not on the whole context: the causal mask keeps every pooled token blind to the
    # padding after it, so the features, loss and gradients are the same (as HF's padding="longest").
    # Training and encode_text only; a pipelined tower keeps the full length (fixed message shapes).
    trim_to_longest: bool = True
    # Activation checkpointing (NeMo's keys): granularity full | selective | null; method uniform |
    # block and num_layers for full. selective recomputes core attention only (megatron-core's other
    # selective modules need Transformer Engine).
    activations_checkpoint_granularity: Optional[str] = None
    activations_checkpoint_method: Optional[str] = None
    activations_checkpoint_num_layers: Optional[int] = None


@dataclass
class CLIPConfig:
    output_dim: int = 512
    local_loss: bool = False
    gather_with_grad: bool = True
    init_logit_scale: float = 2.6592  # ln(1/0.07), as CLIP
    max_logit_scale: float = 100.0  # the scale is clamped to this after exp, as open_clip
    attention_backend: str = "sdpa"  # sdpa | flash | te
    use_flash_attention: bool = False  # NeMo's switch; true asks for flash-attn (falls back to sdpa)
    megatron_amp_O2: bool = False  # with bf16/fp16: low-precision params, fp32 master weights and grads
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # The training loss: clip (contrastive) or fastclip (global contrastive, per-sample state)
    loss: LossConfig = field(default_factory=LossConfig)
    # A frozen reference model: distillation and/or init from it (models/clip/distill.py)
    distill: DistillConfig = field(default_factory=DistillConfig)
    # Fine-tuning scenario and LoRA (null scenario: pre-training, every parameter trains)
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(scenario=None))


@dataclass
class SyntheticDataConfig:
    """The compositional shapes data set written when `data.train_shards` is empty."""

    out_dir: str = "data_cache/shapes"
    num_train: int = 20000
    num_eval: int = 1000
    image_size: int = 64
    samples_per_shard: int = 1000
    seed: int = 0


@dataclass
class CLIPDataConfig:
    train_shards: Optional[str] = None  # brace pattern, glob, directory; None = synthetic data
    eval_shards: Optional[str] = None
    classes_file: Optional[str] = None  # zero-shot class names and prompt templates (json)
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shuffle_buffer: int = 1000
    num_workers: int = 0
    random_crop_scale: list = field(default_factory=lambda: [0.9, 1.0])
    # Training augmentation preset (data/augment.py): null (random resized crop of random_crop_scale),
    # simple (resize, flip, padded random crop) or advanced (resize, TrivialAugmentWide, random erasing)
    augmentation: Optional[str] = None


@dataclass
class EarlyStoppingConfig:
    """Stop when `monitor` (an evaluation metric: val_loss, zero_shot_top1, image_to_text_R@1, ...)
    has not improved by more than `min_delta` for `patience` evaluations in a row (every
    trainer.val_check_interval steps); the run saves a checkpoint and exits 0."""

    monitor: Optional[str] = None  # null: off
    patience: int = 2
    min_delta: float = 0.001
    mode: str = "min"  # min (a loss) | max (an accuracy)


@dataclass
class CLIPEvalConfig:
    zero_shot: bool = True
    retrieval: bool = True
    batch_size: int = 256
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


@dataclass
class BatchFinderConfig:
    """The largest micro-batch that fits, found before training by trial and back-off among the
    divisors of global_batch_size / DP (so accumulation still divides): on GPU by catching
    out-of-memory, on CPU against `memory_budget_gb` (parameters, gradients and Adam state plus
    what the forward saves for backward). It replaces trainer.micro_batch_size."""

    enabled: bool = False
    memory_budget_gb: Optional[float] = None  # required on CPU; on GPU optional (else: out-of-memory decides)
    max_micro_batch: Optional[int] = None  # upper limit (default global_batch_size / DP)


@dataclass
class CLIPExperimentConfig(ExperimentConfig):
    """One CLIP pre-training experiment (`configs/clip/*.yaml` mirror it 1:1)."""

    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(output_dir="runs/clip"))
    model: CLIPConfig = field(default_factory=CLIPConfig)
    data: CLIPDataConfig = field(default_factory=CLIPDataConfig)
    eval: CLIPEvalConfig = field(default_factory=CLIPEvalConfig)
    batch_finder: BatchFinderConfig = field(default_factory=BatchFinderConfig)

    RULES: ClassVar[list] = [
        ("model.attention_backend", one_of("sdpa", "flash", "te")),
        ("model.*.activation", one_of("gelu", "quick_gelu", "silu")),
        ("model.*.activations_checkpoint_granularity", one_of("full", "selective")),
        ("model.*.activations_checkpoint_method", one_of("uniform", "block")),
        ("model.*.activations_checkpoint_num_layers", at_least(1, integer=True)),
        ("model.*output_dim", at_least(1, integer=True)),
        ("model.max_logit_scale", greater_than(0)),
        ("model.vision.class_token_length", at_least(0, integer=True)),
        ("model.vision.patch_dim", at_least(1, integer=True)),
        ("model.vision.img_*", at_least(1, integer=True)),
        ("model.vision.num_channels", at_least(1, integer=True)),
        ("model.text.vocab_size", at_least(1, integer=True)),
        ("model.text.encoder_seq_length", at_least(2, integer=True)),
        ("model.text.make_vocab_size_divisible_by", at_least(1, integer=True)),
        ("data.tokenizer.type", one_of("sentencepiece", "clip_bpe")),
        ("data.tokenizer.vocab_size", at_least(8, integer=True)),
        ("data.shuffle_buffer", at_least(0, integer=True)),
        ("data.random_crop_scale", pair_in(0.0, 1.0, ascending=True, open_low=True)),
        ("data.synthetic.num_train", at_least(1, integer=True)),
        ("data.synthetic.num_eval", at_least(0, integer=True)),
        ("data.synthetic.image_size", at_least(8, integer=True)),
        ("data.synthetic.samples_per_shard", at_least(1, integer=True)),
        ("data.augmentation", one_of("simple", "advanced")),
        ("model.loss.name", one_of(*LOSS_NAMES)),
        ("model.loss.version", one_of("v0", "v1", "v2", "v3", "sogclr", "isogclr", "gcl", "rgcl", "rgcl_g")),
        ("model.loss.gamma_schedule", one_of(*GAMMA_SCHEDULES)),
        ("model.loss.lr_tau_scheduler", one_of(*TAU_SCHEDULES)),
        ("model.loss.gamma", greater_than(0)),
        ("model.loss.gamma_decay_epochs", at_least(0, integer=True)),
        ("model.loss.temperature", greater_than(0)),
        ("model.loss.tau_min", greater_than(0)),
        ("model.loss.tau_max", greater_than(0)),
        ("model.loss.fastclip_eps", at_least(0)),
        ("model.loss.tau_beta*", probability()),
        ("model.distill.mode", one_of(*DISTILL_MODES)),
        ("model.distill.weight", probability(upper_open=False)),
        ("model.distill.teacher_format", one_of("engine", "open_clip", "hf")),
        ("model.finetune.scenario", one_of(*SCENARIOS)),
        ("model.finetune.lora.rank", at_least(1, integer=True)),
        ("model.finetune.lora.alpha", greater_than(0)),
        ("eval.early_stopping.patience", at_least(0, integer=True)),
        ("eval.early_stopping.min_delta", at_least(0)),
        ("eval.early_stopping.mode", one_of("min", "max")),
        ("batch_finder.memory_budget_gb", greater_than(0)),
        ("batch_finder.max_micro_batch", at_least(1, integer=True)),
    ]
