"""Checkpoint manager: when to save, atomic sharded saves (optionally asynchronous), keep-K,
`latest`, resume and preemption.

The trainer calls `resume` before its loop, `after_step` after every optimizer step (interval
saves; agreed preemption stop) and `at_end`. Everything is collective: every rank builds one
manager (in the same order as its other process groups) and calls the same methods.

Process groups: two gloo groups of all ranks are created here, one for checkpoint I/O (DCP's
planning/gather and the commit barrier; an asynchronous save uses it from its writer thread) and
one for the per-step preemption flag, so the training thread never shares a group with the writer
thread. gloo works beside NCCL on GPU, and DCP's object collectives want CPU tensors anyway.

Asynchronous save (`checkpoint.async_save`): the state is copied to host memory on the training
thread (the only blocking part), then written and committed by a background thread; the next save,
a preemption and the end of training wait for it. A failed asynchronous save is re-raised there; one still running when the process dies is never
committed (its temporary directory is removed by the next save).

`latest` names only healthy states. A diverged run (fp16 at too high a learning rate, a bad batch)
keeps stepping with non-finite losses until the trainer gives up, and its saves hold the blown-up
weights. The weights saved at step N are judged by the loss they produce, which is step N+1's: an
interval save becomes `latest` only once the next step's loss is finite (an end-of-run or
preemption save, with no next step, by its own step's loss). A save that fails the test is kept on
disk for inspection but never named by `latest`, and since keep-K never removes what `latest`
names, the last healthy checkpoint survives any number of later saves; `checkpoint.resume=auto`
restarts from it, and the trainer's stop message names it. The price: a crash in the one step
after an interval save resumes from the save before it.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.checkpoint import state as st
from engine.checkpoint import storage
from engine.checkpoint.lock import STALE_AFTER_S, CheckpointLockError, RunLock
from engine.checkpoint.preemption import PreemptionHandler
from engine.checkpoint.storage import (
    DCP_METADATA,
    FORMAT,
    FORMAT_VERSION,
    LATEST,
    META_FILE,
    CheckpointError,
    commit,
    describe_files,
    is_complete,
    list_complete,
    prune,
    read_json,
    read_latest,
    read_state,
    remove_stale_tmp,
    step_dirname,
    tmp_dirname,
    verify_files,
    write_json_atomic,
    write_state,
)
from parallel.timeouts import new_group

log = logging.getLogger("engine")


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _world() -> int:
    return dist.get_world_size() if _dist() else 1


def _broadcast(value, group):
    """Rank 0's `value` on every rank."""
    if not _dist():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _gather(value, group) -> list | None:
    """[value of rank 0, 1, ...] on rank 0, None elsewhere."""
    if not _dist():
        return [value]
    out = [None] * _world() if _rank() == 0 else None
    dist.gather_object(value, out, dst=0, group=group)
    return out


