"""The generic sections of every experiment's typed configuration: parallel, trainer, optim and
checkpoint. A model family adds its own `model`, `data` and `eval` sections by subclassing
`ExperimentConfig` (see `engine.family`); `configs/<family>/*.yaml` mirror the family's class 1:1
(a test checks it). Values resolve in this order: dataclass defaults < `--config` file <
command-line `key=value`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from engine.config_checks import at_least, greater_than, one_of, pair_in, probability
from engine.loss_scaler import LossScalerConfig
from engine.precision import ALIASES as PRECISIONS

# adamw_8bit: bitsandbytes' AdamW8bit, an optional GPU extra (replicated fp32 parameters only)
OPTIMIZERS = ("adamw", "adam", "distributed_fused_adam", "adamw_8bit")
LR_SCHEDULES = ("cosine", "constant", "onecycle")


@dataclass
class ParallelConfig:
    """Parallel degrees; data parallelism is what is left of the world size."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Megatron sequence parallelism (TP > 1): norms/dropout run on a 1/TP slice of the sequence
    sequence_parallel: bool = False
    device: str = "auto"  # auto (GPU when visible), cpu or cuda; the backend follows (nccl / gloo)
    distributed_timeout_minutes: float = 10.0
    # CPU (gloo) only: where the ranks of a group share a host, the DP gradient average and megatron's
    # TP all-reduces go through a /dev/shm segment instead of gloo's TCP loopback (B/32's gradients:
    # 0.08 s against 0.37 s); false: gloo for all. Ignored on GPU.
    host_shared_memory: bool = True


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
    output_dir: str = "runs/run"  # each family sets its own default
    loss_scaler: LossScalerConfig = field(default_factory=LossScalerConfig)  # fp16 only
    # Dense BF16 TFLOP/s per device for MFU; None: engine/flops.py's table by GPU name (none on CPU).
    peak_tflops: Optional[float] = None


@dataclass
class SchedulerConfig:
    # cosine | constant | onecycle (torch's OneCycleLR: warmup_steps is its rise, pct_start =
    # warmup_steps / max_steps, from lr/25 to lr, then cosine down to min_lr, or lr/25/1e4 when 0)
    name: str = "cosine"
    warmup_steps: int = 100
    min_lr: float = 0.0


@dataclass
class OptimConfig:
    # adamw | adam | distributed_fused_adam (ZeRO-1: state sharded over DP) | adamw_8bit (bitsandbytes,
    # optional GPU extra; its 8-bit moments are not checkpointed)
    name: str = "adamw"
    lr: float = 5.0e-4
    weight_decay: float = 0.2
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1.0e-6
    # distributed_fused_adam / O2: gradient buckets (elements) reduced over DP while backward runs
    bucket_size: int = 40000000
    overlap_grad_sync: bool = True
    sched: SchedulerConfig = field(default_factory=SchedulerConfig)


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
    # Model weights only, at step 0, when there is nothing to resume: a checkpoint (or checkpoint
    # root) of this family, read through the family's key map (e.g. base weights into LoRA layers).
    init_from: Optional[str] = None
    verify_checksums: bool = True  # CRC32 of every file before loading (sizes are always checked)


@dataclass
class ExperimentConfig:
    """What every family shares. A family's subclass adds `model` (which must have a boolean
    `megatron_amp_O2`, NeMo's switch read by the precision plan), `data` and `eval`, and extends
    `RULES` (see engine.config_checks) for them."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    RULES: ClassVar[list] = [
        ("parallel.tensor_model_parallel_size", at_least(1, integer=True)),
        ("parallel.pipeline_model_parallel_size", at_least(1, integer=True)),
        ("parallel.device", one_of("auto", "cpu", "cuda")),
        ("parallel.distributed_timeout_minutes", greater_than(0)),
        ("trainer.max_steps", at_least(0, integer=True)),
        ("trainer.micro_batch_size", at_least(1, integer=True)),
        ("trainer.global_batch_size", at_least(1, integer=True)),
        ("trainer.precision", one_of(*PRECISIONS)),
        ("trainer.gradient_clip_val", at_least(0)),
        ("trainer.log_every_n_steps", at_least(1, integer=True)),
        ("trainer.val_check_interval", at_least(0, integer=True)),
        ("trainer.loss_scaler.initial_scale", greater_than(0)),
        ("trainer.loss_scaler.min_scale", greater_than(0)),
        ("trainer.loss_scaler.growth_factor", greater_than(1)),
        ("trainer.loss_scaler.backoff_factor", probability()),
        ("trainer.loss_scaler.growth_interval", at_least(1, integer=True)),
        ("trainer.loss_scaler.hysteresis", at_least(1, integer=True)),
        ("optim.name", one_of(*OPTIMIZERS)),
        ("optim.lr", greater_than(0)),
        ("optim.weight_decay", at_least(0)),
        ("optim.betas", pair_in(0.0, 1.0)),
        ("optim.eps", greater_than(0)),
        ("optim.bucket_size", at_least(1, integer=True)),
        ("optim.sched.name", one_of(*LR_SCHEDULES)),
        ("optim.sched.warmup_steps", at_least(0, integer=True)),
        ("optim.sched.min_lr", at_least(0)),
        ("checkpoint.save_interval", at_least(0, integer=True)),
        ("checkpoint.keep_last", at_least(0, integer=True)),
        # Family sections: sizes and counts are positive, dropouts are probabilities.
        ("model.*num_layers", at_least(1, integer=True)),
        ("model.*hidden_size", at_least(1, integer=True)),
        ("model.*num_attention_heads", at_least(1, integer=True)),
        ("model.*dropout", probability()),
        ("*.num_workers", at_least(0, integer=True)),
        ("*batch_size", at_least(1, integer=True)),
    ]


# NeMo's configs place the parallel, batch and optimizer keys under model.*; a family adds these to
# its own `config_aliases` so a NeMo user's keys work for every family (each use logged once).
NEMO_GENERIC_ALIASES = {
    "model.tensor_model_parallel_size": "parallel.tensor_model_parallel_size",
    "model.pipeline_model_parallel_size": "parallel.pipeline_model_parallel_size",
    "model.sequence_parallel": "parallel.sequence_parallel",
    "model.micro_batch_size": "trainer.micro_batch_size",
    "model.global_batch_size": "trainer.global_batch_size",
    "model.optim.name": "optim.name",
    "model.optim.lr": "optim.lr",
    "model.optim.weight_decay": "optim.weight_decay",
    "model.optim.betas": "optim.betas",
    "model.optim.eps": "optim.eps",
    "model.optim.sched.warmup_steps": "optim.sched.warmup_steps",
    "model.optim.sched.min_lr": "optim.sched.min_lr",
}

# Keys accepted bare at top level, as in `torchrun ... pretrain_clip.py tensor_model_parallel_size=4`.
BARE_KEYS = {
    "tensor_model_parallel_size": "parallel.tensor_model_parallel_size",
    "pipeline_model_parallel_size": "parallel.pipeline_model_parallel_size",
    "sequence_parallel": "parallel.sequence_parallel",
    "device": "parallel.device",
}
