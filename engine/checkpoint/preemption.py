"""Save-and-exit on SIGTERM / SIGUSR1 (SLURM preemption, `scancel`, a time limit warning).

Exit behaviour, for whoever writes the launcher:

- The handlers only set a flag (and remember the signal); nothing is written from inside a signal
  handler. Between two optimizer steps the trainer asks `should_stop()`, which all-reduces the flag
  (MAX) over every rank, so all ranks stop after the same step even when only one was signalled.
- On a stop the trainer saves a checkpoint of that step (synchronously, waiting for any
  asynchronous save still in flight), logs `preempted by SIGxxx at step N: checkpoint ...`, leaves
  the training loop without evaluating, and the process ends normally with exit status 0.
  `resume: auto` (the default) then continues from that checkpoint when the job is restarted.
- Time to react: at most one training step plus one save. With `#SBATCH --signal=B:USR1@<seconds>`
  choose <seconds> above that. Under torchrun the agent must relay the signal
  (`PET_SIGNALS_TO_HANDLE=...,SIGUSR1`, torch >= 2.9) and wait long enough for the save
  (`TORCH_ELASTIC_SHUTDOWN_TIMEOUT`, default 30 s), as examples/slurm/pretrain_clip.sbatch does;
  the workers then exit 0 while torchrun itself exits 1 (its `SignalException`). With srun
  launching the training processes directly, srun relays USR1 to every task.
- A second signal while stopping is ignored (the save is not interrupted). SIGINT is left alone.
"""
from __future__ import annotations

import logging
import signal
import threading

import torch
import torch.distributed as dist

log = logging.getLogger("engine")

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    def __init__(self, signals=SIGNALS, group=None):
        self.signals, self.group = tuple(signals), group
        self.received: int | None = None
        self._previous = {}
        self.installed = False

    def install(self) -> "PreemptionHandler":
        """Install the handlers (main thread only; elsewhere this is a logged no-op)."""
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption signals not handled: checkpoint manager built outside the main thread")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        self.installed = True
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        self.installed = False

    def _on_signal(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"

    def request(self) -> None:
        """Ask for a stop as a signal would (tests, or a trainer's own stop condition)."""
        if self.received is None:
            self.received = signal.SIGUSR1

    def should_stop(self) -> bool:
        """Collective over `group` (every rank, once per step): True when any rank was signalled."""
        flag = 1.0 if self.received is not None else 0.0
        if dist.is_initialized():
            t = torch.tensor([flag])
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
            flag = t.item()
        return bool(flag)
