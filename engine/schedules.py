"""Micro-batch schedules: gradient accumulation and pipeline-parallel 1F1B as one code path.

`forward_backward` runs Megatron's non-interleaved 1F1B schedule over `num_micro_batches`: stage s
of p does min(p - s - 1, m) warm-up forwards, then alternates one forward and one backward, then
drains the remaining backwards. With one stage the warm-up and drain are empty and it is plain
gradient accumulation (forward, backward, next micro-batch), so PP=1 runs the same code.

Why our own schedule rather than megatron-core's `get_forward_backward_func`: its p2p layer sends a
single tensor of a configured [seq, micro-batch, hidden] shape, while a CLIP stage sends two towers'
hidden states of different shapes plus the end-of-text positions (and a VLM will send its own
set); it also needs CUDA shims on CPU. `parallel.p2p.StageLink` sends named tensor dicts with the
same paired, batched sends and receives (see that module), on gloo and NCCL alike.

The model-specific part is `forward_step(model, batch, inputs) -> (output, info)`: `batch` is the
micro-batch on the stages that read data (the first; the last too when it needs labels), else None; `inputs` the previous stage's
message (None on the first). On the last stage `output` is the loss; elsewhere it is the message
for the next stage. `info` counts {"samples", "tokens"} and may add "flops", the model FLOPs of the
micro-batch when they vary with it (a text tower trimmed to the longest caption); the first stage's
counts are used. On the last stage `info["metrics"]` may add scalars to log ({name: value}, see
TrainingParts.train_metrics).
"""
from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from parallel.p2p import StageLink


@dataclass
class ScheduleResult:
    loss_sum: torch.Tensor  # summed micro-batch losses (last stage; zero elsewhere)
    samples: int  # counted on the data-reading stage (zero elsewhere)
    tokens: int
    compute_seconds: float  # forward + backward time on this stage
    total_seconds: float  # the whole schedule, waits included
    # Sums over micro-batches of the scalars forward_step put in info["metrics"] (last stage).
    metric_sums: dict = field(default_factory=dict)
    # Model FLOPs of the step's micro-batches when forward_step reports them (data-reading stage); 0: not reported.
    flops: float = 0.0

    @property
    def bubble_fraction(self) -> float:
        """Share of the schedule this stage spent waiting (pipeline bubble plus communication)."""
        return max(0.0, 1.0 - self.compute_seconds / self.total_seconds) if self.total_seconds > 0 else 0.0


def _float_names(message: dict) -> list:
    return [name for name, t in message.items() if t.is_floating_point()]


def forward_backward(*, model, forward_step, data_iter, num_micro_batches: int, link: StageLink | None,
                     optimizer, loss_scale: float = 1.0, autocast=None, reads_data: bool | None = None
                     ) -> ScheduleResult:
    """One optimizer step's forwards and backwards; gradients are left for `optimizer.step()`.

    `optimizer.prepare_backward(last_micro_batch)` is called before every backward so a ZeRO
    optimizer can overlap its reduce-scatter with the last one. `autocast()` returns the forward's
    precision context. The loss is scaled by `loss_scale / num_micro_batches` before backward.
    `reads_data`: whether this stage takes a micro-batch from `data_iter` per forward (default: the
    first stage only; a model whose last stage needs labels passes True there, as Megatron's GPT).
    """
    m = num_micro_batches
    first = link is None or link.is_first
    last = link is None or link.is_last
    reads_data = first if reads_data is None else reads_data
    stages, stage = (1, 0) if link is None else (link.size, link.rank)
    if link is not None:
        link.reset()
    warmup = min(stages - stage - 1, m)
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), device=device)
    counts = {"samples": 0, "tokens": 0, "flops": 0.0}
    metric_sums = {}
    compute = 0.0
    backwards_done = 0
    start = time.perf_counter()

    def forward(inputs):
        nonlocal loss_sum, compute
        batch = next(data_iter) if reads_data else None
        tic = time.perf_counter()
        if inputs is not None:
            for name in _float_names(inputs):
                inputs[name].requires_grad_()
        with autocast() if autocast is not None else contextlib.nullcontext():
            output, info = forward_step(model, batch, inputs)
        if last:
            loss_sum = loss_sum + output.detach().float()
            for name, value in info.get("metrics", {}).items():
                value = value.detach().float() if torch.is_tensor(value) else float(value)
                metric_sums[name] = metric_sums.get(name, 0.0) + value  # no device sync per micro-batch
        if first:
            counts["samples"] += info["samples"]
            counts["tokens"] += info["tokens"]
            counts["flops"] += info.get("flops", 0.0)
        compute += time.perf_counter() - tic
        return output

    def backward(inputs, output, grads):
        nonlocal backwards_done, compute
        tic = time.perf_counter()
        optimizer.prepare_backward(last_micro_batch=backwards_done == m - 1)
        if last:
            (output.float() * (loss_scale / m)).backward()
        else:
            names = [n for n in _float_names(output) if output[n].requires_grad]
            torch.autograd.backward([output[n] for n in names], [grads[n] for n in names])
        backwards_done += 1
        compute += time.perf_counter() - tic
        if inputs is None:
            return None
        return {n: inputs[n].grad if inputs[n].grad is not None else torch.zeros_like(inputs[n])
                for n in _float_names(inputs)}

    def send_forward(output):
        if link is not None and not last:
            link.send_forward(output)

    in_flight = deque()
    for _ in range(warmup):
        inputs = link.recv_forward() if link is not None else None
        output = forward(inputs)
        send_forward(output)
        in_flight.append((inputs, output))
    remaining = m - warmup
    inputs = link.recv_forward() if link is not None and remaining else None
    for i in range(remaining):
        output = forward(inputs)
        grads = link.send_forward_recv_backward(output) if link is not None and not last else None
        in_flight.append((inputs, output))
        done_inputs, done_output = in_flight.popleft()
        input_grads = backward(done_inputs, done_output, grads)
        if link is None:
            inputs = None
        elif i == remaining - 1:
            link.send_backward(input_grads)
        else:
            inputs = link.send_backward_recv_forward(input_grads)
    while in_flight:
        done_inputs, done_output = in_flight.popleft()
        input_grads = backward(done_inputs, done_output, link.recv_backward())
        link.send_backward(input_grads)
    return ScheduleResult(loss_sum, counts["samples"], counts["tokens"], compute, time.perf_counter() - start,
                          metric_sums, counts["flops"])


@torch.no_grad()
def pipelined_forward(model, link: StageLink | None, stage_forward, *args):
    """Forward-only pass through every stage (evaluation): `stage_forward(inputs, *args)` runs this
    rank's stage; returns the last stage's output there and None elsewhere. Messages carry a header
    each, so batches may differ in size."""
    inputs = link.recv_forward_any() if link is not None else None
    output = stage_forward(inputs, *args)
    if link is not None and not link.is_last:
        link.send_forward_any(output)
        return None
    return output
