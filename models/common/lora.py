"""LoRA on megatron-core's tensor-parallel linears (column- and row-parallel), for every family.

W x + (alpha / rank) * B A dropout(x), with B initialised to zero (the base model's output is
unchanged until B trains) and A Kaiming-uniform (PEFT's choice). Adapters attach to the existing
linear through a forward hook, so the base weights keep their names: `...linear_qkv.weight` stays
`...linear_qkv.weight` and a base checkpoint loads into a LoRA model with no key map; the adapters
are `<linear>.lora.<slice>.lora_A` / `.lora_B`.

Tensor parallelism, split the way the base weight is (as Megatron-Bridge's `ParallelLinearAdapter`
does for column- and row-parallel bases, `src/megatron/bridge/peft/utils.py`):

| base | W on a TP rank | A | B | forward of the adapter |
|---|---|---|---|---|
| column-parallel | [out/tp, in] | [r, in], replicated | [out/tp, r], split on dim 0 | x (SP: gathered) -> A -> copy-to-TP (all-reduce in backward) -> B |
| row-parallel | [out, in/tp] | [r, in/tp], split on dim 1 | [out, r], replicated | x_local -> A -> all-reduce -> B (SP: this rank's sequence chunk) |

Every adapter gradient is complete on every rank (replicated A or B get identical gradients), so
nothing more needs syncing than the base model already does.

Megatron's fused `linear_qkv` holds, per query group, that group's query heads then one key and
one value head ([q1 q2 k1 v1 | q3 q4 k2 v2 | ...], see `SelfAttention.get_query_key_value_tensors`).
Targets `query`, `key`, `value` put one adapter on those rows only (PEFT's q_proj / v_proj on an
unfused model): B holds the target's rows of every group, group-major, so its TP split follows the
base's (whole groups per rank).

Targets: query, key, value (slices of linear_qkv), qkv (all of it), proj (attention output), fc1,
fc2 (MLP); Hugging Face / open_clip names are aliases: q_proj, k_proj, v_proj, out_proj, c_fc,
c_proj, and the megatron names linear_qkv, linear_proj, linear_fc1, linear_fc2.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.core.transformer.attention import Attention

TARGETS = ("query", "key", "value", "qkv", "proj", "fc1", "fc2")
ALIASES = {
    "q_proj": "query", "k_proj": "key", "v_proj": "value", "out_proj": "proj", "c_fc": "fc1", "c_proj": "fc2",
    "linear_qkv": "qkv", "linear_proj": "proj", "linear_fc1": "fc1", "linear_fc2": "fc2",
}
_QKV_SLICES = ("query", "key", "value")
_MODULE_OF = {"qkv": "linear_qkv", "proj": "linear_proj", "fc1": "linear_fc1", "fc2": "linear_fc2"}


@dataclass
class LoRAConfig:
    """LoRA settings (the seed's defaults: rank 16, alpha 32, dropout 0.05, q_proj and v_proj)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list = field(default_factory=lambda: ["query", "value"])

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def resolve_targets(names) -> list[str]:
    """Canonical target names; an unknown one is an error naming the closest."""
    out = []
    for name in names:
        canonical = ALIASES.get(name, name)
        if canonical not in TARGETS:
            close = difflib.get_close_matches(name, list(TARGETS) + list(ALIASES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"LoRA target {name!r} is not one of {', '.join(TARGETS)} or their aliases "
                             f"{', '.join(ALIASES)}{hint}")
        if canonical not in out:
            out.append(canonical)
    if "qkv" in out and any(t in out for t in _QKV_SLICES):
        raise ValueError("LoRA target qkv (all of linear_qkv) overlaps query/key/value; choose one or the other")
    return out


class LoRAAdapter(torch.nn.Module):
    """One low-rank update, lora_B @ lora_A, on a linear (or a slice of its output rows)."""

    def __init__(self, in_features: int, out_features: int, rank: int, dtype, device=None):
        super().__init__()
        self.lora_A = torch.nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))


def _mark_split(param: torch.nn.Parameter, dim: int) -> None:
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1


class _QKVLayout:
    """Rows of linear_qkv's local output: per local query group, q heads then k then v."""

    def __init__(self, attention: Attention):
        if attention.config.num_query_groups < attention.world_size:
            raise NotImplementedError("LoRA on query/key/value slices needs num_query_groups >= TP size")
        self.groups = attention.num_query_groups_per_partition
        head = attention.hidden_size_per_attention_head
        q_heads = attention.num_attention_heads_per_partition // self.groups
        self.width = (q_heads + 2) * head
        self.slices = {"query": (0, q_heads * head), "key": (q_heads * head, head), "value": ((q_heads + 1) * head, head)}


def _lora_linears(module: torch.nn.Module):
    return [(n, m) for n, m in module.named_modules() if isinstance(getattr(m, "lora", None), torch.nn.ModuleDict)]


