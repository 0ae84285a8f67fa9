"""What goes into a checkpoint, and back: model, optimizer, RNG and data-pipeline state as
layout-independent entries.

Keys on disk (tensors are `Boxes` of canonical tensors, see `layout.py`):

    model/<name>                 parameters and buffers, in the training dtype
    optim/exp_avg/<name>         Adam's first moment (fp32), per parameter
    optim/exp_avg_sq/<name>      Adam's second moment (fp32), per parameter
    optim/master/<name>          fp32 master weights, when they differ from the parameters (bf16/fp16 O2)
    rng/pp<p>_tp<t>_dp<d>        one rank's Python, NumPy, torch CPU/CUDA and megatron tracker states
    data/dp<d>                   one data-parallel replica's pipeline position (saved by the first
                                 pipeline stage, restored into every stage that reads data)
    extra/<name>/<key>           a family's extra state (`TrainingParts.extra_state`): `Boxes` of a
                                 canonical tensor (e.g. per-sample state sharded over DP) or objects

Both optimizers (the replicated torch AdamW and the flat ZeRO-1 `FlatAdamW`) export and import the
same per-parameter tensors, so a checkpoint moves between them and between DP sizes; scalars (Adam's
step, loss scaler, LR schedule, trainer counters) go to `meta.json`.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from engine.checkpoint.layout import (
    TensorSpec,
    clip_box,
    param_specs,
    tensor_specs,
)
from engine.checkpoint.storage import Boxes, CheckpointError

MODEL, EXP_AVG, EXP_AVG_SQ, MASTER = "model/", "optim/exp_avg/", "optim/exp_avg_sq/", "optim/master/"
EXTRA = "extra/"
OPTIM_KINDS = {"exp_avg": EXP_AVG, "exp_avg_sq": EXP_AVG_SQ, "master": MASTER}


@dataclass(frozen=True)
class Placement:
    """This rank's coordinates in the parallel layout."""

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1

    @classmethod
    def from_ctx(cls, ctx) -> Placement:
        d = ctx.dims
        return cls(ctx.tp_rank, d.tp, ctx.pp_rank, d.pp, ctx.dp_rank, d.dp)

    @property
    def rng_key(self) -> str:
        return f"rng/pp{self.pp_rank}_tp{self.tp_rank}_dp{self.dp_rank}"

    @property
    def data_key(self) -> str:
        return f"data/dp{self.dp_rank}"

    def layout(self) -> dict:
        return {"tensor_model_parallel_size": self.tp_size, "pipeline_model_parallel_size": self.pp_size,
                "data_parallel_size": self.dp_size}


def _describe(spec: TensorSpec, dtype: torch.dtype) -> dict:
    return {**spec.describe(), "dtype": str(dtype).replace("torch.", "")}


# -- save ----------------------------------------------------------------------------------------------
def model_entries(model: torch.nn.Module, place: Placement) -> tuple[dict, dict]:
    """{key: Boxes} of this rank's model tensors (views of the live tensors) and {key: description}."""
    entries, table = {}, {}
    for local, tensor in model.state_dict(keep_vars=True).items():
        if not torch.is_tensor(tensor):
            continue
        spec = tensor_specs_cache(model, place)[local]
        entries[MODEL + spec.name] = Boxes(spec.global_shape, spec.boxes(tensor.detach()))
        table[MODEL + spec.name] = _describe(spec, tensor.dtype)
    return entries, table


def extra_state_keys(model: torch.nn.Module, place: Placement) -> list[str]:
    """Canonical names of non-tensor state-dict entries (megatron's `_extra_state`, None without TE)."""
    from parallel.pp_sharding import global_name, layer_offsets

    offsets = layer_offsets(model)
    return [global_name(k, offsets) for k, v in model.state_dict().items() if not torch.is_tensor(v)]


def tensor_specs_cache(model: torch.nn.Module, place: Placement) -> dict[str, TensorSpec]:
    cached = getattr(model, "_checkpoint_specs", None)
    if cached is None or cached[0] != place:
        cached = (place, tensor_specs(model, place.tp_rank, place.tp_size))
        model._checkpoint_specs = cached
    return cached[1]


