"""The global DiT's configuration: the model (with its flow-matching objective), the embedding data it
trains on, its evaluation, and the experiment that adds them to the engine's generic sections.

Defaults are the BLIP3-o global DiT's (hidden 768, 12 layers, 12 heads, adapter MLP 2048, output
768; conditioning 256 patch tokens of width 4096; sigma_min 1e-4, sigma_max 1.0, v-prediction,
contrastive weight 0.1). configs/dit/*.yaml mirror `DiTExperimentConfig` 1:1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from engine.config_checks import at_least, greater_than, one_of, probability
from engine.schema import ExperimentConfig, TrainerConfig

TOKEN_LAYOUTS = ("add", "concat")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")
PREDICTION_TYPES = ("v_prediction",)
TARGETS = ("mean_pooled_patches", "image_embedding")
SAMPLERS = ("euler", "heun")


@dataclass
class FlowMatchingConfig:
    """The objective (the interpolation convention is stated once, in models/dit/flow.py)."""

    sigma_min: float = 1.0e-4  # noise left at t=1
    sigma_max: float = 1.0  # noise scale at t=0 (the sampler's starting point)
    prediction_type: str = "v_prediction"  # the network predicts the velocity dx_t/dt
    timestep_sampling: str = "uniform"  # uniform | logit_normal (SD3's, t = sigmoid(N(mean, std)))
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    # Probability of replacing a sample's conditioning tokens by the learned null condition, so the
    # model also learns the unconditional velocity (classifier-free guidance at sampling).
    condition_dropout: float = 0.0
    use_contrastive_loss: bool = True  # InfoNCE between the predicted clean vector and the target
    contrastive_weight: float = 0.1
    contrastive_temperature: float = 0.07
    gather_with_grad: bool = True  # the contrastive batch is gathered over DP, gradients through the gather


@dataclass
class DiTConfig:
    """Conditioning patch features [P, condition_dim] and a noisy global vector [output_dim] ->
    the velocity [output_dim], through megatron-core layers with adaLN-zero and 3D RoPE."""

    condition_dim: int = 4096  # width of the conditioning tower's patch features (EVA-CLIP-8B: 4096)
    condition_grid: list = field(default_factory=lambda: [16, 16])  # patch rows x columns (256 tokens)
    condition_norm: bool = True  # LayerNorm over the conditioning features before their projection
    num_layers: int = 12
    hidden_size: int = 768
    ffn_hidden_size: int = 3072
    num_attention_heads: int = 12
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1.0e-6
    activation: str = "gelu"
    # add: every patch token is its projected conditioning feature plus the projected noisy vector
    # (the seed's "expand to patches"); concat: the noisy vector's copies are tokens of their own
    # after the conditioning tokens (twice the sequence), told apart by the RoPE type axis.
    token_layout: str = "add"
    timestep_frequency_dim: int = 256  # sinusoidal features of t before the timestep MLP (DiT's 256)
    timestep_scale: float = 1000.0  # t in [0, 1] is multiplied by this before the sinusoid (DiT)
    # Rotary frequencies per axis (token type or time, row, column); they sum to head_dim / 2.
    # null: head_dim / 2 split 1/4, 3/8, 3/8 (Lumina-Next's 16/24/24 of a 64-wide head).
    rope_sections: Optional[list] = None
    rope_base: float = 10000.0
    # per_axis: a geometric frequency range per axis (Lumina-Next, Flux); shared: megatron-core's
    # MultimodalRotaryEmbedding frequencies (one range cut into the sections)
    rope_frequencies: str = "per_axis"
    attention_pool_heads: Optional[int] = None  # null: num_attention_heads
    adapter_hidden_size: int = 2048  # the global adapter MLP
    clip_width: int = 1024  # the adapter's output: the target CLIP's vision width (ViT-L/14: 1024)
    output_dim: int = 768  # the CLIP embedding (after the CLIP projection)
    # Initialise the CLIP projection from the target tower's visual projection (in the train data).
    init_projection_from_target: bool = True
    attention_backend: str = "sdpa"  # sdpa | flash (the adaLN layers keep the norm outside the QKV linear)
    use_flash_attention: bool = False
    megatron_amp_O2: bool = False
    activations_checkpoint_granularity: Optional[str] = None  # full | selective | null (NeMo's keys)
    activations_checkpoint_method: Optional[str] = None  # uniform | block
    activations_checkpoint_num_layers: Optional[int] = None
    flow: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)

    @property
    def num_patches(self) -> int:
        return int(self.condition_grid[0]) * int(self.condition_grid[1])

    @property
    def seq_length(self) -> int:
        return self.num_patches * (2 if self.token_layout == "concat" else 1)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class DemoConfig:
    """The default run without data: a target CLIP trained on the synthetic shapes (or the README
    demo's checkpoint), a second, randomly initialised vision tower as the conditioning tower, and
    both extracted over the shapes (models/dit/demo.py)."""

    out_dir: str = "data_cache/dit_demo"
    # Reused when it holds a checkpoint (the README demo writes it); otherwise a CLIP is trained there.
    clip_checkpoint: str = "runs/clip_tiny/checkpoints"
    clip_run_dir: str = "runs/dit_demo_clip"  # where the demo trains its own target CLIP
    clip_config: str = "configs/clip/tiny.yaml"
    clip_overrides: list = field(default_factory=lambda: [
        "trainer.max_steps=120", "trainer.micro_batch_size=96", "trainer.global_batch_size=96",
        "trainer.val_check_interval=0", "trainer.log_every_n_steps=20", "optim.sched.warmup_steps=15",
        "model.vision.num_layers=2", "model.text.num_layers=2", "eval.zero_shot=false", "eval.retrieval=false"])
    # The conditioning tower: a CLIP vision tower of this config, randomly initialised with its own seed.
    condition_tower_overrides: list = field(default_factory=lambda: [
        "model.vision.patch_dim=8", "model.vision.hidden_size=96", "model.vision.ffn_hidden_size=192",
        "model.vision.num_layers=2", "model.vision.num_attention_heads=4"])
    condition_tower_seed: int = 97
    train_shards: int = 4  # synthetic train shards extracted for training (1000 samples each)
    eval_shards: int = 1  # further train-distribution shards extracted for evaluation
    samples_per_chunk: int = 500


@dataclass
class DiTDataConfig:
    # Directories written by examples/extract_embeddings.py (manifest.json + chunks); null = the demo.
    train_dir: Optional[str] = None
    eval_dir: Optional[str] = None
    # x1: the mean-pooled target patch features through the target tower's visual projection (the
    # seed's definition), or the target tower's own image embedding (class token).
    target: str = "mean_pooled_patches"
    normalize_target: bool = True  # x1 = target_scale * x / |x|
    target_scale: Optional[float] = None  # null: sqrt(output_dim), unit variance per dimension like the noise
    shuffle: bool = True
    verify_checksums: bool = False  # sha256 of every chunk at start (sizes are always checked)
    demo: DemoConfig = field(default_factory=DemoConfig)


@dataclass
class DiTEvalConfig:
    enabled: bool = True
    sampler: str = "euler"  # euler | heun
    num_steps: int = 50
    guidance_scale: float = 1.0  # classifier-free guidance (1: conditional velocity only)
    seed: int = 0  # initial noise of sample i is drawn from (seed, i): the same on any layout
    batch_size: int = 256  # per data-parallel rank
    max_samples: Optional[int] = None  # null: the whole eval set
    baselines: bool = True  # the target tower's own embedding and a linear map from the conditioning
    baseline_fit_samples: int = 20000  # training samples the linear baseline is fitted on
    baseline_ridge: float = 1.0e-3  # ridge penalty, relative to the mean feature variance


@dataclass
class DiTExperimentConfig(ExperimentConfig):
    """One global DiT experiment (`configs/dit/*.yaml` mirror it 1:1)."""

    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(output_dir="runs/dit"))
    model: DiTConfig = field(default_factory=DiTConfig)
    data: DiTDataConfig = field(default_factory=DiTDataConfig)
    eval: DiTEvalConfig = field(default_factory=DiTEvalConfig)

    RULES: ClassVar[list] = [
        ("model.condition_dim", at_least(1, integer=True)),
        ("model.ffn_hidden_size", at_least(1, integer=True)),
        ("model.token_layout", one_of(*TOKEN_LAYOUTS)),
        ("model.timestep_frequency_dim", at_least(2, integer=True)),
        ("model.timestep_scale", greater_than(0)),
        ("model.rope_base", greater_than(1)),
        ("model.rope_frequencies", one_of("per_axis", "shared")),
        ("model.attention_pool_heads", at_least(1, integer=True)),
        ("model.adapter_hidden_size", at_least(1, integer=True)),
        ("model.clip_width", at_least(1, integer=True)),
        ("model.output_dim", at_least(1, integer=True)),
        ("model.attention_backend", one_of("sdpa", "flash")),
        ("model.activation", one_of("gelu", "quick_gelu", "silu")),
        ("model.activations_checkpoint_granularity", one_of("full", "selective")),
        ("model.activations_checkpoint_method", one_of("uniform", "block")),
        ("model.activations_checkpoint_num_layers", at_least(1, integer=True)),
        ("model.flow.sigma_min", at_least(0)),
        ("model.flow.sigma_max", greater_than(0)),
        ("model.flow.prediction_type", one_of(*PREDICTION_TYPES)),
        ("model.flow.timestep_sampling", one_of(*TIMESTEP_SAMPLINGS)),
        ("model.flow.logit_normal_std", greater_than(0)),
        ("model.flow.condition_dropout", probability()),
        ("model.flow.contrastive_weight", at_least(0)),
        ("model.flow.contrastive_temperature", greater_than(0)),
        ("data.target", one_of(*TARGETS)),
        ("data.target_scale", greater_than(0)),
        ("data.demo.train_shards", at_least(1, integer=True)),
        ("data.demo.eval_shards", at_least(1, integer=True)),
        ("data.demo.samples_per_chunk", at_least(1, integer=True)),
        ("eval.sampler", one_of(*SAMPLERS)),
        ("eval.num_steps", at_least(1, integer=True)),
        ("eval.guidance_scale", at_least(0)),
        ("eval.max_samples", at_least(1, integer=True)),
        ("eval.baseline_fit_samples", at_least(1, integer=True)),
        ("eval.baseline_ridge", at_least(0)),
    ]


def model_problems(cfg: DiTConfig) -> list[str]:
    """Inconsistencies between model keys that no single range check sees (each names its keys)."""
    problems = []
    if len(cfg.condition_grid) != 2 or any(not isinstance(v, int) or v < 1 for v in cfg.condition_grid):
        problems.append(f"model.condition_grid={list(cfg.condition_grid)} must be two positive integers (rows, columns)")
    if cfg.hidden_size % cfg.num_attention_heads:
        problems.append(f"model.hidden_size={cfg.hidden_size} is not divisible by model.num_attention_heads="
                        f"{cfg.num_attention_heads}")
        return problems
    if cfg.head_dim % 2:
        problems.append(f"the head size model.hidden_size / model.num_attention_heads = {cfg.head_dim} must be even "
                        "(rotary embedding)")
    elif cfg.rope_sections is not None:
        sections = list(cfg.rope_sections)
        if len(sections) != 3 or sum(sections) != cfg.head_dim // 2 or min(sections) < 0:
            problems.append(f"model.rope_sections={sections} must be three non-negative counts summing to head_dim/2 "
                            f"= {cfg.head_dim // 2}")
    pool_heads = cfg.attention_pool_heads or cfg.num_attention_heads
    if cfg.hidden_size % pool_heads:
        problems.append(f"model.hidden_size={cfg.hidden_size} is not divisible by model.attention_pool_heads={pool_heads}")
    if cfg.flow.sigma_min >= cfg.flow.sigma_max:
        problems.append(f"model.flow.sigma_min={cfg.flow.sigma_min} must be below model.flow.sigma_max="
                        f"{cfg.flow.sigma_max}")
    return problems
