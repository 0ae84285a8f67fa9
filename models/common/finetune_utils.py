"""Fine-tuning helpers: early stopping on a validation metric, and the largest micro-batch that fits
(the seed's `EarlyStopper` and `find_max_batch_size`).

Neither touches the trainer: early stopping takes the metric after each evaluation; the finder
takes a `fits(micro_batch) -> bool` probe, so it can be tested against a memory budget on CPU and
run for real on GPU (`cuda_oom_probe` catches out-of-memory and backs off).
"""
from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


# ---- early stopping -----------------------------------------------------------------------------

@dataclass
class EarlyStopping:
    """Stop after `patience` evaluations in a row without an improvement of more than `min_delta`.

    PyTorch Lightning's rule: an evaluation improves when it beats the best so far by more than
    min_delta (mode "min" for a loss, "max" for an accuracy); patience 0 stops at the first one that
    does not. A NaN or inf metric never counts as an improvement.
    A checkpoint `Stateful` (state_dict / load_state_dict), so a resumed run keeps its count.
    """

    patience: int = 2
    min_delta: float = 0.001
    mode: str = "min"
    best: float | None = None
    bad_evaluations: int = 0
    stopped: bool = False

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"early stopping mode {self.mode!r}: use min or max")
        if self.patience < 0 or self.min_delta < 0:
            raise ValueError("early stopping needs patience >= 0 and min_delta >= 0")

    def improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def step(self, value: float) -> bool:
        """Record one evaluation; True once training should stop."""
        value = float(value)
        if self.improves(value):
            self.best, self.bad_evaluations = value, 0
        else:
            self.bad_evaluations += 1
        self.stopped = self.bad_evaluations >= max(self.patience, 1)
        return self.stopped

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_evaluations": self.bad_evaluations, "stopped": self.stopped}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_evaluations, self.stopped = state["best"], state["bad_evaluations"], state["stopped"]


# ---- micro-batch finder -------------------------------------------------------------------------

def find_micro_batch_size(fits: Callable[[int], bool], start: int = 1, limit: int | None = None,
                          candidates: Sequence[int] | None = None, group=None) -> int:
    """The largest micro-batch `fits` accepts, by doubling and then bisecting (trial and back-off).

    Assumes `fits` is monotone (what fits at b fits below b). `candidates` restricts the answer to
    those sizes (e.g. the divisors of global_batch / DP, so accumulation divides); otherwise every
    size in [start, limit]. With `group`, every trial's verdict is the AND over the group's ranks,
    so all ranks try the same sizes in the same order (a probe that runs collectives cannot hang)
    and return the same answer. Raises if not even the smallest size fits.
    """
    if candidates is not None:
        sizes = sorted({int(c) for c in candidates if c >= 1 and (limit is None or c <= limit)})
    else:
        if limit is None:
            raise ValueError("find_micro_batch_size needs a limit or a list of candidates")
        sizes = None
    if sizes is not None and not sizes:
        raise ValueError(f"no micro-batch candidates in {candidates} up to limit={limit}")
    count = len(sizes) if sizes is not None else limit - start + 1
    value = (lambda i: sizes[i]) if sizes is not None else (lambda i: start + i)

    def trial(i: int) -> bool:
        size = value(i)
        ok = _agree(bool(fits(size)), group)
        log.info("micro-batch %d: %s", size, "fits" if ok else "does not fit")
        return ok

    if not trial(0):
        raise RuntimeError(f"not even micro-batch {value(0)} fits")
    good, step = 0, 1
    bad = count  # first index known not to fit (count: none found yet)
    while good + step < count:  # grow: 1, 2, 4, ... positions ahead
        if trial(good + step):
            good, step = good + step, step * 2
        else:
            bad = good + step
            break
    else:
        if good == count - 1:
            return value(good)
        if trial(count - 1):
            return value(count - 1)
        bad = count - 1
    while bad - good > 1:  # back off: bisect between the last fit and the first failure
        mid = (good + bad) // 2
        if trial(mid):
            good = mid
        else:
            bad = mid
    return value(good)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _agree(ok: bool, group) -> bool:
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64,
                        device="cuda" if dist.get_backend(group) == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def cuda_oom_probe(step: Callable[[int], None]) -> Callable[[int], bool]:
    """fits(b): run one training step at micro-batch b; out of memory means no (memory is freed)."""

    def fits(size: int) -> bool:
        try:
            step(size)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        except RuntimeError as exc:  # some kernels report OOM as a plain RuntimeError
            if "out of memory" not in str(exc).lower():
                raise
            return False
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    return fits


def memory_budget_probe(measure: Callable[[int], int], budget_bytes: int, fixed_bytes: int = 0) -> Callable[[int], bool]:
    """fits(b): fixed_bytes + measure(b) <= budget_bytes (a CPU stand-in for out-of-memory)."""
    return lambda size: fixed_bytes + measure(size) <= budget_bytes


def saved_activation_bytes(step: Callable[[int], None]) -> Callable[[int], int]:
    """measure(b): bytes of the distinct storages autograd saves for backward during step(b).

    What a forward keeps alive until backward, the part of training memory that grows with the
    micro-batch (parameters, gradients and optimizer state are the caller's `fixed_bytes`).
    """

    def measure(size: int) -> int:
        storages = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            storages[(storage.device, storage.data_ptr())] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            step(size)
        return sum(storages.values())

    return measure


def cuda_peak_bytes(step: Callable[[int], None]) -> Callable[[int], int]:
    """measure(b) on GPU: the allocator's peak during step(b)."""

    def measure(size: int) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(size)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    return measure


# ---- OneCycle learning rate ---------------------------------------------------------------------

# The engine's `optim.sched.name=onecycle` uses it; kept importable from here.
from engine.optim import one_cycle_lr  # noqa: E402,F401


# ---- 8-bit Adam (optional GPU extra) ------------------------------------------------------------

def adamw_8bit(param_groups, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
    """bitsandbytes' AdamW8bit (the seed's memory saver): CUDA parameters only, never required.

    Raises a clear error where bitsandbytes is missing or the parameters are not on a GPU, so the
    caller can fall back to the engine's AdamW.
    """
    groups = list(param_groups)
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ImportError("8-bit AdamW needs bitsandbytes, an optional GPU extra: pip install bitsandbytes") from exc
    if any(p.device.type != "cuda" for p in params):
        raise RuntimeError("8-bit AdamW (bitsandbytes) needs the parameters on a CUDA device; use AdamW on CPU")
    return bnb.optim.AdamW8bit(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
