"""Loss scaling for fp16 training: Megatron's dynamic scaler with hysteresis, device-agnostic.

megatron-core's `DynamicGradScaler` keeps its state in `torch.cuda.FloatTensor`s; this one keeps
plain Python numbers (the scale is only ever read on the host) and the same rules:
- an overflow (inf/NaN in any gradient on any rank) skips the step and uses up one unit of
  hysteresis; when none is left the scale is multiplied by `backoff_factor` (not below `min_scale`);
- `growth_interval` overflow-free steps in a row multiply the scale by `growth_factor` and refill
  the hysteresis.
Defaults are Megatron-LM's: initial 2**32, min 1, growth 2, backoff 0.5, window 1000, hysteresis 2.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LossScalerConfig:
    initial_scale: float = 2.0**32
    min_scale: float = 1.0
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 1000
    hysteresis: int = 2


class ConstantLossScaler:
    """fp32 and bf16: no scaling, but the same interface (and still skips non-finite steps)."""

    def __init__(self, scale: float = 1.0):
        self.scale = float(scale)
        self.skipped_steps = 0

    def update(self, found_inf: bool) -> None:
        self.skipped_steps += int(found_inf)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.skipped_steps = state["scale"], state["skipped_steps"]


class DynamicLossScaler(ConstantLossScaler):
    def __init__(self, cfg: LossScalerConfig | None = None):
        cfg = cfg or LossScalerConfig()
        if not (cfg.growth_factor > 1.0 and 0.0 < cfg.backoff_factor < 1.0):
            raise ValueError("loss scaler: growth_factor must be > 1 and backoff_factor in (0, 1)")
        if cfg.growth_interval < 1 or cfg.hysteresis < 1:
            raise ValueError("loss scaler: growth_interval and hysteresis must be >= 1")
        super().__init__(cfg.initial_scale)
        self.cfg = cfg
        self.growth_tracker = 0
        self.hysteresis_tracker = cfg.hysteresis

    def update(self, found_inf: bool) -> None:
        cfg = self.cfg
        if found_inf:
            self.skipped_steps += 1
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * cfg.backoff_factor, cfg.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == cfg.growth_interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = cfg.hysteresis
                self.scale *= cfg.growth_factor

    def state_dict(self) -> dict:
        return {**super().state_dict(), "growth_tracker": self.growth_tracker,
                "hysteresis_tracker": self.hysteresis_tracker}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.growth_tracker = state["growth_tracker"]
        self.hysteresis_tracker = state["hysteresis_tracker"]
