"""One run per checkpoint directory: a lock file that names its holder.

Two jobs writing into one checkpoint directory corrupt each other's `latest`, keep-K and final
files (seen: a torchrun agent was killed, its workers ran on as orphans, and a restart would have
shared the directory with them). The run's rank 0 takes `<checkpoint dir>/LOCK` before anything
is saved; a second run finds it and stops with a message naming the holder.

The lock file (JSON) holds: host, pid and the process's start time (so a reused pid is not taken
for the holder), the job id (SLURM_JOB_ID and SLURM_STEP_ID, or TORCHELASTIC_RUN_ID) and the start
time. The heartbeat is the file's modification time, which a daemon thread touches every
`heartbeat_s` seconds (touching, never rewriting: a holder that wakes up after a takeover cannot
overwrite the new holder's lock, at most refresh its heartbeat).

When is a lock stale (taken over, with a warning naming the old holder)?
- Holder on this host: when its process is gone (no process with that pid and start time). A
  live holder is never taken over, however old its heartbeat (it may be stopped; kill it).
- Holder on another host: its process cannot be checked from here, so by heartbeat: stale when
  the heartbeat is older than `stale_after_s` (default 10 minutes; hosts' clocks are assumed to
  agree to well within that). Also stale: the same SLURM job and step as ours, which SLURM runs
  once at a time (a requeued job restarting on another node).
- An unreadable lock file: stale once it is older than `stale_after_s`, else a refusal.

A holder that lost its lock (it was stopped longer than `stale_after_s` and another run took over)
learns it at its next heartbeat; `verify()` then raises and the checkpoint manager saves nothing.
The lock is released (the file removed, if it is still ours) by `release()`, at interpreter exit,
or never when the process is killed, which is what the same-host dead-process rule is for.

Taking the lock is `link()` of a complete temporary file onto the lock path (atomic and exclusive,
also on NFS), so a reader never sees a half-written lock.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref

from engine.checkpoint.errors import CheckpointError

log = logging.getLogger("engine")

LOCK_FILE = "LOCK"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0


class CheckpointLockError(CheckpointError):
    """The checkpoint directory belongs to another live run (or this run lost it)."""


def _process_start_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return None


def job_identity(environ=None) -> dict:
    """The launcher's ids for this job, where set."""
    env = os.environ if environ is None else environ
    keys = ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID")
    return {k: env[k] for k in keys if env.get(k)}


def describe_holder(holder: dict, now: float | None = None) -> str:
    now = time.time() if now is None else now
    job = ", ".join(f"{k}={v}" for k, v in holder.get("job", {}).items())
    beat = holder.get("heartbeat_unix")
    return (f"host {holder.get('host')}, pid {holder.get('pid')}" + (f", job {job}" if job else "")
            + f", started {holder.get('started_at')}"
            + (f", last heartbeat {now - beat:.0f} s ago" if isinstance(beat, (int, float)) else ""))


