"""Point-to-point messages between neighbouring pipeline stages, on gloo and NCCL alike.

A message is a dict of named tensors (CLIP sends the vision and the text hidden states and the
end-of-text positions together; a VLM will send its own set), not one tensor of a fixed
[seq, micro-batch, hidden] shape as megatron-core's p2p layer assumes. The receiver learns the
names, dtypes and shapes from a small header sent before the first message of every schedule run
(`reset`); later messages of the run must have that layout (checked on the sender), so the paired
sends and receives of the 1F1B steady state can be posted in one batch with known shapes — which
NCCL needs to avoid the send/send deadlock of two neighbours. Gradients travel back with the
layout of the floating-point tensors that went forward, so they need no header.
"""
from __future__ import annotations

import json

import torch
import torch.distributed as dist
from megatron.core import parallel_state

HEADER_BYTES = 4096
Message = dict  # str -> torch.Tensor


def _layout(message: Message) -> list:
    return [[name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in message.items()]


def _grad_names(layout: list) -> list:
    return [name for name, dtype, _ in layout if getattr(torch, dtype).is_floating_point]


class StageLink:
    """This rank's links to the previous and the next pipeline stage (None at the ends)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.size = parallel_state.get_pipeline_model_parallel_world_size()
        self.rank = parallel_state.get_pipeline_model_parallel_rank()
        self.group = parallel_state.get_pipeline_model_parallel_group()
        self.next = parallel_state.get_pipeline_model_parallel_next_rank() if not self.is_last else None
        self.prev = parallel_state.get_pipeline_model_parallel_prev_rank() if not self.is_first else None
        self.reset()

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def reset(self) -> None:
        """Start of a schedule run: the next forward message carries a header again."""
        self.send_layout = self.recv_layout = None

    # -- headers ---------------------------------------------------------------------------------
    def _send_header(self, layout: list) -> None:
        data = json.dumps(layout).encode()
        if len(data) > HEADER_BYTES - 8:
            raise ValueError(f"pipeline message header too long ({len(data)} bytes)")
        header = torch.zeros(HEADER_BYTES, dtype=torch.uint8, device=self.device)
        header[:8] = torch.tensor(list(len(data).to_bytes(8, "little")), dtype=torch.uint8)
        header[8:8 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
        dist.send(header, self.next)

    def _recv_header(self) -> list:
        header = torch.empty(HEADER_BYTES, dtype=torch.uint8, device=self.device)
        dist.recv(header, self.prev)
        raw = bytes(header.cpu().tolist())
        length = int.from_bytes(raw[:8], "little")
        return json.loads(raw[8:8 + length].decode())

    def _empty(self, layout: list, names=None) -> dict:
        return {name: torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
                for name, dtype, shape in layout if names is None or name in names}

    def _check_send_layout(self, message: Message) -> bool:
        """True when a header must go first; raises if the layout changed within a run."""
        layout = _layout(message)
        if self.send_layout is None:
            self.send_layout = layout
            return True
        if layout != self.send_layout:
            raise ValueError(f"pipeline stage {self.rank}: message layout changed within a step "
                             f"({self.send_layout} -> {layout}); micro-batches must have one shape")
        return False

    # -- single-direction operations -------------------------------------------------------------
    def recv_forward(self) -> Message | None:
        if self.is_first:
            return None
        if self.recv_layout is None:
            self.recv_layout = self._recv_header()
        return self._recv_tensors(self.recv_layout)

    def send_forward(self, message: Message) -> None:
        if self.is_last:
            return
        if self._check_send_layout(message):
            self._send_header(self.send_layout)
        self._send_tensors(message)

    def recv_backward(self) -> Message | None:
        if self.is_last:
            return None
        grads = self._empty(self.send_layout, _grad_names(self.send_layout))
        self._wait([dist.P2POp(dist.irecv, t, self.next) for t in grads.values()])
        return grads

    def send_backward(self, grads: Message | None) -> None:
        if self.is_first:
            return
        self._wait([dist.P2POp(dist.isend, t.contiguous(), self.prev) for t in self._ordered_grads(grads)])

    # -- paired operations of the 1F1B steady state (one batch each) ----------------------------
    def send_forward_recv_backward(self, message: Message) -> Message | None:
        if self.is_last:
            return None
        if self._check_send_layout(message):
            # 1F1B's first send from every stage but the last is a warm-up send_forward.
            raise RuntimeError("pipeline schedule error: the first message of a step went out paired")
        ops = [dist.P2POp(dist.isend, t.detach().contiguous(), self.next) for t in message.values()]
        grads = self._empty(self.send_layout, _grad_names(self.send_layout))
        ops += [dist.P2POp(dist.irecv, t, self.next) for t in grads.values()]
        self._wait(ops)
        return grads

    def send_backward_recv_forward(self, grads: Message | None) -> Message | None:
        if self.is_first:
            return None
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.prev) for t in self._ordered_grads(grads)]
        message = self._empty(self.recv_layout)
        ops += [dist.P2POp(dist.irecv, t, self.prev) for t in message.values()]
        self._wait(ops)
        return message

    # -- helpers -----------------------------------------------------------------------------------
    def _ordered_grads(self, grads: Message) -> list:
        names = _grad_names(self.recv_layout)
        missing = [n for n in names if n not in grads]
        if missing:
            raise ValueError(f"pipeline stage {self.rank}: no gradient for {missing}")
        return [grads[n] for n in names]

    def _send_tensors(self, message: Message) -> None:
        """Blocking sends to the next stage (one direction only: no pairing needed)."""
        for tensor in message.values():
            dist.send(tensor.detach().contiguous(), self.next)

    def _recv_tensors(self, layout: list) -> Message:
        message = self._empty(layout)
        for tensor in message.values():
            dist.recv(tensor, self.prev)
        return message

    @staticmethod
    def _wait(ops: list) -> None:
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    # -- forward-only messages with a header each (evaluation: the last batch may be smaller) --
    def send_forward_any(self, message: Message) -> None:
        if self.is_last:
            return
        self._send_header(_layout(message))
        self._send_tensors(message)

    def recv_forward_any(self) -> Message | None:
        if self.is_first:
            return None
        return self._recv_tensors(self._recv_header())