def optimizer_slices(optimizer) -> list:
    if not hasattr(optimizer, "checkpoint_slices"):
        raise CheckpointError(f"{type(optimizer).__name__} cannot be checkpointed (no checkpoint_slices)")
    return optimizer.checkpoint_slices()


def optimizer_entries(optimizer, model: torch.nn.Module, place: Placement) -> tuple[dict, dict]:
    """Boxes of Adam moments (and separate master weights) for the parameter elements this rank owns."""
    specs = param_specs(model, place.tp_rank, place.tp_size)
    by_param = {id(p): specs[name] for name, p in model.named_parameters()}
    pieces: dict[str, list] = {}
    shapes, table = {}, {}
    for param, first, views in optimizer_slices(optimizer):
        spec = by_param[id(param)]
        numel = next(iter(views.values())).numel()
        for kind, flat in views.items():
            key = OPTIM_KINDS[kind] + spec.name
            shapes[key] = spec.global_shape
            table[key] = _describe(spec, flat.dtype)
            for off, sizes, start in spec.flat_boxes(tuple(param.shape), first, first + numel):
                piece = flat[start:start + math.prod(sizes)].view(sizes)
                pieces.setdefault(key, []).append((off, piece))
    return {key: Boxes(shapes[key], boxes) for key, boxes in pieces.items()}, table


def capture_rng() -> dict:
    from parallel.random import get_rng_state

    return copy.deepcopy(get_rng_state())


def stage(entries: dict) -> dict:
    """A copy of every tensor and object (for an asynchronous save: training may go on)."""
    out = {}
    for key, value in entries.items():
        if isinstance(value, Boxes):
            out[key] = Boxes(value.global_shape, [(off, t.detach().to("cpu", copy=True)) for off, t in value.boxes])
        else:
            out[key] = copy.deepcopy(value)
    return out


def to_cpu(entries: dict) -> dict:
    """GPU tensors are written from host copies (DCP's writer wants CPU tensors)."""
    out = {}
    for key, value in entries.items():
        if isinstance(value, Boxes) and any(t.device.type != "cpu" for _, t in value.boxes):
            value = Boxes(value.global_shape, [(off, t.detach().cpu()) for off, t in value.boxes])
        out[key] = value
    return out


# -- load ----------------------------------------------------------------------------------------------
class LoadTarget:
    """Destinations for one rank's share of a checkpoint. Boxes read into CPU buffers when the live
    tensor is elsewhere (GPU) or of another dtype, and are copied in by `finish`."""

    def __init__(self, saved: dict):
        self.saved = saved  # key -> description (meta.json "tensors")
        self.entries: dict = {}
        self._copies: list = []  # (buffer, live tensor)

    def add(self, key: str, spec: TensorSpec, boxes: list) -> None:
        """`boxes`: [(global offsets, live destination tensor)] of canonical tensor `key`."""
        info = self.saved.get(key)
        if info is None:
            raise CheckpointError(f"{key}: not in the checkpoint")
        saved_shape = tuple(info["shape"])
        if saved_shape != tuple(spec.global_shape):
            differs = [d for d, (a, b) in enumerate(zip(saved_shape, spec.global_shape)) if a != b]
            if not (spec.padded and len(saved_shape) == len(spec.global_shape) and differs == [spec.partition_dim]):
                raise CheckpointError(f"{key}: shape {saved_shape} in the checkpoint, {tuple(spec.global_shape)} "
                                      "in this model (a different model config?)")
        out = []
        for off, live in boxes:
            if saved_shape != tuple(spec.global_shape):  # vocab padding of another TP size
                live.zero_()
                clipped = clip_box(off, live, saved_shape)
                if clipped is None:
                    continue
                off, live = clipped
            target = live
            if live.device.type != "cpu" or not live.is_contiguous():
                target = torch.empty(live.shape, dtype=live.dtype, device="cpu")
                self._copies.append((target, live))
            out.append((off, target))
        if out:
            self.entries[key] = Boxes(saved_shape, out)

    def add_object(self, key: str) -> None:
        self.entries[key] = None

    def finish(self) -> None:
        for buffer, live in self._copies:
            live.copy_(buffer)


