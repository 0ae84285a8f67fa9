"""What a CLIP run keeps beside the model and optimizer, in every checkpoint (the engine's
`TrainingParts.extra_state`): FastCLIP's per-sample state, the run's clock (steps -> epoch, for
FastCLIP's gamma schedule) and the early-stopping count.
"""
from __future__ import annotations

import logging

from engine.checkpoint import Boxes
from engine.config import ConfigError
from models.clip.fastclip import epoch_at
from models.clip.sample_state import ShardedSampleState
from models.common.finetune_utils import EarlyStopping

log = logging.getLogger("engine")


class SampleStateEntries:
    """FastCLIP's u (and tau_i) as checkpoint entries: each state one canonical [data_size] tensor,
    this DP rank's block its box (TP ranks of a replica hold identical blocks). Any DP size reads
    any other's: the engine re-shards the boxes, so a mid-epoch resume is exact and DP=2 -> DP=1
    keeps every sample's state."""

    def __init__(self, state: ShardedSampleState):
        self.state = state

    def state_dict(self) -> dict:
        out = {"data_size": self.state.data_size, "names": list(self.state.names)}
        for name, (shape, offset, tensor) in self.state.shards().items():
            # The live tensors: a load writes into them in place.
            out[name] = Boxes(shape, [((offset,), tensor)] if tensor.numel() else [])
        return out

    def load_state_dict(self, state: dict) -> None:
        if state["data_size"] != self.state.data_size:
            raise ConfigError(f"the checkpoint's FastCLIP state is for data_size={state['data_size']}, this run has "
                              f"model.loss.data_size={self.state.data_size}")
        if list(state["names"]) != list(self.state.names):
            raise ConfigError(f"the checkpoint's FastCLIP state holds {state['names']}, this loss needs "
                              f"{self.state.names} (another model.loss.version?)")


class TrainClock:
    """Optimizer steps done, and the epoch they make (global batch x steps / samples per epoch).
    Advanced by the engine's after-step hook, saved in checkpoints so a resumed run knows its epoch
    before its first step."""

    def __init__(self, global_batch_size: int, samples_per_epoch: int | None):
        self.global_batch_size, self.samples_per_epoch = global_batch_size, samples_per_epoch
        self.step = 0

    @property
    def epoch(self) -> int:
        if not self.samples_per_epoch:
            return 0
        return epoch_at(self.step * self.global_batch_size, self.samples_per_epoch)

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class EarlyStopMonitor:
    """Feeds each evaluation's `monitor` metric to an `EarlyStopping` (the seed's EarlyStopper:
    patience 2, min delta 0.001) and says when to stop. The stopper is checkpointed, so a resumed
    run keeps its count. Every rank sees the same metrics, so every rank decides the same."""

    def __init__(self, cfg):
        self.monitor = cfg.monitor
        self.stopper = EarlyStopping(patience=cfg.patience, min_delta=cfg.min_delta, mode=cfg.mode)
        self.reason: str | None = None

    def observe(self, step: int, metrics: dict) -> None:
        if self.monitor not in metrics:
            raise ConfigError(f"eval.early_stopping.monitor={self.monitor!r} is not an evaluation metric; this run "
                              f"reports {', '.join(sorted(metrics))}")
        value = float(metrics[self.monitor])
        stop = self.stopper.step(value)
        log.info("early stopping: %s=%.6g at step %d (best %.6g, %d of %d evaluations without an improvement > %g)",
                 self.monitor, value, step, self.stopper.best if self.stopper.best is not None else float("nan"),
                 self.stopper.bad_evaluations, max(self.stopper.patience, 1), self.stopper.min_delta)
        if stop:
            self.reason = (f"early stopping: {self.monitor} did not improve by more than {self.stopper.min_delta} "
                           f"for {self.stopper.bad_evaluations} evaluations (best {self.stopper.best:.6g})")

    def stop_requested(self) -> str | None:
        return self.reason
