"""Checkpoint tools that run in one process, without a training job: model-only checkpoints from a
full (TP=1/PP=1) state dict and back, `inspect`, and offline `reshard` (TP/PP and dtype).

    python -m engine.checkpoint.tools inspect runs/clip/checkpoints            # the latest one
    python -m engine.checkpoint.tools reshard SRC DST --tp 4 --pp 1 --dtype bf16

None of them needs torch.distributed: where megatron-core needs its parallel state (to build a
model on the meta device and read its tensor-parallel attributes) a one-rank gloo group is set up
and torn down again. Outputs are written to a temporary sibling and renamed, and an existing output
is never overwritten, so bad input cannot damage what was saved.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time

import torch
import torch.distributed as dist

from engine.checkpoint import storage
from engine.checkpoint.layout import TensorSpec, tensor_specs
from engine.checkpoint.reader import CheckpointReader
from engine.checkpoint.state import EXP_AVG, MASTER, MODEL, Placement
from engine.checkpoint.storage import Boxes, CheckpointError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


# -- helpers ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def single_process_parallel_state():
    """megatron-core's parallel state at TP=1/PP=1 for building reference models; a one-rank gloo
    group is created (and destroyed after) only when torch.distributed is not initialised."""
    from megatron.core import parallel_state

    from parallel.cpu_shims import apply_cpu_shims
    from parallel.random import get_rng_state, seed_everything, set_rng_state

    created_pg = created_mp = False
    if not dist.is_initialized():
        apply_cpu_shims()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        created_pg = True
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
        created_mp = True
        rng = get_rng_state() if not created_pg else None
        seed_everything(0)
        if rng is not None:
            set_rng_state(rng)
    elif parallel_state.get_tensor_model_parallel_world_size() != 1 or \
            parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise RuntimeError("checkpoint tools build TP=1/PP=1 reference models: call them from a single process")
    try:
        yield
    finally:
        if created_mp:
            parallel_state.destroy_model_parallel()
        if created_pg:
            dist.destroy_process_group()


def checkpoint_family(meta: dict):
    """The model family that wrote a checkpoint (checkpoints from before families were CLIP's)."""
    from engine.family import get_family

    return get_family(meta.get("family", "clip"))


def reference_specs(family, model_cfg) -> tuple[dict[str, TensorSpec], list[str], dict]:
    """TP=1/PP=1 layout of `family`'s model for `model_cfg` without allocating it: {state-dict
    key: spec}, the non-tensor (extra state) keys, and {key: dtype}."""
    with single_process_parallel_state(), torch.device("meta"):
        model = family.reference_model(model_cfg)
    specs = tensor_specs(model, 0, 1)
    state = model.state_dict()
    extra = [k for k, v in state.items() if not torch.is_tensor(v)]
    return specs, extra, {k: v.dtype for k, v in state.items() if torch.is_tensor(v)}


def _resize(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if tensor.shape[dim] == size:
        return tensor
    if tensor.shape[dim] > size:
        return tensor.narrow(dim, 0, size)
    pad = list(tensor.shape)
    pad[dim] = size - tensor.shape[dim]
    return torch.cat([tensor, tensor.new_zeros(pad)], dim=dim)


def config_from_yaml(text: str, family):
    """A checkpoint's saved config (meta.json's `config_yaml`) typed by `family`'s schema."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(family.config_cls), OmegaConf.create(text)))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"the checkpoint's config does not fit this engine's schema: {exc}") from exc


def saved_experiment(path: str, family: str | None = None, verify: bool = True):
    """(resolved checkpoint directory, the experiment config it was written with) of a checkpoint or
    checkpoint root. `family`: the family it must come from (a CheckpointError naming both if not).
    `verify`: check the files' sizes and checksums first (CheckpointReader)."""
    reader = CheckpointReader(path, verify=verify)
    written_by = checkpoint_family(reader.meta)
    if family is not None and written_by.name != family:
        raise CheckpointError(f"{reader.path} is a {written_by.name!r} checkpoint, not a {family!r} one")
    return reader.path, config_from_yaml(reader.meta["config_yaml"], written_by)


def _new_output(out_dir: str) -> str:
    """A fresh temporary sibling of `out_dir`; refuses to touch an existing `out_dir`."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} exists; choose a new directory (nothing was written)")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def _finish_output(tmp: str, out_dir: str, meta: dict) -> str:
    storage.write_json_atomic(os.path.join(tmp, storage.META_FILE), meta)
    names = sorted(n for n in os.listdir(tmp) if n.endswith(".distcp")) + [storage.META_FILE, storage.DCP_METADATA]
    storage.write_json_atomic(os.path.join(tmp, storage.MARKER_FILE),
                              {"format": storage.FORMAT, "step": meta["step"],
                               "files": storage.describe_files(tmp, names)})
    storage.fsync_dir(tmp)
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty (checked before writing)
    os.rename(tmp, out_dir)
    storage.fsync_dir(os.path.dirname(out_dir))
    return out_dir


def _write_dcp(path: str, entries: dict) -> None:
    """One process writes every entry (no collectives, even inside a distributed job)."""
    import torch.distributed.checkpoint as dcp

    writer = dcp.FileSystemWriter(path, single_file_per_rank=True, sync_files=True, thread_count=1, overwrite=False)
    dcp.save(entries, storage_writer=writer, planner=storage._SavePlanner(), no_dist=True)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# -- model-only checkpoints ------------------------------------------------------------------------
def write_model_checkpoint(out_dir: str, cfg, full_state_dict: dict) -> str:
    """Write `full_state_dict` (the TP=1/PP=1 model's state dict for `cfg.model`; `cfg` is a
    registered family's experiment config) as a model-only checkpoint directory `out_dir` (must not
    exist or be empty). `checkpoint.resume=<out_dir>` then starts training from these weights at any
    layout (fresh optimizer, step 0). Returns the path."""
    from engine.config import to_yaml
    from engine.family import family_of_config

    family = family_of_config(cfg)
    specs, extra, _ = reference_specs(family, cfg.model)
    tensors = {k: v for k, v in full_state_dict.items() if torch.is_tensor(v)}
    missing = sorted(set(specs) - set(tensors))
    unexpected = sorted(k for k in tensors if k not in specs)
    if missing or unexpected:
        raise KeyError(f"state dict does not fit model config: missing {missing[:8]}, unexpected {unexpected[:8]}")
    entries, table = {}, {}
    for key, tensor in tensors.items():
        spec = specs[key]
        if spec.padded:  # vocab rows: pad or trim to this config's TP=1 padding
            tensor = _resize(tensor, spec.partition_dim or 0, spec.global_shape[spec.partition_dim or 0])
        if tuple(tensor.shape) != tuple(spec.global_shape):
            raise ValueError(f"{key}: shape {tuple(tensor.shape)} does not fit {tuple(spec.global_shape)}")
        tensor = tensor.detach().to("cpu").contiguous()
        entries[MODEL + spec.name] = Boxes(spec.global_shape, [((0,) * tensor.dim(), tensor)])
        table[MODEL + spec.name] = {**spec.describe(), "dtype": _dtype_name(tensor.dtype)}
    tmp = _new_output(out_dir)
    try:
        _write_dcp(tmp, entries)
        meta = {"format": storage.FORMAT, "version": storage.FORMAT_VERSION, "family": family.name, "step": 0,
                "samples_seen": 0,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reason": "write_model_checkpoint",
                "torch": torch.__version__, "layout": {**Placement().layout(), "world_size": 1},
                "contents": ["model"], "tensors": dict(sorted(table.items())), "extra_state_keys": sorted(extra),
                "objects": [], "config_yaml": to_yaml(cfg)}
        return _finish_output(tmp, out_dir, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_model_checkpoint(path: str) -> tuple:
    """(cfg, full_state_dict): the checkpoint's experiment config (of the family that wrote it) and
    the TP=1/PP=1 model's state dict (vocab padding as at TP=1, megatron's `_extra_state` keys as None)."""
    reader = CheckpointReader(path)
    family = checkpoint_family(reader.meta)
    cfg = config_from_yaml(reader.meta["config_yaml"], family)
    full = {}
    for key in reader.keys(MODEL):
        name, info = key[len(MODEL):], reader.tensors[key]
        tensor = reader.read_tensor(key)
        if info.get("padded"):
            dim = info["partition_dim"] or 0
            tensor = _resize(tensor, dim, family.vocab_rows(cfg.model, 1))
        full[name] = tensor
    for key in reader.meta.get("extra_state_keys", []):
        full[key] = None
    return cfg, full


# -- inspect -----------------------------------------------------------------------------------------
def inspect_checkpoint(path: str) -> str:
    """A readable summary: state, config, layout, step, every tensor's shape -- reading only the
    checkpoint's descriptions, not its data."""
    from engine.checkpoint.manager import resolve_checkpoint

    path = resolve_checkpoint(path)
    meta = storage.read_json(os.path.join(path, storage.META_FILE), "checkpoint description")
    dcp_md = storage.read_dcp_metadata(path)
    marker = storage.read_json(os.path.join(path, storage.MARKER_FILE), "completion marker")
    problems = storage.verify_files(path, checksums=False)
    size = sum(info["size"] for info in marker["files"].values())
    lay = meta["layout"]
    lines = [
        f"checkpoint {path}",
        f"  state: {'complete' if not problems else 'DAMAGED: ' + '; '.join(problems)}, {len(marker['files'])} files, "
        f"{size / 2**20:.1f} MB (sizes checked, checksums not read)",
        f"  format: {meta['format']} v{meta['version']}, saved {meta.get('saved_at')} ({meta.get('reason')}), "
        f"torch {meta.get('torch')}",
        f"  step {meta['step']}, samples seen {meta['samples_seen']}",
        f"  layout at save: TP={lay['tensor_model_parallel_size']} PP={lay['pipeline_model_parallel_size']} "
        f"DP={lay['data_parallel_size']} (world {lay.get('world_size')}); loads at any layout",
        f"  contents: {', '.join(meta['contents'])}",
    ]
    if "optimizer" in meta["contents"]:
        opt = meta["optimizer"]
        lines.append(f"  optimizer: {opt['type']} (optim.name={opt['name']}), Adam step {opt['step']}, "
                     f"loss scaler {opt['loss_scaler']}")
    if "scheduler" in meta["contents"]:
        lines.append(f"  scheduler: {meta['scheduler']}")
    if meta.get("objects"):
        lines.append(f"  objects: {', '.join(meta['objects'])}")
    numel = {}
    for key, info in meta["tensors"].items():
        count = 1
        for s in info["shape"]:
            count *= s
        numel[key] = count
    groups = {}
    for key in meta["tensors"]:
        groups.setdefault(key.split("/")[0] if not key.startswith("optim/") else "/".join(key.split("/")[:2]), []).append(key)
    lines.append(f"  tensors: {len(meta['tensors'])}, " + ", ".join(
        f"{g} {len(keys)} ({sum(numel[k] for k in keys) / 1e6:.2f}M elements)" for g, keys in sorted(groups.items())))
    width = max((len(k) for k in meta["tensors"]), default=10)
    for key, info in meta["tensors"].items():
        md = dcp_md.state_dict_metadata.get(key)
        chunks = len(md.chunks) if md is not None else 0
        split = "replicated" if info["partition_dim"] is None else f"TP dim {info['partition_dim']}" + (
            " (vocab padded)" if info.get("padded") else "")
        lines.append(f"    {key:<{width}}  {info['dtype']:<9} {str(tuple(info['shape'])):<16} {split}, {chunks} chunk(s)")
    lines.append("  config:")
    lines.extend("    " + line for line in meta["config_yaml"].rstrip().splitlines())
    return "\n".join(lines)


# -- offline re-sharding -----------------------------------------------------------------------------
class _LazyBoxes(Boxes):
    """Boxes whose data is produced when the writer asks for it (one tensor in memory at a time)."""

    def __init__(self, global_shape, boxes, produce):
        super().__init__(global_shape, boxes)
        self.produce = produce

    def find(self, offsets):
        for off, placeholder in self.boxes:
            if off == offsets:
                return self.produce(off, placeholder.shape)
        raise KeyError(offsets)


def reshard_checkpoint(src: str, dst: str, tensor_model_parallel_size: int, pipeline_model_parallel_size: int = 1,
                       dtype: str | torch.dtype | None = None) -> str:
    """Write checkpoint `src` again as `dst` (a new directory) for another TP/PP layout and dtype.

    Tensors are canonical either way (any layout loads any checkpoint); what changes is the chunking
    (one chunk per target TP rank, so each rank reads whole chunks), the vocab padding (to the
    target TP), the stored layout and `parallel.*` config, and with `dtype` the model weights' dtype
    (`trainer.precision`/`model.megatron_amp_O2` follow; narrowing from fp32 keeps the fp32 values as
    the optimizer's master weights when the checkpoint has optimizer state). Adam moments stay fp32.
    RNG states belong to the old ranks: they are dropped when TP or PP changes (the run reseeds)."""
    from omegaconf import OmegaConf

    from engine.config import to_yaml

    tp, pp = int(tensor_model_parallel_size), int(pipeline_model_parallel_size)
    target_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {', '.join(DTYPES)}")
    reader = CheckpointReader(src)
    meta = dict(reader.meta)
    family = checkpoint_family(meta)
    cfg = config_from_yaml(meta["config_yaml"], family)
    problems = family.check_layout(cfg, tp, pp)
    if problems:
        raise ValueError(f"cannot reshard to TP={tp} PP={pp}: " + "; ".join(problems))
    vocab_rows = family.vocab_rows(cfg.model, tp) if family.vocab_rows is not None else None
    old_dtype = None
    keys = list(reader.tensors)
    has_master = any(k.startswith(MASTER) for k in keys)
    add_master = (target_dtype is not None and target_dtype != torch.float32 and not has_master
                  and "optimizer" in meta["contents"])
    table, entries, cache = {}, {}, {}

    def load(key: str, source: str, cast) -> torch.Tensor:
        if cache.get("key") != key:
            cache.clear()
            tensor = reader.read_tensor(source)
            info = reader.tensors[source]
            if info.get("padded"):
                tensor = _resize(tensor, info["partition_dim"] or 0, vocab_rows)
            cache.update(key=key, tensor=tensor.to(cast) if cast is not None else tensor)
        return cache["tensor"]

    def add(key: str, source: str, cast) -> None:
        info = dict(reader.tensors[source])
        shape = list(info["shape"])
        dim = info["partition_dim"]
        if info.get("padded"):
            shape[dim or 0] = vocab_rows
        out_dtype = cast if cast is not None else getattr(torch, info["dtype"])
        boxes = []
        if dim is None or tp == 1:
            boxes.append(((0,) * len(shape), torch.empty(shape, dtype=out_dtype, device="meta")))
        else:  # one chunk per target TP rank's piece (`stride` pieces each for a strided partition)
            stride = info.get("partition_stride", 1)
            if shape[dim] % (tp * stride):
                raise ValueError(f"{key}: dim {dim} of size {shape[dim]} is not divisible by TP={tp}"
                                 + (f" x partition stride {stride}" if stride != 1 else ""))
            part = shape[dim] // (tp * stride)
            for k in range(stride):
                for r in range(tp):
                    off = tuple(k * (shape[dim] // stride) + r * part if d == dim else 0 for d in range(len(shape)))
                    size = [part if d == dim else s for d, s in enumerate(shape)]
                    boxes.append((off, torch.empty(size, dtype=out_dtype, device="meta")))

        def produce(off, size, key=key, source=source, cast=cast):
            full = load(key, source, cast)
            view = full
            for d, (o, s) in enumerate(zip(off, size)):
                view = view.narrow(d, o, s)
            return view.contiguous()

        entries[key] = _LazyBoxes(shape, boxes, produce)
        table[key] = {**info, "shape": shape, "dtype": _dtype_name(out_dtype)}

    for key in keys:
        is_model = key.startswith(MODEL)
        cast = target_dtype if is_model and target_dtype is not None else None
        if is_model and reader.tensors[key]["dtype"] != "float32":
            old_dtype = reader.tensors[key]["dtype"]
        source = key
        if cast == torch.float32 and MASTER + key[len(MODEL):] in reader.tensors:
            source = MASTER + key[len(MODEL):]  # widening: the fp32 master values, not the rounded weights
        add(key, source, cast)
        if is_model and add_master and key.replace(MODEL, EXP_AVG, 1) in reader.tensors:
            add(MASTER + key[len(MODEL):], key, torch.float32)
    same_layout = (tp == meta["layout"]["tensor_model_parallel_size"] and pp == meta["layout"]["pipeline_model_parallel_size"])
    objects = [o for o in reader.objects() if same_layout or not o.startswith("rng/")]
    for key in objects:
        entries[key] = reader.read_object(key)

    tmp = _new_output(dst)
    try:
        _write_dcp(tmp, entries)
        tree = OmegaConf.create(to_yaml(cfg))
        tree.parallel.tensor_model_parallel_size, tree.parallel.pipeline_model_parallel_size = tp, pp
        if target_dtype is not None:
            tree.trainer.precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[target_dtype]
            tree.model.megatron_amp_O2 = target_dtype != torch.float32
        meta.update(tensors=dict(sorted(table.items())), objects=objects, config_yaml=OmegaConf.to_yaml(tree),
                    saved_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    reason=f"reshard of {reader.path} (TP {meta['layout']['tensor_model_parallel_size']}->{tp}, "
                           f"PP {meta['layout']['pipeline_model_parallel_size']}->{pp}"
                           + (f", dtype {old_dtype or 'float32'}->{_dtype_name(target_dtype)}" if target_dtype else "") + ")")
        meta["layout"] = {**meta["layout"], "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}
        if not same_layout:
            meta["contents"] = [c for c in meta["contents"] if c != "rng"]
        return _finish_output(tmp, dst, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m engine.checkpoint.tools", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print a checkpoint's config, layout, step and tensor shapes")
    p.add_argument("path", help="a checkpoint directory or a checkpoint root (its latest)")
    p = sub.add_parser("reshard", help="write a checkpoint again for another TP/PP layout and dtype")
    p.add_argument("src")
    p.add_argument("dst", help="a new directory")
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            print(inspect_checkpoint(args.path))
        else:
            print(f"wrote {reshard_checkpoint(args.src, args.dst, args.tp, args.pp, args.dtype)}")
    except (CheckpointError, FileExistsError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
