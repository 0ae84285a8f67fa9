"""One timeout for every process group, and errors that say which collective ran out of it.

`parallel.distributed_timeout_minutes` bounds how long a rank waits in a collective for the others.
torch gives each group its own timeout, fixed when the group is made, and a group made without one
waits torch's default (30 minutes for gloo), so `initialize_parallel` records the configured value
here, passes it to megatron-core and sets it on any group megatron made without it; the engine's
own groups come from `new_group`, which applies it.

When the time runs out gloo raises a bare `RuntimeError: [.../unbound_buffer.cc:81] Timed out
waiting 3000ms for recv operation to complete`. `naming_collective_timeouts` turns that into a
`CollectiveTimeoutError` that names the setting, the collective, its process group and ranks and
the engine code that called it, read from the traceback. (NCCL's watchdog instead aborts the
process after the same timeout, logging the collective itself.)
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import os
import re

import torch
import torch.distributed as dist

_configured: datetime.timedelta | None = None  # set by initialize_parallel
_TIMEOUT_MESSAGE = re.compile(r"timed out|timeout", re.IGNORECASE)
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_C10D_FILE = os.path.join(_TORCH_DIR, "distributed", "distributed_c10d.py")


class CollectiveTimeoutError(RuntimeError):
    """A collective waited `parallel.distributed_timeout_minutes` for a rank that did not come."""


def configure(minutes: float) -> datetime.timedelta:
    global _configured
    _configured = datetime.timedelta(minutes=minutes)
    return _configured


def configured_timeout() -> datetime.timedelta | None:
    """The job's timeout (None: not set through `initialize_parallel`; torch's defaults apply)."""
    return _configured


def new_group(ranks=None, backend: str | None = None, desc: str | None = None):
    """`torch.distributed.new_group` with the job's timeout (a group made without one waits 30
    minutes on gloo whatever `parallel.distributed_timeout_minutes` says). Collective, like it."""
    return dist.new_group(ranks=ranks, backend=backend, timeout=_configured, group_desc=desc)


def group_timeout(group) -> datetime.timedelta | None:
    """The timeout a process group waits (None when torch does not expose it)."""
    group = group or dist.group.WORLD
    for device in ("cpu", "cuda"):
        try:
            return group._get_backend(torch.device(device)).options._timeout
        except (AttributeError, RuntimeError, ValueError):
            continue
    return None


def set_group_timeout(group, timeout: datetime.timedelta) -> None:
    setter = getattr(dist, "set_timeout", None)  # torch >= 2.14; earlier the private one
    if setter is not None:
        setter(timeout, group)
    else:
        dist.distributed_c10d._set_pg_timeout(timeout, group)


def apply_to_every_group(timeout: datetime.timedelta) -> list[str]:
    """Give every process group this rank belongs to `timeout`; returns the groups that had another."""
    changed = []
    for group in list(getattr(dist.distributed_c10d._world, "pg_map", {})):
        current = group_timeout(group)
        if current is not None and current != timeout:
            set_group_timeout(group, timeout)
            changed.append(f"{_group_desc(group)} ({current})")
    return changed


def _group_desc(group) -> str:
    return getattr(group, "group_desc", None) or str(getattr(group, "group_name", "?"))


def _minutes(td: datetime.timedelta) -> str:
    return f"{td.total_seconds() / 60:g}"


def describe_collective_timeout(exc: BaseException, where: str = "") -> str | None:
    """A readable account of a collective timeout somewhere in `exc`'s chain, or None if it is not one."""
    seen, error = set(), exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, RuntimeError) and _TIMEOUT_MESSAGE.search(str(error)) and _c10d_frame(error):
            break
        error = error.__cause__ or error.__context__
    else:
        return None
    if error is None:
        return None
    callers, frame = _c10d_frame(error)
    group = next((frame.f_locals[k] for k in ("group", "pg", "process_group") if frame.f_locals.get(k) is not None),
                 None)
    op = frame.f_code.co_name
    try:
        desc, ranks = _group_desc(group or dist.group.WORLD), dist.get_process_group_ranks(group or dist.group.WORLD)
    except (RuntimeError, ValueError, AttributeError):
        desc, ranks = "?", "?"
    waited = group_timeout(group)
    limit = f"{waited.total_seconds():g} s" if waited is not None else "its timeout"
    setting = (f"parallel.distributed_timeout_minutes={_minutes(_configured)}" if _configured is not None
               else "parallel.distributed_timeout_minutes (not applied: torch's default)")
    if _configured is not None and waited is not None and waited != _configured:
        setting += f", but this group waits {_minutes(waited)} minutes"
    called = " <- ".join(f"{os.path.relpath(f.f_code.co_filename)}:{line} {f.f_code.co_name}" for f, line in callers)
    return (f"collective {op} on process group {desc} (ranks {ranks}) timed out after {limit} ({setting})"
            f"{'; ' + where if where else ''}{'; called from ' + called if called else ''}: another rank of that "
            f"group did not reach it (stopped, hung, "
            f"dead, or waiting in a different collective; check that rank's log). If a rank legitimately needs "
            f"longer (a slow checkpoint save or evaluation), raise parallel.distributed_timeout_minutes. "
            f"[{type(error).__name__}: {str(error).strip()}]")


def _c10d_frame(error: BaseException, depth: int = 4):
    """([(frame, line)] of the `depth` innermost callers outside torch, innermost first; the
    outermost frame in distributed_c10d.py, i.e. the collective called) from `error`'s traceback, or None."""
    import traceback

    frames = list(traceback.walk_tb(error.__traceback__))
    for i, (frame, _) in enumerate(frames):
        if frame.f_code.co_filename == _C10D_FILE:
            outside = [(f, line) for f, line in frames[:i] if not f.f_code.co_filename.startswith(_TORCH_DIR)
                       and "typing_extensions" not in f.f_code.co_filename]
            return outside[::-1][:depth], frame
    return None


@contextlib.contextmanager
def naming_collective_timeouts(where=lambda: ""):
    """Re-raise a collective timeout inside the block as a `CollectiveTimeoutError` naming it;
    `where()` adds context (e.g. the training step). Other errors pass unchanged."""
    try:
        yield
    except CollectiveTimeoutError:
        raise
    except Exception as exc:
        message = describe_collective_timeout(exc, where())
        if message is None:
            raise
        raise CollectiveTimeoutError(message) from exc


def names_collective_timeouts(where):
    """Decorator form: `where(*args, **kwargs)` of the call gives the context."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with naming_collective_timeouts(lambda: where(*args, **kwargs)):
                return fn(*args, **kwargs)
        return wrapper
    return decorate
