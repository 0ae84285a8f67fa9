"""Typed configuration of one CLIP pre-training experiment.

Every section is a dataclass; `configs/clip/*.yaml` mirror these 1:1 (a test checks it). Values
resolve in this order: dataclass defaults < `--config` file < command-line `key=value`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from engine.loss_scaler import LossScalerConfig
from models.clip.config import CLIPConfig


@dataclass
class ParallelConfig:
    """Parallel degrees; data parallelism is what is left of the world size."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Megatron sequence parallelism (TP > 1): norms/dropout run on a 1/TP slice of the sequence
    sequence_parallel: bool = False
    device: str = "auto"  # auto (GPU when visible), cpu or cuda; the backend follows (nccl / gloo)
    distributed_timeout_minutes: float = 10.0


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    micro_batch_size: int = 32  # per data-parallel rank and forward pass
    global_batch_size: int = 256  # per optimizer step; accumulation = global / (micro x DP)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (see model.megatron_amp_O2)
    gradient_clip_val: float = 1.0  # 0 disables clipping
    log_every_n_steps: int = 10
    val_check_interval: int = 100  # evaluate every N steps (0: only at the end)
    seed: int = 1234
    output_dir: str = "runs/clip"
    loss_scaler: LossScalerConfig = field(default_factory=LossScalerConfig)  # fp16 only


@dataclass
class SchedulerConfig:
    name: str = "cosine"  # cosine | constant
    warmup_steps: int = 100
    min_lr: float = 0.0


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adam | distributed_fused_adam (ZeRO-1: state sharded over DP)
    lr: float = 5.0e-4
    weight_decay: float = 0.2
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1.0e-6
    # distributed_fused_adam / O2: gradient buckets (elements) reduced over DP while backward runs
    bucket_size: int = 40000000
    overlap_grad_sync: bool = True
    sched: SchedulerConfig = field(default_factory=SchedulerConfig)


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
class TokenizerConfig:
    type: str = "sentencepiece"  # sentencepiece | clip_bpe
    path: Optional[str] = None  # a .model (sentencepiece) or bpe_simple_vocab_16e6.txt.gz (clip_bpe)
    vocab_size: int = 1000  # when training a SentencePiece model from the captions


@dataclass
class DataConfig:
    train_shards: Optional[str] = None  # brace pattern, glob, directory; None = synthetic data
    eval_shards: Optional[str] = None
    classes_file: Optional[str] = None  # zero-shot class names and prompt templates (json)
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    shuffle_buffer: int = 1000
    num_workers: int = 0
    random_crop_scale: list = field(default_factory=lambda: [0.9, 1.0])


@dataclass
class EvalConfig:
    zero_shot: bool = True
    retrieval: bool = True
    batch_size: int = 256


@dataclass
class CheckpointConfig:
    """Sharded checkpoints (engine/checkpoint): any TP/PP/DP layout loads any other's."""

    dir: Optional[str] = None  # None: <trainer.output_dir>/checkpoints
    save_interval: int = 0  # save every N steps (0: only at the end and on SIGTERM/SIGUSR1)
    save_at_end: bool = True
    keep_last: int = 3  # complete checkpoints kept, oldest removed first (0 keeps all)
    resume: str = "auto"  # auto (latest under dir, if any) | none | a checkpoint or checkpoint dir path
    async_save: bool = False  # write in a background thread after a host copy of the state
    load_optimizer: bool = True  # false: weights, schedule, step and data position only; fresh Adam moments
    verify_checksums: bool = True  # CRC32 of every file before loading (sizes are always checked)


@dataclass
class ExperimentConfig:
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: CLIPConfig = field(default_factory=CLIPConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# Keys accepted bare at top level, as in `torchrun ... pretrain_clip.py tensor_model_parallel_size=4`.
BARE_KEYS = {
    "tensor_model_parallel_size": "parallel.tensor_model_parallel_size",
    "pipeline_model_parallel_size": "parallel.pipeline_model_parallel_size",
    "sequence_parallel": "parallel.sequence_parallel",
    "sequence_parallel": "parallel.sequence_parallel",
    "device": "parallel.device",
}
