"""Where this process sits in the job: read from torchrun's or SLURM's environment variables.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT. Under `srun python ...`
without torchrun, each task gets SLURM_PROCID (global rank), SLURM_LOCALID (rank on its node), the
step's task count (SLURM_STEP_NUM_TASKS; SLURM_NTASKS as fallback), the step's node list and tasks per
node. The master address is the first node of the step (where task 0 runs under block and cyclic
distribution) and the port is derived from the job id, so every task agrees on both without talking;
MASTER_ADDR/MASTER_PORT in the environment win over the derived values.

Everything here is checked before any process group exists: an inconsistent environment raises
`LaunchError` at once instead of leaving ranks waiting in `init_process_group`.
"""
from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass
from typing import Iterator

from parallel.dims import ParallelLayoutError

log = logging.getLogger(__name__)

# 20000-29999: below Linux's ephemeral range (32768+), so an outgoing connection cannot hold it.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 10000


class LaunchError(ParallelLayoutError):
    """The launcher's environment cannot describe a consistent set of ranks."""


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"
    local_world_size: int = 1  # processes on this node


def iter_slurm_hosts(nodelist: str) -> Iterator[str]:
    """Expand a SLURM host list lazily, in SLURM's order.

    Handles every form `scontrol show hostnames` accepts: 'node[01-04,07]' (zero padding kept),
    'gpu-a[1-2],gpu-b3' (several groups), 'n[001-003]-ib' (text after the brackets) and
    'rack[1-2]-n[1-2]' (several bracket sets: the cartesian product, leftmost slowest).
    """
    text = nodelist.strip()
    if not text or text == "(null)":
        raise ValueError(f"empty SLURM node list {nodelist!r}")
    for item in _split_top_level(text, nodelist):
        yield from _expand_item(item, nodelist)


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as 'gpu[003-005,010],cpu1' -> 'gpu003'."""
    return next(iter_slurm_hosts(nodelist))


def _split_top_level(text: str, original: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested '[' in SLURM node list {original!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in SLURM node list {original!r}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in SLURM node list {original!r}")
    items.append(text[start:])
    if any(not item.strip() for item in items):
        raise ValueError(f"empty host name in SLURM node list {original!r}")
    return [item.strip() for item in items]


def _expand_ranges(body: str, original: str) -> list[str]:
    values = []
    for part in body.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not match:
            raise ValueError(f"cannot parse range {part!r} in SLURM node list {original!r}")
        lo, hi = match.group(1), match.group(2) or match.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {part!r} in SLURM node list {original!r}")
        values.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return values


def _expand_item(item: str, original: str) -> Iterator[str]:
    # 'rack[1-2]-n[01-02]' -> [['rack'], ['1', '2'], ['-n'], ['01', '02']], expanded as a product
    choices = []
    for token in re.split(r"(\[[^\]]*\])", item):
        if token.startswith("["):
            if token == "[]":
                raise ValueError(f"empty brackets in SLURM node list {original!r}")
            choices.append(_expand_ranges(token[1:-1], original))
        elif token:
            choices.append([token])

    def product(i: int, prefix: str) -> Iterator[str]:
        if i == len(choices):
            yield prefix
            return
        for choice in choices[i]:
            yield from product(i + 1, prefix + choice)

    yield from product(0, "")


def parse_tasks_per_node(spec: str) -> list[int]:
    """SLURM's compressed per-node counts: '4(x2),3' -> [4, 4, 3]."""
    counts = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            raise ValueError(f"cannot parse SLURM tasks-per-node {spec!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _int(env, name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise LaunchError(f"{name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"{name}={value!r} is not an integer") from None


def _check(env: LaunchEnv, rank_var: str, world_var: str, local_var: str) -> LaunchEnv:
    if env.world_size < 1:
        raise LaunchError(f"{world_var}={env.world_size}: the job needs at least one process")
    if not 0 <= env.rank < env.world_size:
        raise LaunchError(f"{rank_var}={env.rank} is outside 0..{env.world_size - 1} ({world_var}={env.world_size})")
    if not 0 <= env.local_rank < env.local_world_size:
        raise LaunchError(f"{local_var}={env.local_rank} is outside 0..{env.local_world_size - 1} "
                          f"({env.local_world_size} processes on this node)")
    if not 0 < env.master_port < 65536:
        raise LaunchError(f"MASTER_PORT={env.master_port} is not a TCP port")
    return env


def _read_torchrun(env) -> LaunchEnv:
    world = _int(env, "WORLD_SIZE")
    return _check(LaunchEnv(
        rank=_int(env, "RANK"),
        world_size=world,
        local_rank=_int(env, "LOCAL_RANK", 0),
        master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
        master_port=_int(env, "MASTER_PORT", 29500),
        source="torchrun",
        local_world_size=_int(env, "LOCAL_WORLD_SIZE", world),
    ), "RANK", "WORLD_SIZE", "LOCAL_RANK")


def _read_slurm(env) -> LaunchEnv:
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    # Inside an srun step SLURM_NTASKS is the step's count too, but SLURM_STEP_NUM_TASKS is the
    # authoritative one (the job may hold more tasks than this step runs).
    world_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    world = _int(env, world_var)
    if not in_step and env.get("ENVIRONMENT") == "BATCH" and world > 1:
        # The batch script itself carries SLURM_PROCID=0 and the job's SLURM_NTASKS: started there
        # without srun, this process would wait forever for world-1 peers that nobody launches.
        raise LaunchError(
            f"this process runs in the SLURM batch script itself (no SLURM_STEP_ID) while the job asks for "
            f"SLURM_NTASKS={world} tasks: start it with `srun python examples/pretrain_clip.py ...` (one task per "
            "GPU), or with one torchrun per node (`srun --ntasks-per-node=1 torchrun ...`; see "
            "examples/slurm/README.md); for a single process here, run it with SLURM_NTASKS=1")
    rank = _int(env, "SLURM_PROCID")
    local_rank = _int(env, "SLURM_LOCALID", 0)
    per_node_spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    local_world = None
    if per_node_spec:
        counts = parse_tasks_per_node(per_node_spec)
        node_id = _int(env, "SLURM_NODEID", 0)
        if not 0 <= node_id < len(counts):
            raise LaunchError(f"SLURM_NODEID={node_id} but tasks per node {per_node_spec!r} names {len(counts)} nodes")
        local_world = counts[node_id]
    elif env.get("SLURM_NTASKS_PER_NODE"):
        local_world = _int(env, "SLURM_NTASKS_PER_NODE")
    if local_world is None:
        local_world = world
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if env.get("MASTER_ADDR"):
        master_addr = env["MASTER_ADDR"]
    elif world == 1 or not nodelist:
        if world > 1:
            raise LaunchError(f"{world_var}={world} but no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST to find "
                              "task 0's host in; set MASTER_ADDR")
        master_addr = "127.0.0.1"
    else:
        try:
            # The step's list, not the job's: a step on part of the allocation starts task 0 on the
            # first node of the step, which need not be the job's first node.
            master_addr = first_slurm_host(nodelist)
        except ValueError as exc:
            raise LaunchError(f"{exc}; set MASTER_ADDR to the host of task 0") from None
    if env.get("MASTER_PORT"):
        master_port = _int(env, "MASTER_PORT")
    elif world == 1:
        master_port = _free_port()
    else:
        master_port = SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID", 0) % SLURM_PORT_SPAN
    launch = _check(LaunchEnv(rank=rank, world_size=world, local_rank=local_rank, master_addr=master_addr,
                              master_port=master_port, source="slurm", local_world_size=local_world),
                    "SLURM_PROCID", world_var, "SLURM_LOCALID")
    gpus = env.get("SLURM_GPUS_ON_NODE")
    if gpus and gpus.isdigit() and int(gpus) > 0 and local_rank == 0 and int(gpus) != local_world:
        log.warning("SLURM gives this node %s GPUs but %d tasks run on it: %s", gpus, local_world,
                    "some GPUs stay idle (use --ntasks-per-node equal to the GPUs per node)" if int(gpus) > local_world
                    else "tasks will share GPUs (use one task per GPU)")
    return launch


def read_launch_env(environ: dict | None = None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (also when torchrun runs inside a SLURM job)
        return _read_torchrun(env)
    if "SLURM_PROCID" in env and ("SLURM_NTASKS" in env or "SLURM_STEP_NUM_TASKS" in env):
        return _read_slurm(env)
    return LaunchEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=_free_port(),
                     source="single")