class RunLock:
    """The lock on one checkpoint directory, held by this process (see the module docstring)."""

    def __init__(self, root: str, *, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S,
                 environ=None):
        self.root = os.path.abspath(root)
        self.path = os.path.join(self.root, LOCK_FILE)
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.record = {"host": self.host, "pid": self.pid, "pid_start_time": _process_start_time(self.pid),
                       "job": job_identity(environ), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "started_unix": time.time(), "heartbeat_s": heartbeat_s, "token": uuid.uuid4().hex}
        self.held = False
        self.lost_to: dict | None = None  # the holder that took the lock over from us
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._finalizer = None

    # -- taking and releasing ------------------------------------------------------------------------
    def acquire(self) -> RunLock:
        """Take the lock, taking over a stale one (logged); raise `CheckpointLockError` naming a live
        holder. Returns self."""
        os.makedirs(self.root, exist_ok=True)
        for _ in range(5):  # a lost race against another starter: look again
            if self._try_create():
                self.held = True
                self._finalizer = weakref.finalize(self, _release_file, self.path, self.record["token"])
                self._thread = threading.Thread(target=self._beat, name="checkpoint-lock-heartbeat", daemon=True)
                self._thread.start()
                return self
            holder = self._read()
            stale, why = self._is_stale(holder)
            if not stale:
                raise CheckpointLockError(
                    f"checkpoint directory {self.root} is in use by another run: {describe_holder(holder)} "
                    f"(lock file {self.path}). Stop that run or give this one another checkpoint.dir / "
                    f"trainer.output_dir; if that run is gone and this cannot be seen from here, delete the "
                    f"lock file. Nothing was written.")
            if self._remove_stale(holder):
                who = describe_holder(holder) if holder else "unreadable lock file"
                log.warning("checkpoint directory %s: taking over the lock of %s (%s)", self.root, who, why)
        raise CheckpointLockError(f"could not take the lock {self.path}: other runs keep taking it")

    def release(self) -> None:
        """Remove the lock file if it is still ours; stop the heartbeat. Idempotent."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self._finalizer is not None:
            self._finalizer()  # removes the file once (weakref.finalize runs at most once)
        self.held = False

    def verify(self) -> None:
        """Raise when another run has taken the lock over (this run was stopped for too long)."""
        if not self.held:
            return
        holder = self._read()
        if holder is None or holder.get("token") != self.record["token"]:
            self.lost_to = holder or {}
        if self.lost_to is not None:
            raise CheckpointLockError(
                f"this run lost the lock on {self.root} to another run ({describe_holder(self.lost_to)}): "
                f"its heartbeat stopped for more than {self.stale_after_s:.0f} s. This run saves nothing more.")

    # -- internals -----------------------------------------------------------------------------------
    def _try_create(self) -> bool:
        tmp = f"{self.path}.{self.host}.{self.pid}.{self.record['token'][:8]}.tmp"
        _write_json(tmp, self.record)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)

    def _read(self) -> dict | None:
        """The holder's record with its heartbeat (the file's mtime); {} when there is no lock file,
        None when it cannot be read."""
        try:
            with open(self.path) as fh:
                holder = json.load(fh)
                beat = os.fstat(fh.fileno()).st_mtime
            return {**holder, "heartbeat_unix": beat} if isinstance(holder, dict) else None
        except FileNotFoundError:
            return {}  # released meanwhile: stale, nothing to remove
        except (OSError, ValueError):
            return None

    def _is_stale(self, holder: dict | None) -> tuple[bool, str]:
        if holder == {}:
            return True, "released meanwhile"
        if holder is None:
            try:
                age = time.time() - os.path.getmtime(self.path)
            except FileNotFoundError:
                return True, "released meanwhile"
            return age > self.stale_after_s, f"unreadable, {age:.0f} s old"
        if holder.get("host") == self.host:
            pid = holder.get("pid")
            started = _process_start_time(pid) if isinstance(pid, int) else None
            recorded = holder.get("pid_start_time")
            if started is None:
                return True, f"process {pid} no longer exists on this host"
            if recorded is not None and abs(started - recorded) > 1.0:
                return True, f"pid {pid} now belongs to another process"
            if pid == self.pid:
                return True, "an earlier checkpoint manager of this same process, never closed"
            return False, "alive on this host"
        mine, theirs = self.record["job"], holder.get("job", {})
        if mine.get("SLURM_JOB_ID") and (mine.get("SLURM_JOB_ID"), mine.get("SLURM_STEP_ID")) == (
                theirs.get("SLURM_JOB_ID"), theirs.get("SLURM_STEP_ID")):
            return True, "an earlier run of this same SLURM job step (requeued)"
        beat = holder.get("heartbeat_unix")
        age = time.time() - beat if isinstance(beat, (int, float)) else float("inf")
        if age > self.stale_after_s:
            return True, f"no heartbeat from host {holder.get('host')} for {age:.0f} s (> {self.stale_after_s:.0f} s)"
        return False, "heartbeat from another host"

    def _remove_stale(self, holder: dict | None) -> bool:
        """Move the stale lock aside and delete it; False when another starter moved it first."""
        if holder == {}:
            return False
        aside = f"{self.path}.stale.{self.host}.{self.pid}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = self._read_file(aside)
        if holder is not None and (moved or {}).get("token") != holder.get("token"):
            # Between reading and moving, another starter replaced the stale lock with its own live
            # one: put that back (link fails if a third one got in; then it is theirs anyway).
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.remove(aside)
            return False
        os.remove(aside)
        return True

    @staticmethod
    def _read_file(path: str) -> dict | None:
        try:
            with open(path) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = self._read()
            if holder is None or holder.get("token") != self.record["token"]:
                self.lost_to = holder or {}
                log.error("checkpoint directory %s: this run's lock was taken over by %s; no more checkpoints "
                          "will be saved", self.root, describe_holder(self.lost_to) if holder else "nobody")
                return
            try:
                os.utime(self.path)
            except OSError as exc:  # a flaky file system must not stop training
                log.warning("checkpoint lock heartbeat failed: %s", exc)


def _write_json(path: str, payload: dict) -> None:
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())


def _release_file(path: str, token: str) -> None:
    try:
        with open(path) as fh:
            if json.load(fh).get("token") != token:
                return  # another run's lock now: not ours to remove
        os.remove(path)
    except (OSError, ValueError):
        pass
