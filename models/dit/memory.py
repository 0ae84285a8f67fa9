"""Memory per device for the DiT's progress line: peak allocated and reserved GPU memory, or the
process's resident memory on CPU."""
from __future__ import annotations

import resource

import torch


def memory_per_device() -> str:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.cuda.current_device()
        return (f"mem {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB peak allocated, "
                f"{torch.cuda.memory_reserved(device) / 2**30:.2f} GiB reserved")
    return f"mem {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB peak RSS"