def apply_lora(model: torch.nn.Module, cfg: LoRAConfig, include=None) -> list[str]:
    """Attach adapters for `cfg.target_modules` to every matching linear under `model`.

    `include`: name prefixes to limit it to (e.g. ["visual."] for the image tower). Returns the
    names of the adapted linears. Call after the base weights are loaded or before; B = 0 either way.
    """
    if cfg.rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {cfg.rank}")
    targets = resolve_targets(cfg.target_modules)
    te = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith("TE") and "Linear" in type(m).__name__})
    if te:
        raise NotImplementedError(f"LoRA attaches to megatron-core's local linears; this model has Transformer Engine "
                                  f"ones ({', '.join(te)}): use attention_backend=sdpa or flash for LoRA fine-tuning")
    slices = [t for t in targets if t in _QKV_SLICES]
    whole = {_MODULE_OF[t] for t in targets if t in _MODULE_OF}
    adapted = []
    for name, module in model.named_modules():
        if include is not None and not any(name.startswith(p) for p in include):
            continue
        if slices and isinstance(module, Attention):
            qkv = getattr(module, "linear_qkv", None)
            if isinstance(qkv, ColumnParallelLinear):
                _attach(qkv, cfg, slices, _QKVLayout(module))
                adapted.append(f"{name}.linear_qkv")
        leaf = name.rsplit(".", 1)[-1]
        if leaf in whole and isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            _attach(module, cfg, ["all"], None)
            adapted.append(name)
    if not adapted:
        raise ValueError(f"LoRA targets {cfg.target_modules} matched no tensor-parallel linear"
                         + (f" under {include}" if include else ""))
    return adapted


def _attach(linear, cfg: LoRAConfig, slices: list[str], layout: _QKVLayout | None) -> None:
    if getattr(linear, "lora", None) is not None:
        raise ValueError(f"{type(linear).__name__} already has LoRA adapters")
    dtype, device = linear.weight.dtype, linear.weight.device
    adapters = torch.nn.ModuleDict()
    column = isinstance(linear, ColumnParallelLinear)
    for name in slices:
        if column:
            rows = linear.output_size_per_partition if name == "all" else layout.groups * layout.slices[name][1]
            adapter = LoRAAdapter(linear.input_size, rows, cfg.rank, dtype, device)
            _mark_split(adapter.lora_B, 0)
            # A is replicated over TP: every rank must start from the same A.
            _broadcast_over_tp(adapter.lora_A)
        else:
            adapter = LoRAAdapter(linear.input_size_per_partition, linear.output_size, cfg.rank, dtype, device)
            _mark_split(adapter.lora_A, 1)
        adapters[name] = adapter
    linear.lora = adapters
    linear.lora_scaling = cfg.scaling
    linear.lora_dropout = float(cfg.dropout)
    linear.lora_layout = layout
    linear.lora_merged = False
    linear.lora_hook = linear.register_forward_hook(_lora_hook, with_kwargs=True)


def _broadcast_over_tp(tensor: torch.Tensor) -> None:
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        group = parallel_state.get_tensor_model_parallel_group()
        src = torch.distributed.get_global_rank(group, 0)
        with torch.no_grad():
            torch.distributed.broadcast(tensor, src=src, group=group)


def _lora_hook(linear, args, kwargs, output):
    if linear.lora_merged:
        return output
    x = args[0] if args else kwargs["input_"]
    out, bias = output
    delta = _column_delta(linear, x) if isinstance(linear, ColumnParallelLinear) else _row_delta(linear, x)
    return out + delta.to(out.dtype), bias


def _dropout(linear, x):
    """PEFT's dropout on the adapter's input, following the linear's train/eval mode."""
    if linear.lora_dropout <= 0 or not linear.training:
        return x
    return torch.nn.functional.dropout(x, linear.lora_dropout, training=True)


def _column_delta(linear, x):
    if linear.sequence_parallel:
        # The replicated path sees the whole sequence; its input gradient is complete on every
        # rank, so backward keeps this rank's chunk (no reduce-scatter).
        x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=linear.tp_group)
    pieces = {}
    for name, adapter in linear.lora.items():
        h = _dropout(linear, x) @ adapter.lora_A.T
        h = copy_to_tensor_model_parallel_region(h, group=linear.tp_group)  # B's partial gradients summed
        pieces[name] = (h @ adapter.lora_B.T) * linear.lora_scaling
    if "all" in pieces:
        delta = pieces["all"]
    else:
        layout = linear.lora_layout
        lead = x.shape[:-1]
        parts = []
        for name in _QKV_SLICES:
            rows = layout.slices[name][1]
            if name in pieces:
                parts.append(pieces[name].view(*lead, layout.groups, rows))
            else:
                parts.append(x.new_zeros(*lead, layout.groups, rows))
        delta = torch.cat(parts, dim=-1).view(*lead, layout.groups * layout.width)
    if linear.gather_output:
        delta = gather_from_tensor_model_parallel_region(delta, group=linear.tp_group)
    return delta