def _all_gather(value, group) -> list:
    if not _dist():
        return [value]
    out = [None] * _world()
    dist.all_gather_object(out, value, group=group)
    return out


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, or a checkpoint root (its `latest`); raises naming what is wrong."""
    if is_complete(path):
        return path
    if os.path.isdir(path) and (os.path.exists(os.path.join(path, LATEST)) or any(
            n.startswith("step_") for n in os.listdir(path))):
        found = read_latest(path)
        if found is not None:
            return found
        raise CheckpointError(f"{path}: no complete checkpoint in this directory")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: not a complete checkpoint (no COMPLETE marker; an interrupted save?)")
    raise CheckpointError(f"{path}: no such checkpoint")


def verify_collectively(path: str, checksums: bool, group) -> None:
    """Each rank checks a share of the files; every rank raises the same error naming the bad ones."""
    marker = read_json(os.path.join(path, "COMPLETE"), "completion marker")
    names = sorted(marker["files"])[_rank()::_world()]
    problems = verify_files(path, checksums=checksums, names=names)
    everyone = [p for ps in _all_gather(problems, group) for p in ps]
    if everyone:
        raise CheckpointError("checkpoint files are damaged; nothing was loaded:\n  " + "\n  ".join(everyone))


@dataclass
class _LatestCandidate:
    """A save on its way to becoming `latest`: the pointer moves once the directory is committed (by
    the writer thread, for an asynchronous save) and the weights are known to be healthy."""

    path: str
    committed: bool = False
    healthy: bool | None = None  # None: not known yet (an interval save waits for the next step's loss)
    pointed: bool = False


class CheckpointManager:
    def __init__(self, cfg, ctx=None, *, family: str = "clip", extra_state: dict | None = None,
                 init_key_map=None, install_signals: bool = True, lock_stale_after_s: float = STALE_AFTER_S):
        """`cfg` is the family's experiment config (saved whole into each checkpoint); `ctx` the
        `ParallelContext` (None: one process); `family` the registered family name (the offline
        tools rebuild its model); `extra_state` the family's {name: Stateful} saved beside the model
        (see `engine.family.TrainingParts.extra_state`); `init_key_map` how `checkpoint.init_from`
        names map onto the model (see `engine.checkpoint.key_map`). Takes the checkpoint directory's
        lock (see `engine.checkpoint.lock`; `lock_stale_after_s` is its heartbeat age for a holder on
        another host): another live run there stops every rank with the same `CheckpointLockError`."""
        self.cfg, self.ck = cfg, cfg.checkpoint
        self.family, self.extra_state, self.init_key_map = family, dict(extra_state or {}), init_key_map
        self.root = os.path.abspath(self.ck.dir or os.path.join(cfg.trainer.output_dir, "checkpoints"))
        self.place = st.Placement.from_ctx(ctx) if ctx is not None else st.Placement()
        # parallel.timeouts.new_group: with parallel.distributed_timeout_minutes, not torch's 30 minutes
        self.io_group = new_group(backend="gloo", desc="checkpoint_io") if _dist() else None
        self.flag_group = new_group(backend="gloo", desc="checkpoint_preemption_flag") if _dist() else None
        self.lock = self._take_lock(lock_stale_after_s)
        self.preemption = PreemptionHandler(group=self.flag_group)
        if install_signals:
            self.preemption.install()
        self.last_saved_step: int | None = None
        self.last_saved_path: str | None = None
        self.loaded_from: str | None = None
        self.healthy_path: str | None = None  # what `latest` names (or will, once committed) in this run
        self.timings: list[dict] = []  # one per save / load
        self._last_loss_finite = True
        self._awaiting_loss: _LatestCandidate | None = None  # the interval save the next step's loss judges
        self._pointer_lock = threading.Lock()  # candidates are updated by the writer and the training thread
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None

    # -- the trainer's hooks ------------------------------------------------------------------------
    def resume(self, trainer) -> str | None:
        """Load per `checkpoint.resume`: auto (the latest under `dir`, if any), none, or a path. With
        nothing to resume, `checkpoint.init_from` (model weights only) initialises the model."""
        path = self._resume(trainer)
        if path is None and self.ck.init_from:
            from engine.checkpoint.key_map import load_model_weights

            load_model_weights(self.ck.init_from, trainer.model, self.place, self.init_key_map, group=self.io_group,
                               checksums=self.ck.verify_checksums)
            trainer.optimizer.after_checkpoint_load(master_loaded=False)  # master weights from the loaded ones
            self.loaded_from = self.ck.init_from
        return path

    def _resume(self, trainer) -> str | None:
        choice = self.ck.resume
        if choice in (None, "", "none", "None"):
            if _rank() == 0 and list_complete(self.root):
                log.warning("checkpoint.resume=none but %s holds checkpoints: saves of the same steps will "
                            "replace them", self.root)
            return None
        path = None
        if _rank() == 0:
            try:
                path = ("auto", read_latest(self.root)) if choice == "auto" else ("path", resolve_checkpoint(choice))
            except CheckpointError as exc:
                path = ("error", str(exc))
        kind, path = _broadcast(path, self.io_group)
        if kind == "error":
            raise CheckpointError(f"checkpoint.resume={choice}: {path}")
        if path is None:
            log.info("no checkpoint under %s: training starts from scratch", self.root)
            return None
        self.load(path, trainer)
        return path

    def after_step(self, trainer, loss: float | None = None) -> bool:
        """Save at the interval; on an agreed preemption save and return True (stop training).
        `loss` is this step's (the same on every rank); it judges the previous step's save."""
        step = trainer.state.step
        self._last_loss_finite = loss is None or math.isfinite(loss)
        if self._awaiting_loss is not None:
            self._judge(self._awaiting_loss, self._last_loss_finite, f"the loss of step {step}, the first computed "
                                                                      "from its weights, is not finite")
            self._awaiting_loss = None
        if self.preemption.should_stop():
            path = self.save(trainer, reason="preemption")
            self.wait()
            log.warning("preempted by %s at step %d: checkpoint %s; exiting", self.preemption.signal_name, step,
                        path)
            return True
        if self.ck.save_interval > 0 and step % self.ck.save_interval == 0:
            self.save(trainer, reason="interval")
        return False

    def at_end(self, trainer) -> None:
        if self.ck.save_at_end and trainer.state.step >= trainer.cfg.max_steps:
            self.save(trainer, reason="end")
        if self._awaiting_loss is not None:  # an interval save at the last step: no later loss to wait for
            self._judge(self._awaiting_loss, self._last_loss_finite,
                        f"the loss of its step {trainer.state.step} is not finite")
            self._awaiting_loss = None
        self.wait()

    def healthy_checkpoint_note(self) -> str:
        """Where a diverged run can restart from, for the trainer's stop message."""
        if self.healthy_path is None:
            return f"no healthy checkpoint of this run exists under {self.root}"
        return (f"the last healthy checkpoint is {self.healthy_path} (`latest` names it, so checkpoint.resume=auto "
                "restarts there; later saves with non-finite losses are kept but never made latest)")

    def close(self) -> None:
        """Wait for an asynchronous save, restore the signal handlers, release the directory's lock."""
        try:
            self.wait()
        finally:
            self.preemption.uninstall()
            if self.lock is not None:
                self.lock.release()

    def _take_lock(self, stale_after_s: float) -> RunLock | None:
        """Collective: rank 0 takes the lock; every rank raises the same error when it cannot."""
        lock, problem = None, None
        if _rank() == 0:
            try:
                lock = RunLock(self.root, stale_after_s=stale_after_s).acquire()
            except CheckpointLockError as exc:
                problem = str(exc)
        problem = _broadcast(problem, self.io_group)
        if problem is not None:
            raise CheckpointLockError(problem)
        return lock

    # -- save ----------------------------------------------------------------------------------------
    def save(self, trainer, reason: str = "manual") -> str:
        """Collective: write this step's checkpoint and return its path (nothing is written when this
        manager has just saved or resumed from that very directory). An `interval` save becomes
        `latest` when the next step's loss is finite (`after_step`), any other when the last loss was."""
        step = trainer.state.step
        final = os.path.join(self.root, step_dirname(step))
        if self.last_saved_step == step and self.last_saved_path == final:
            return final
        self.wait()
        start = time.time()
        tmp = os.path.join(self.root, tmp_dirname(step))
        problem = None
        if _rank() == 0:
            try:
                if self.lock is not None:
                    self.lock.verify()  # another run took the directory over while this one was stopped
                os.makedirs(self.root, exist_ok=True)
                remove_stale_tmp(self.root)  # an interrupted save's leftovers (never loaded)
                if is_complete(final):  # e.g. saved by a run that crashed before moving `latest`
                    log.warning("checkpoint %s exists; it is replaced once this save is complete", final)
                os.makedirs(tmp)
            except CheckpointLockError as exc:
                problem = str(exc)
        problem = _broadcast(problem, self.io_group)  # also: no rank writes before `tmp` exists
        if problem is not None:
            raise CheckpointLockError(problem)

        entries, table = self._collect(trainer)
        everyone = _gather({"table": table, "extra": st.extra_state_keys(trainer.model, self.place),
                            "objects": [k for k in entries if not isinstance(entries[k], st.Boxes)]}, self.io_group)
        if _rank() == 0:
            write_json_atomic(os.path.join(tmp, META_FILE), self._meta(trainer, everyone, reason))
        candidate = _LatestCandidate(final)
        if self.ck.async_save:
            entries = st.stage(entries)
            blocking = time.time() - start
            self._thread_error = None
            self._thread = threading.Thread(target=self._write_in_thread, args=(tmp, final, entries, step, start,
                                                                                 blocking, candidate), daemon=True)
            self._thread.start()
        else:
            self._write_and_commit(tmp, final, entries, step, candidate)
            self._record("save", step, time.time() - start, time.time() - start)
        self.last_saved_step, self.last_saved_path = step, final
        if reason == "interval":
            self._awaiting_loss = candidate
        else:
            self._judge(candidate, self._last_loss_finite, f"the loss of its step {step} is not finite")
        return final

    def _judge(self, candidate: _LatestCandidate, healthy: bool, why_not: str) -> None:
        with self._pointer_lock:
            candidate.healthy = healthy
            self._point_latest_if_ready(candidate)
        if healthy:
            self.healthy_path = candidate.path
        elif _rank() == 0:
            log.warning("checkpoint %s is kept, but `latest` stays on %s: %s", candidate.path,
                        self.healthy_path or "what it named before", why_not)

    def _point_latest_if_ready(self, candidate: _LatestCandidate) -> None:
        """Under `_pointer_lock`: move `latest` once the candidate is both committed and healthy."""
        if candidate.committed and candidate.healthy and not candidate.pointed:
            candidate.pointed = True
            if _rank() == 0 and not (self.lock is not None and self.lock.lost_to is not None):
                storage.update_latest(self.root, os.path.basename(candidate.path))
                removed = prune(self.root, self.ck.keep_last)  # what the old `latest` protected may go now
                if removed:
                    log.info("removed %s (checkpoint.keep_last=%d)", ", ".join(map(os.path.basename, removed)),
                             self.ck.keep_last)

    def _collect(self, trainer) -> tuple[dict, dict]:
        model, optimizer = trainer.model, trainer.optimizer
        entries, table = st.model_entries(model, self.place)
        opt_entries, opt_table = st.optimizer_entries(optimizer, model, self.place)
        entries.update(opt_entries)
        table.update(opt_table)
        entries[self.place.rng_key] = st.capture_rng()
        loader = getattr(trainer, "train_loader", None)
        # Every data-reading stage of a replica reads the same stream: the first stage's copy is kept.
        if self.place.pp_rank == 0 and loader is not None and hasattr(loader, "state_dict"):
            entries[self.place.data_key] = loader.state_dict()
        extra_entries, extra_table = st.extra_entries(self.extra_state)
        entries.update(extra_entries)
        table.update(extra_table)
        return st.to_cpu(entries), table

    def _meta(self, trainer, everyone: list, reason: str) -> dict:
        from engine.config import to_yaml

        tables, extra, objects = {}, set(), set()
        for part in everyone:
            tables.update(part["table"])
            extra.update(part["extra"])
            objects.update(part["objects"])
        s, optimizer = trainer.state, trainer.optimizer
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "family": self.family, "step": s.step,
            "samples_seen": s.samples_seen,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reason": reason, "torch": torch.__version__,
            "layout": {**self.place.layout(), "world_size": _world()},
            "contents": ["model", "optimizer", "scheduler", "trainer", "rng"]
            + (["data"] if any(o.startswith("data/") for o in objects) else [])
            + (["extra"] if any(k.startswith(st.EXTRA) for k in list(tables) + list(objects)) else []),
            "optimizer": {"type": type(optimizer).__name__, "name": self.cfg.optim.name,
                          "step": optimizer.checkpoint_step, "loss_scaler": optimizer.loss_scaler.state_dict()},
            "scheduler": trainer.scheduler.state_dict(),
            "trainer": {"step": s.step, "samples_seen": s.samples_seen, "skipped_steps": s.skipped_steps,
                        "total_skipped": s.total_skipped, "history": [list(h) for h in s.history]},
            "tensors": dict(sorted(tables.items())), "extra_state_keys": sorted(extra), "objects": sorted(objects),
            "config_yaml": to_yaml(self.cfg),
        }

    def _write_and_commit(self, tmp: str, final: str, entries: dict, step: int, candidate: _LatestCandidate) -> None:
        write_state(tmp, entries, group=self.io_group)
        mine = sorted(n for n in os.listdir(tmp) if n.startswith(f"__{_rank()}_") and n.endswith(".distcp"))
        files = _gather(describe_files(tmp, mine), self.io_group)
        if _rank() == 0:
            merged = {name: info for part in files for name, info in part.items()}
            merged.update(describe_files(tmp, [META_FILE, DCP_METADATA]))
            commit(self.root, tmp, os.path.basename(final), merged, step, point_latest=False)
            removed = prune(self.root, self.ck.keep_last)
            log.info("checkpoint %s saved (%.1f MB)%s", final, sum(i["size"] for i in merged.values()) / 2**20,
                     f"; removed {', '.join(map(os.path.basename, removed))}" if removed else "")
        if _dist():
            dist.barrier(group=self.io_group)
        with self._pointer_lock:
            candidate.committed = True
            self._point_latest_if_ready(candidate)

    def _write_in_thread(self, tmp, final, entries, step, start, blocking, candidate) -> None:
        try:
            self._write_and_commit(tmp, final, entries, step, candidate)
            self._record("save", step, blocking, time.time() - start)
        except BaseException as exc:  # noqa: BLE001 - re-raised by wait() on the training thread
            self._thread_error = exc

    def wait(self) -> None:
        """Block until an asynchronous save has been committed (re-raising its error)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._thread_error is not None:
                error, self._thread_error = self._thread_error, None
                raise CheckpointError(f"asynchronous checkpoint save failed: {error}") from error

    def _record(self, kind: str, step: int, blocking: float, total: float) -> None:
        self.timings.append({"kind": kind, "step": step, "blocking_s": blocking, "total_s": total})

    # -- load ----------------------------------------------------------------------------------------
    def load(self, path: str, trainer) -> dict:
        """Collective: load checkpoint `path` into the trainer's model, optimizer, schedule, counters,
        RNG and data position, re-sharding to this run's layout. Returns the checkpoint's meta."""
        start = time.time()
        meta = load_into(path, self.place, trainer.model, trainer.optimizer, load_optimizer=self.ck.load_optimizer,
                         group=self.io_group, checksums=self.ck.verify_checksums,
                         loader=getattr(trainer, "train_loader", None), cfg=self.cfg, extra_state=self.extra_state)
        contents = meta["contents"]
        if "trainer" in contents:
            s, saved = trainer.state, meta["trainer"]
            s.step, s.samples_seen = saved["step"], saved["samples_seen"]
            s.skipped_steps, s.total_skipped = saved["skipped_steps"], saved["total_skipped"]
            s.history = [tuple(h) for h in saved["history"]]
            trainer.optimizer.loss_scaler.load_state_dict(meta["optimizer"]["loss_scaler"])
            trainer.scheduler.load_state_dict(meta["scheduler"])
            self.last_saved_step, self.last_saved_path = s.step, os.path.abspath(path)
        self.loaded_from = path
        self.healthy_path = os.path.abspath(path)
        self._record("load", meta["step"], time.time() - start, time.time() - start)
        log.info("resumed from %s (step %d, %d samples) in %.1f s", path, meta["step"], meta["samples_seen"],
                 time.time() - start)
        return meta


def load_into(path: str, place: st.Placement, model, optimizer=None, *, load_optimizer: bool = True, group=None,
              checksums: bool = True, loader=None, cfg=None, extra_state: dict | None = None) -> dict:
    """Collective: model weights (always), optimizer state (when `load_optimizer` and the checkpoint
    has it; otherwise the optimizer only re-derives its master copy from the loaded weights), RNG
    (same layout only), data position (same DP size; into every stage that reads data) and the
    family's extra state from `path`."""
    meta = read_json(os.path.join(path, META_FILE), "checkpoint description")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{os.path.join(path, META_FILE)}: not a {FORMAT} checkpoint")
    verify_collectively(path, checksums, group)
    if cfg is not None:
        _log_config_changes(meta["config_yaml"], cfg)
    contents = meta["contents"]
    target = st.LoadTarget(meta["tensors"])
    master, names, error = False, [], None
    with_optimizer = optimizer is not None and load_optimizer and "optimizer" in contents
    try:  # a mismatch on one rank must stop every rank, not leave the others in a collective
        names = st.add_model(target, model, place, prefer_master=True)
        if with_optimizer:
            master = st.add_optimizer(target, optimizer, model, place)["master"]
    except CheckpointError as exc:
        error = str(exc)
    _check_model_coverage(meta, names, error, group)
    if optimizer is not None and "optimizer" not in contents:
        log.warning("checkpoint %s holds model weights only: optimizer state starts fresh", path)
    elif optimizer is not None and not load_optimizer:
        log.info("checkpoint.load_optimizer=false: optimizer state starts fresh")
    same_layout = meta["layout"]["tensor_model_parallel_size"] == place.tp_size and \
        meta["layout"]["pipeline_model_parallel_size"] == place.pp_size and \
        meta["layout"]["data_parallel_size"] == place.dp_size
    if "rng" in contents and same_layout and place.rng_key in meta["objects"]:
        target.add_object(place.rng_key)
    want_data = loader is not None and place.data_key in meta.get("objects", [])
    if want_data:
        target.add_object(place.data_key)
    extra_loads = st.add_extra(target, extra_state or {}, meta) if "extra" in contents else {}
    read_state(path, target.entries, group=group)
    target.finish()
    st.finish_extra(extra_loads, target)
    if optimizer is not None:
        if with_optimizer:
            optimizer.checkpoint_step = meta["optimizer"]["step"]
        optimizer.after_checkpoint_load(master_loaded=master)
    if loader is not None and "data" in contents:
        if want_data:
            state = dict(target.entries[place.data_key])
            if meta["layout"]["data_parallel_size"] != place.dp_size:
                state["exact"] = False
        else:  # a DP rank the saved run did not have: a fresh stream, past the saved position
            state = {"exact": False, "stream": None, "batches_consumed": meta["samples_seen"], "stats": {},
                     "num_shards": -1, "dp_rank": -1}
        exact = loader.load_state_dict(state)
        if not exact:
            log.warning("data pipeline position not restored exactly (data-parallel size %d -> %d or data "
                        "workers): this rank continues on a freshly seeded stream",
                        meta["layout"]["data_parallel_size"], place.dp_size)
    if place.rng_key in target.entries:
        st.restore_rng(target.entries[place.rng_key])
    elif "rng" in contents:
        from parallel.random import seed_everything

        seed = (cfg.trainer.seed if cfg is not None else 0) + meta["step"]
        log.warning("parallel layout changed (%s -> %s): random generators reseeded with seed %d instead of "
                    "restored", meta["layout"], place.layout(), seed)
        seed_everything(seed)
    return meta


