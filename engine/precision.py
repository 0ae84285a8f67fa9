"""What `trainer.precision` and `model.megatron_amp_O2` mean, decided once at start-up.

- fp32: fp32 parameters and math.
- bf16 + O2: bf16 parameters and activations, fp32 master weights and fp32 gradient accumulation
  in the optimizer (`FlatAdamW`), loss and softmax statistics in fp32.
- bf16 without O2: fp32 parameters under autocast(bf16). megatron-core's linear layers re-enter
  autocast only on CUDA, so this mode is GPU-only; on CPU use O2.
- fp16: like bf16 (O2 or autocast) plus the dynamic loss scaler.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from engine.loss_scaler import ConstantLossScaler, DynamicLossScaler, LossScalerConfig

ALIASES = {"32": "fp32", "fp32": "fp32", "32-true": "fp32", "bf16": "bf16", "bf16-mixed": "bf16",
           "16": "fp16", "fp16": "fp16", "16-mixed": "fp16"}


@dataclass(frozen=True)
class PrecisionPlan:
    name: str  # fp32 | bf16 | fp16
    o2: bool
    params_dtype: torch.dtype
    autocast_dtype: Optional[torch.dtype]  # None: no autocast

    @property
    def needs_master_weights(self) -> bool:
        return self.params_dtype != torch.float32

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def loss_scaler(self, cfg: LossScalerConfig):
        return DynamicLossScaler(cfg) if self.name == "fp16" else ConstantLossScaler()

    def transformer_overrides(self) -> dict:
        """Flags megatron-core's TransformerConfig takes for this precision."""
        return {"params_dtype": self.params_dtype, "bf16": self.name == "bf16", "fp16": self.name == "fp16"}


def plan_precision(precision: str, megatron_amp_O2: bool, device: torch.device) -> PrecisionPlan:
    name = ALIASES.get(str(precision))
    if name is None:
        raise ValueError(f"trainer.precision={precision!r}: use fp32, bf16 or fp16")
    if name == "fp32":
        return PrecisionPlan("fp32", False, torch.float32, None)
    low = torch.bfloat16 if name == "bf16" else torch.float16
    if megatron_amp_O2:
        return PrecisionPlan(name, True, low, None)
    if device.type != "cuda":
        raise ValueError(
            f"trainer.precision={name} without model.megatron_amp_O2 runs under autocast, which "
            "megatron-core's linear layers support only on CUDA; set model.megatron_amp_O2=true on CPU"
        )
    return PrecisionPlan(name, False, torch.float32, low)