def _row_delta(linear, x):
    if not linear.input_is_parallel:
        x = scatter_to_tensor_model_parallel_region(x, group=linear.tp_group)
    tp = linear.tp_group.size()
    delta = 0
    for adapter in linear.lora.values():
        if tp > 1 and linear.training and linear.lora_dropout > 0:
            with mcore_random.get_cuda_rng_tracker().fork():  # split activations: a mask per TP rank
                dropped = _dropout(linear, x)
        else:
            dropped = _dropout(linear, x)
        h = reduce_from_tensor_model_parallel_region(dropped @ adapter.lora_A.T, group=linear.tp_group)
        delta = delta + (h @ adapter.lora_B.T) * linear.lora_scaling
    if linear.sequence_parallel:
        delta = scatter_to_sequence_parallel_region(delta, group=linear.tp_group)
    return delta


# ---- merge, export, load ------------------------------------------------------------------------

def _weight_delta(linear, name: str, adapter: LoRAAdapter) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B A * scaling, the row index it adds to, or None for all rows) on this rank."""
    delta = (adapter.lora_B.float() @ adapter.lora_A.float()) * linear.lora_scaling
    if name == "all":
        return delta, None
    layout = linear.lora_layout
    start, rows = layout.slices[name]
    base = torch.arange(layout.groups, device=delta.device)[:, None] * layout.width + start
    index = (base + torch.arange(rows, device=delta.device)).reshape(-1)
    return delta, index


@torch.no_grad()
def merge_lora_(model: torch.nn.Module) -> None:
    """W += scaling * B A in place; the adapters stay (and are skipped) until `unmerge_lora_`."""
    for _, linear in _lora_linears(model):
        if linear.lora_merged:
            continue
        for name, adapter in linear.lora.items():
            delta, index = _weight_delta(linear, name, adapter)
            _add_rows(linear.weight, delta, index, 1.0)
        linear.lora_merged = True


@torch.no_grad()
def unmerge_lora_(model: torch.nn.Module) -> None:
    for _, linear in _lora_linears(model):
        if not linear.lora_merged:
            continue
        for name, adapter in linear.lora.items():
            delta, index = _weight_delta(linear, name, adapter)
            _add_rows(linear.weight, delta, index, -1.0)
        linear.lora_merged = False


def _add_rows(weight, delta, index, sign: float) -> None:
    if index is None:
        weight.add_((sign * delta).to(weight.dtype))
    else:
        weight.index_add_(0, index, (sign * delta).to(weight.dtype))


def is_lora_key(key: str) -> bool:
    return key.startswith("lora.") or ".lora." in key


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict:
    """The base model's state dict (this rank's shards) with every adapter folded into its weight.

    Nothing in the model changes; the keys are the base model's, so the usual exporters apply.
    """
    state = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
             for k, v in model.state_dict().items() if not is_lora_key(k)}
    for prefix, linear in _lora_linears(model):
        if linear.lora_merged:
            continue  # already in the weight
        key = f"{prefix}.weight" if prefix else "weight"
        for name, adapter in linear.lora.items():
            delta, index = _weight_delta(linear, name, adapter)
            weight = state[key]
            if index is None:
                state[key] = weight + delta.to(weight.dtype)
            else:
                state[key] = weight.index_add(0, index, delta.to(weight.dtype))
    return state


def lora_state_dict(model: torch.nn.Module) -> dict:
    """Adapters only (this rank's shards), to save them apart from the base weights."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if is_lora_key(k)}


def load_lora_state_dict(model: torch.nn.Module, state: dict) -> None:
    own = {k for k in model.state_dict() if is_lora_key(k)}
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise KeyError(f"LoRA adapters do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)


def load_base_state_dict(model: torch.nn.Module, state: dict) -> None:
    """Load base weights (a checkpoint of the model without LoRA) into a LoRA model; strict for
    every base key, the adapters keep their initialisation."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not is_lora_key(k)]
    if missing or result.unexpected_keys:
        raise KeyError(f"base weights do not match the model: missing {missing[:5]}, "
                       f"unexpected {list(result.unexpected_keys)[:5]}")


def remove_lora_(model: torch.nn.Module, merge: bool = True) -> None:
    """Fold the adapters into the weights (unless merge=False) and detach them: a plain model."""
    if merge:
        merge_lora_(model)
    for _, linear in _lora_linears(model):
        if not merge and linear.lora_merged:
            unmerge_lora_(linear)
        linear.lora_hook.remove()
        for attr in ("lora", "lora_scaling", "lora_dropout", "lora_layout", "lora_merged", "lora_hook"):
            delattr(linear, attr)


# ---- trainable parameters ------------------------------------------------------------------------

def set_trainable_(model: torch.nn.Module, trainable) -> None:
    """requires_grad = trainable(name, param) for every parameter."""
    for name, param in model.named_parameters():
        param.requires_grad_(bool(trainable(name, param)))


def count_parameters(model: torch.nn.Module, tp_size: int | None = None) -> tuple[int, int]:
    """(trainable, total) parameters of the whole model at TP=1 (TP-split ones counted tp times;
    a padded vocabulary counts its padding)."""
    if tp_size is None:
        tp_size = parallel_state.get_tensor_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    trainable = total = 0
    for param in model.parameters():
        n = param.numel() * (tp_size if getattr(param, "tensor_model_parallel", False) else 1)
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total