def add_model(target: LoadTarget, model: torch.nn.Module, place: Placement, prefer_master: bool) -> list[str]:
    """Model tensors into `target`; fp32 parameters read the fp32 master copy when the checkpoint has
    one (bf16/fp16 O2 runs), which is what training continues from. Returns the canonical names."""
    names = []
    with torch.no_grad():
        for local, tensor in model.state_dict(keep_vars=True).items():
            if not torch.is_tensor(tensor):
                continue
            spec = tensor_specs_cache(model, place)[local]
            key = MODEL + spec.name
            if prefer_master and tensor.dtype == torch.float32 and MASTER + spec.name in target.saved:
                key = MASTER + spec.name
            target.add(key, spec, spec.boxes(tensor.detach()))
            names.append(spec.name)
    return names


def add_optimizer(target: LoadTarget, optimizer, model: torch.nn.Module, place: Placement) -> dict:
    """Optimizer moments (and master weights when this optimizer keeps a separate copy and the
    checkpoint has one) into `target`. Returns {"master": loaded?}."""
    specs = param_specs(model, place.tp_rank, place.tp_size)
    by_param = {id(p): specs[name] for name, p in model.named_parameters()}
    pieces: dict[str, tuple] = {}
    for param, first, views in optimizer_slices(optimizer):
        spec = by_param[id(param)]
        numel = next(iter(views.values())).numel()
        for kind, flat in views.items():
            key = OPTIM_KINDS[kind] + spec.name
            if kind == "master" and key not in target.saved:
                continue  # taken from the parameters after loading
            boxes = [(off, flat[start:start + math.prod(sizes)].view(sizes))
                     for off, sizes, start in spec.flat_boxes(tuple(param.shape), first, first + numel)]
            pieces.setdefault(key, (spec, []))[1].extend(boxes)
    for key, (spec, boxes) in pieces.items():
        target.add(key, spec, boxes)
    return {"master": any(k.startswith(MASTER) for k in pieces)}


def restore_rng(state: dict) -> None:
    from parallel.random import set_rng_state

    set_rng_state(state)


# -- a family's extra state -------------------------------------------------------------------------
def _extra_items(extra_state: dict):
    for name, obj in sorted(extra_state.items()):
        state = obj.state_dict()
        if not isinstance(state, dict):
            raise CheckpointError(f"extra state {name!r}: state_dict() must return a dict, got {type(state).__name__}")
        for key, value in state.items():
            yield name, key, f"{EXTRA}{name}/{key}", value


def extra_entries(extra_state: dict) -> tuple[dict, dict]:
    """{key: Boxes | object} and {key: description} of the family's extra state on this rank."""
    entries, table = {}, {}
    for _, _, key, value in _extra_items(extra_state):
        entries[key] = value
        if isinstance(value, Boxes):
            dtype = value.boxes[0][1].dtype if value.boxes else torch.float32
            table[key] = {"shape": list(value.global_shape), "partition_dim": None, "padded": False,
                          "dtype": str(dtype).replace("torch.", "")}
    return entries, table


def add_extra(target: LoadTarget, extra_state: dict, meta: dict) -> dict:
    """Destinations for the extra state this rank holds: Boxes are read in place (into the views its
    state_dict() returned), objects by key. Returns the plan `finish_extra` hands back."""
    plan: dict = {}
    objects = set(meta.get("objects", []))
    for name, key, full, value in _extra_items(extra_state):
        if isinstance(value, Boxes):
            spec = TensorSpec(full, tuple(value.global_shape), (0,) * len(value.global_shape), None, False)
            target.add(full, spec, list(value.boxes))
        elif full in objects:
            target.add_object(full)
        else:
            raise CheckpointError(f"{full}: not in the checkpoint (saved without extra state {name!r}?)")
        plan.setdefault(name, (extra_state[name], {}))[1][key] = (full, value)
    return plan


def finish_extra(plan: dict, target: LoadTarget) -> None:
    """After the read: give each extra-state object its entries (Boxes: the views now holding the
    loaded values; objects: what was read)."""
    for obj, keys in plan.values():
        obj.load_state_dict({key: value if isinstance(value, Boxes) else target.entries[full]
                             for key, (full, value) in keys.items()})
