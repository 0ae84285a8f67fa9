"""Achieved TFLOP/s per device, MFU and peak device memory for the progress line and TensorBoard.

MFU = model FLOPs per second per device / the device's dense BF16 peak (`engine.flops.peak_tflops`,
or `trainer.peak_tflops` when set). On CPU there is no meaningful peak: the achieved TFLOP/s per
rank is still shown, MFU only when `trainer.peak_tflops` is given. A GPU the peak table does not
know gets a warning once and no MFU.
"""
from __future__ import annotations

import logging

import torch

from engine.flops import peak_tflops

log = logging.getLogger("engine")


class ThroughputMeter:
    def __init__(self, flops_per_sample: float | None, world_size: int, device: torch.device,
                 peak_override: float | None = None, warn: bool = True):
        """`flops_per_sample`: model FLOPs of one training sample (forward + backward), from the
        model family; None turns the FLOP metrics off. `peak_override`: TFLOP/s per device."""
        self.flops_per_sample, self.world_size, self.device = flops_per_sample, max(1, world_size), device
        self.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        self.peak = peak_override if peak_override else (peak_tflops(self.device_name) if device.type == "cuda" else None)
        if warn and flops_per_sample and device.type == "cuda" and self.peak is None:
            log.warning("no peak TFLOP/s known for %r: MFU is not reported; set trainer.peak_tflops to the "
                        "device's dense BF16 peak", self.device_name)

    def metrics(self, samples_per_s: float, flops_per_s: float | None = None) -> dict:
        """`tflops_per_gpu` (CUDA) or `tflops_per_rank` (CPU), `mfu` when a peak is known, and
        `peak_memory_gib` (torch.cuda.max_memory_allocated of this rank) on CUDA. `flops_per_s`:
        the model FLOPs the family counted per micro-batch, per second (all ranks), when the work per
        sample varies (a trimmed text tower); it replaces flops_per_sample x samples/s."""
        out = {}
        if self.flops_per_sample:
            rate = flops_per_s if flops_per_s else self.flops_per_sample * samples_per_s
            tflops = rate / self.world_size / 1e12
            out["tflops_per_gpu" if self.device.type == "cuda" else "tflops_per_rank"] = tflops
            if self.peak:
                out["mfu"] = tflops / self.peak
        if self.device.type == "cuda":
            out["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return out


def describe(metrics: dict) -> str:
    """The progress-line part, e.g. ' | 412.3 TFLOP/s/GPU | MFU 41.7% | peak mem 23.1 GiB' (empty
    when the metrics hold none of these)."""
    parts = []
    for key, unit in (("tflops_per_gpu", "GPU"), ("tflops_per_rank", "rank")):
        if key in metrics:
            value = metrics[key]
            parts.append(f"{value:.1f} TFLOP/s/{unit}" if value >= 1 else f"{value * 1e3:.1f} GFLOP/s/{unit}")
    if "mfu" in metrics:
        parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
    if "peak_memory_gib" in metrics:
        parts.append(f"peak mem {metrics['peak_memory_gib']:.1f} GiB")
    return "".join(f" | {p}" for p in parts)