def _check_model_coverage(meta: dict, names: list[str], error: str | None, group) -> None:
    """Collective: raise on every rank when any rank could not place a tensor (`error`), or when a
    model tensor of the checkpoint is taken by no rank (a smaller model is an error too)."""
    taken, errors = set(), set()
    for part_names, part_error in _all_gather((sorted(names), error), group):
        taken.update(part_names)
        if part_error:
            errors.add(part_error)
    if errors:
        raise CheckpointError("cannot load this checkpoint into this model; nothing was loaded:\n  "
                              + "\n  ".join(sorted(errors)[:12]))
    stored = {k[len(st.MODEL):] for k in meta["tensors"] if k.startswith(st.MODEL)}
    unused = sorted(stored - taken)
    if unused:
        raise CheckpointError(f"the checkpoint has {len(unused)} model tensors this model does not: "
                              f"{', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''} (a different model config?)")


def _log_config_changes(saved_yaml: str, cfg) -> None:
    from omegaconf import OmegaConf

    from engine.config import _flatten, to_yaml

    saved = _flatten(OmegaConf.to_container(OmegaConf.create(saved_yaml)))
    now = _flatten(OmegaConf.to_container(OmegaConf.create(to_yaml(cfg))))
    changed = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
               if saved.get(k) != now.get(k) and not k.startswith("checkpoint.")]
    if changed:
        log.info("config differs from the checkpoint's in %d keys: %s%s", len(changed), "; ".join(changed[:12]),
                 " ..." if len(changed) > 12 else "")
