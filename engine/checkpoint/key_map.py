"""Model weights from a checkpoint whose names differ from this model's: a `KeyMap` renames and says
which tensors may be missing on either side, everything else must match exactly.

Uses: local <-> Transformer Engine layer names (TE fuses the pre-attention norm into `linear_qkv`),
base weights into LoRA-wrapped layers (the adapters are new: allowed missing), and partial
initialisation (a VLM's vision tower from a CLIP checkpoint and its LLM from an LLM checkpoint: one
map per source, each renaming one part and leaving the rest missing). Names are canonical on both
sides (TP=1/PP=1, global layer numbers), so any layout loads from any layout, as for resume.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
import re
from dataclasses import dataclass, field

import torch

from engine.checkpoint import state as st
from engine.checkpoint.storage import META_FILE, CheckpointError, read_json, read_state

log = logging.getLogger("engine")


@dataclass
class KeyMap:
    """`rename`: [(regex on this model's canonical name, replacement giving the checkpoint's name)],
    applied in order, first match only. `allow_missing`: globs of this model's names the checkpoint
    may lack (they keep their initialisation). `allow_unused`: globs of the checkpoint's names this
    model may leave unread. Names are without the `model/` prefix."""

    rename: list = field(default_factory=list)
    allow_missing: list = field(default_factory=list)
    allow_unused: list = field(default_factory=list)

    def __post_init__(self):
        self._compiled = [(re.compile(pattern), repl) for pattern, repl in self.rename]

    def source(self, name: str) -> str:
        for pattern, repl in self._compiled:
            if pattern.search(name):
                return pattern.sub(repl, name, count=1)
        return name

    def may_be_missing(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, glob) for glob in self.allow_missing)

    def may_be_unused(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, glob) for glob in self.allow_unused)


@dataclass
class LoadReport:
    loaded: list  # this model's names that were read
    missing: list  # this model's names the checkpoint lacked (allowed)
    unused: list  # checkpoint names no rank read (allowed)


def load_model_weights(path: str, model: torch.nn.Module, place: st.Placement | None = None,
                       key_map: KeyMap | None = None, *, group=None, checksums: bool = True) -> LoadReport:
    """Collective: this rank's share of the model's tensors from checkpoint `path` through `key_map`.
    Any problem on any rank (a name neither mapped nor allowed missing, a shape that differs, a
    checkpoint tensor nobody reads that is not allowed unused) raises the same `CheckpointError` on
    every rank before anything is read. fp32 parameters read the fp32 master copy when there is one."""
    from engine.checkpoint.manager import _all_gather, resolve_checkpoint, verify_collectively

    place = place or st.Placement()
    key_map = key_map or KeyMap()
    path = resolve_checkpoint(path)
    meta = read_json(os.path.join(path, META_FILE), "checkpoint description")
    verify_collectively(path, checksums, group)
    target = st.LoadTarget(meta["tensors"])
    loaded, missing, errors = [], [], []
    with torch.no_grad():
        for local, tensor in model.state_dict(keep_vars=True).items():
            if not torch.is_tensor(tensor):
                continue
            spec = st.tensor_specs_cache(model, place)[local]
            source = key_map.source(spec.name)
            key = st.MODEL + source
            if tensor.dtype == torch.float32 and st.MASTER + source in target.saved:
                key = st.MASTER + source
            if key not in target.saved:
                if key_map.may_be_missing(spec.name):
                    missing.append(spec.name)
                else:
                    errors.append(f"{spec.name}: not in the checkpoint"
                                  + (f" (read as {source})" if source != spec.name else ""))
                continue
            renamed = dataclasses.replace(spec, name=key)
            try:
                target.add(key, renamed, spec.boxes(tensor.detach()))
            except CheckpointError as exc:
                errors.append(str(exc))
                continue
            loaded.append(source)
    taken, all_errors, all_missing = set(), [], set()
    for part_loaded, part_missing, part_errors in _all_gather((loaded, missing, errors), group):
        taken.update(part_loaded)
        all_missing.update(part_missing)
        all_errors.extend(e for e in part_errors if e not in all_errors)
    stored = sorted(k[len(st.MODEL):] for k in meta["tensors"] if k.startswith(st.MODEL))
    unused = [k for k in stored if k not in taken]
    not_allowed = [k for k in unused if not key_map.may_be_unused(k)]
    if all_errors or not_allowed:
        lines = all_errors[:12]
        if not_allowed:
            lines.append(f"{len(not_allowed)} checkpoint tensors this model does not read: "
                         f"{', '.join(not_allowed[:8])}{' ...' if len(not_allowed) > 8 else ''}")
        raise CheckpointError(f"cannot initialise this model from {path}; nothing was loaded:\n  " + "\n  ".join(lines))
    read_state(path, target.entries, group=group)
    target.finish()
    report = LoadReport(sorted(taken), sorted(all_missing), unused)
    log.info("model weights from %s: %d tensors loaded, %d kept their initialisation%s, %d checkpoint tensors "
             "not used", path, len(report.loaded), len(report.missing),
             f" ({', '.join(report.missing[:4])}{' ...' if len(report.missing) > 4 else ''})" if report.missing else "",
             len(report.unused))
    return report
