"""This project's CLIP state dict layout, megatron's fused QKV, and the conversion errors.

The names and shapes here are those of `CLIPModel(cfg).state_dict()` at TP=1/PP=1 with the local
(sdpa/flash) layer spec, computed from the config alone so that conversion needs no process group
and allocates nothing (a unit test checks them against a real model).
"""
from __future__ import annotations

import copy
import math
import os
import re
from typing import Iterable, Mapping, Optional

import torch

from models.clip.config import CLIPConfig

# Per transformer layer, our parameter names (relative to `<tower>.transformer.layers.<i>.`).
LN1_W, LN1_B = "input_layernorm.weight", "input_layernorm.bias"
QKV_W, QKV_B = "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"
PROJ_W, PROJ_B = "self_attention.linear_proj.weight", "self_attention.linear_proj.bias"
LN2_W, LN2_B = "pre_mlp_layernorm.weight", "pre_mlp_layernorm.bias"
FC1_W, FC1_B = "mlp.linear_fc1.weight", "mlp.linear_fc1.bias"
FC2_W, FC2_B = "mlp.linear_fc2.weight", "mlp.linear_fc2.bias"
# megatron's linears carry an `_extra_state` entry (None without Transformer Engine).
EXTRA_STATES = ("self_attention.linear_proj._extra_state", "self_attention.linear_qkv._extra_state",
                "mlp.linear_fc1._extra_state", "mlp.linear_fc2._extra_state")

MAX_LISTED = 200  # lines per category in a mismatch error before "... and N more"
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _ranges(indices: list[int]) -> str:
    indices, parts, start = sorted(set(indices)), [], None
    for i, value in enumerate(indices):
        if start is None:
            start = value
        if i + 1 == len(indices) or indices[i + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ",".join(parts)


def compress_names(items: Iterable[tuple[str, str]]) -> list[str]:
    """Group (name, detail) pairs that differ only in a layer index: `a.layers.{0-11}.b: detail`."""
    groups: dict[tuple[str, str], list[int]] = {}
    singles = []
    for name, detail in items:
        match = _LAYER_INDEX.search(name)
        if match is None:
            singles.append(name + detail)
            continue
        pattern = name[:match.start()] + ".{}." + name[match.end():]
        groups.setdefault((pattern, detail), []).append(int(match.group(1)))
    lines = singles
    for (pattern, detail), indices in groups.items():
        label = _ranges(indices)
        lines.append(pattern.replace("{}", label if len(set(indices)) == 1 else "{" + label + "}") + detail)
    return sorted(lines)


class CheckpointMismatchError(ValueError):
    """A state dict does not match the architecture: lists missing, unexpected and mis-shaped keys."""

    def __init__(self, what: str, missing: Iterable[str] = (), unexpected: Iterable[str] = (),
                 mismatched: Iterable[tuple] = (), hint: str = ""):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)  # (name, found shape, expected shape)
        lines = [f"{what} does not match the architecture: {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected, {len(self.mismatched)} shape mismatches"]
        for title, pairs in (("missing keys", [(n, "") for n in self.missing]),
                             ("unexpected keys", [(n, "") for n in self.unexpected]),
                             ("shape mismatches", [(n, f": found {tuple(f)}, expected {tuple(e)}")
                                                   for n, f, e in self.mismatched])):
            items = compress_names(pairs)
            if items:
                lines.append(f"  {title}:")
                lines += [f"    {item}" for item in items[:MAX_LISTED]]
                if len(items) > MAX_LISTED:
                    lines.append(f"    ... and {len(items) - MAX_LISTED} more")
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


class CheckpointFileError(ValueError):
    """A checkpoint file that is missing, truncated or corrupt; the message names the file."""

    def __init__(self, path, reason):
        self.path = str(path)
        super().__init__(f"cannot read checkpoint file {self.path}: {reason}")


class UnsupportedArchitectureError(ValueError):
    """The source model has a feature this project's CLIP does not implement."""


def output_dims(cfg: CLIPConfig) -> tuple[int, int]:
    """The towers' projection widths, resolving the `${model.output_dim}` default."""
    def resolve(value):
        return cfg.output_dim if isinstance(value, str) else int(value)
    return resolve(cfg.vision.output_dim), resolve(cfg.text.output_dim)


def padded_vocab(vocab_size: int, divisible_by: int, tp: int = 1) -> int:
    """Megatron's vocab padding (models.clip.towers.padded_vocab_size for a given TP size)."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def _tower_layer_shapes(prefix: str, num_layers: int, width: int, ffn: int) -> dict:
    shapes = {}
    for i in range(num_layers):
        p = f"{prefix}.transformer.layers.{i}."
        shapes.update({
            p + LN1_W: (width,), p + LN1_B: (width,),
            p + PROJ_W: (width, width), p + PROJ_B: (width,),
            p + QKV_W: (3 * width, width), p + QKV_B: (3 * width,),
            p + LN2_W: (width,), p + LN2_B: (width,),
            p + FC1_W: (ffn, width), p + FC1_B: (ffn,),
            p + FC2_W: (width, ffn), p + FC2_B: (width,),
        })
        for extra in EXTRA_STATES:
            shapes[p + extra] = None
    shapes[f"{prefix}.transformer.final_layernorm.weight"] = (width,)
    shapes[f"{prefix}.transformer.final_layernorm.bias"] = (width,)
    return shapes


def expected_clip_shapes(cfg: CLIPConfig, tp: int = 1) -> dict:
    """Name -> shape of `CLIPModel(cfg).state_dict()` at TP=1 (None for `_extra_state` entries).

    `tp` only changes the vocab padding of `text.token_embedding.weight` (the full, gathered size).
    """
    v, t = cfg.vision, cfg.text
    v_out, t_out = output_dims(cfg)
    vw, tw = v.hidden_size, t.hidden_size
    shapes = {"logit_scale": ()}
    shapes.update({
        "visual.class_embedding": (v.class_token_length, vw),
        "visual.positional_embedding": (v.seq_length, vw),
        "visual.conv1.weight": (vw, v.num_channels, v.patch_dim, v.patch_dim),
        "visual.ln_pre.weight": (vw,), "visual.ln_pre.bias": (vw,),
    })
    shapes.update(_tower_layer_shapes("visual", v.num_layers, vw, v.ffn_hidden_size))
    shapes["visual.proj.weight"] = (v_out, vw)
    shapes["text.positional_embedding"] = (t.encoder_seq_length, tw)
    shapes["text.token_embedding.weight"] = (padded_vocab(t.vocab_size, t.make_vocab_size_divisible_by, tp), tw)
    shapes.update(_tower_layer_shapes("text", t.num_layers, tw, t.ffn_hidden_size))
    shapes["text.text_projection.weight"] = (t_out, tw)
    return shapes


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Separate q, k, v projections ([h, ...] each) -> megatron's `linear_qkv` ([3h, ...]).

    megatron-core's SelfAttention reads the fused output as [groups, (heads/group + 2) * head_dim]
    (attention.py, get_query_key_value_tensors); with one head per group (plain multi-head
    attention) the rows go head by head: q_0 k_0 v_0 | q_1 k_1 v_1 | ... each head_dim rows, so a
    contiguous TP chunk on dim 0 holds whole heads.
    """
    h = q.shape[0]
    if h % num_heads:
        raise ValueError(f"projection width {h} is not divisible by num_heads={num_heads}")
    rest = q.shape[1:]
    parts = [x.reshape(num_heads, h // num_heads, *rest) for x in (q, k, v)]
    return torch.stack(parts, dim=1).reshape(3 * h, *rest)


def split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv`: megatron's fused [3h, ...] -> (q, k, v), each [h, ...]."""
    h3 = qkv.shape[0]
    if h3 % (3 * num_heads):
        raise ValueError(f"fused QKV rows {h3} are not divisible by 3 x num_heads={num_heads}")
    h, rest = h3 // 3, qkv.shape[1:]
    grouped = qkv.reshape(num_heads, 3, h // num_heads, *rest)
    return tuple(grouped[:, i].reshape(h, *rest).contiguous() for i in range(3))


def _shape(value) -> Optional[tuple]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def check_keys_and_shapes(state: Mapping, expected: Mapping, what: str, *, ignore: Iterable[str] = (),
                          flexible_rows: Iterable[str] = (), hint: str = "") -> None:
    """Raise one `CheckpointMismatchError` naming every missing, unexpected and mis-shaped key.

    `expected` maps names to shapes (None: a non-tensor entry whose presence is optional).
    `ignore`: names accepted in `state` and dropped by the converter (buffers such as position_ids).
    `flexible_rows`: names whose dim 0 may be larger than expected (vocab padding).
    """
    ignore, flexible_rows = set(ignore), set(flexible_rows)
    missing = [n for n, s in expected.items() if s is not None and n not in state]
    unexpected = [n for n in state if n not in expected and n not in ignore]
    mismatched = []
    for name, want in expected.items():
        if want is None or name not in state:
            continue
        got = _shape(state[name])
        if got is None:
            mismatched.append((name, ("not a tensor",), want))
        elif got != tuple(want):
            if name in flexible_rows and len(got) == len(want) and got[1:] == tuple(want[1:]) and got[0] >= want[0]:
                continue
            mismatched.append((name, got, want))
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(what, missing, unexpected, mismatched, hint)


def with_vocab_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Trim or zero-pad the token embedding to `rows` rows."""
    if weight.shape[0] >= rows:
        return weight[:rows]
    pad = weight.new_zeros((rows - weight.shape[0], *weight.shape[1:]))
    return torch.cat([weight, pad], dim=0)


def add_extra_states(state: dict, cfg: CLIPConfig) -> dict:
    """Add megatron's `_extra_state` entries (None) so `load_state_dict(strict=True)` accepts it."""
    for prefix, tower in (("visual", cfg.vision), ("text", cfg.text)):
        for i in range(tower.num_layers):
            for extra in EXTRA_STATES:
                state.setdefault(f"{prefix}.transformer.layers.{i}.{extra}", None)
    return state


def check_clip_state_dict(state: Mapping, cfg: CLIPConfig, what: str = "CLIP state dict") -> None:
    """Check a full (TP=1) state dict of our CLIP; the vocab may carry any amount of padding."""
    expected = expected_clip_shapes(cfg)
    expected["text.token_embedding.weight"] = (cfg.text.vocab_size, cfg.text.hidden_size)  # + any padding rows
    check_keys_and_shapes(state, expected, what, flexible_rows={"text.token_embedding.weight"},
                          hint="(expected the full TP=1/PP=1 state dict of models.clip.model.CLIPModel with the "
                               "local layer spec; gather a TP-sharded model with "
                               "parallel.tp_sharding.gather_full_state_dict)")


def check_divisible(width: int, heads: int, what: str) -> None:
    if heads <= 0 or width % heads:
        raise UnsupportedArchitectureError(f"{what}: width {width} is not divisible by {heads} heads")


def ffn_size(width: int, mlp_ratio: float) -> int:
    """open_clip's MLP width: int(width * mlp_ratio) (g/14: int(1408 * 4.3637) = 6143)."""
    return int(width * mlp_ratio)


def describe_file_error(path: str | os.PathLike, exc: BaseException) -> CheckpointFileError:
    if isinstance(exc, FileNotFoundError) or not os.path.exists(path):
        return CheckpointFileError(path, "no such file")
    size = os.path.getsize(path)
    return CheckpointFileError(path, f"truncated or corrupt ({size} bytes; {type(exc).__name__}: {exc})")


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI's image normalisation (VisionConfig's None)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_stats(mean, std) -> tuple[Optional[list], Optional[list]]:
    """`VisionConfig.image_mean/std` for a source's normalisation: None where it is CLIP's default."""
    def norm(values, default):
        if values is None:
            return None
        values = [float(x) for x in values]
        same = len(values) == len(default) and all(math.isclose(a, b, abs_tol=1e-7) for a, b in zip(values, default))
        return None if same else values
    return norm(mean, CLIP_MEAN), norm(std, CLIP_STD)


def _ffn_tensors(prefix: str, layers: int):
    for i in range(layers):
        p = f"{prefix}.transformer.layers.{i}."
        yield p + FC1_W, 0
        yield p + FC1_B, 0
        yield p + FC2_W, 1


def pad_ffn(cfg: CLIPConfig, state: Mapping, multiple: int) -> tuple[CLIPConfig, dict]:
    """Round each tower's ffn_hidden_size up to a multiple of `multiple` with zero rows in fc1
    (weight and bias) and zero columns in fc2: the extra units output act(0) = 0 for gelu and
    quick_gelu, so the model computes exactly the same function. open_clip's ViT-g-14 has
    ffn int(1408 * 4.3637) = 6143, which no TP size > 1 divides; padded to 6144 it runs at TP 2 to 128."""
    cfg, state = copy.deepcopy(cfg), dict(state)
    for prefix, tower in (("visual", cfg.vision), ("text", cfg.text)):
        size = -(-tower.ffn_hidden_size // multiple) * multiple
        if size == tower.ffn_hidden_size:
            continue
        for name, dim in _ffn_tensors(prefix, tower.num_layers):
            tensor = state[name]
            pad_shape = list(tensor.shape)
            pad_shape[dim] = size - tensor.shape[dim]
            state[name] = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
        tower.ffn_hidden_size = size
    return cfg, state


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _listing(items: list[str]) -> str:
    return f"{' and '.join(items)} {'is' if len(items) == 1 else 'are'}"


def sharding_problems(cfg: CLIPConfig, tp: int, pp: int = 1, pad_ffn_to_multiple: int = 1) -> list[str]:
    """Every reason an import of `cfg` cannot be cut for tensor-parallel size `tp` and pipeline size
    `pp`, with advice that works when followed (fixing one problem does not reveal the next), or [].

    MLP widths are first padded to `pad_ffn_to_multiple` (the importer's --pad-ffn-to-multiple);
    heads cannot be padded; the vocabulary needs nothing (megatron pads it for each TP size)."""
    if tp < 1 or pp < 1 or pad_ffn_to_multiple < 1:
        return [f"tensor_model_parallel_size={tp}, pipeline_model_parallel_size={pp} and --pad-ffn-to-multiple "
                f"{pad_ffn_to_multiple} must be at least 1"]
    towers = (("vision", cfg.vision), ("text", cfg.text))
    multiple = pad_ffn_to_multiple
    widths = {name: -(-t.ffn_hidden_size // multiple) * multiple for name, t in towers}
    problems = []
    bad_heads = [f"model.{n}.num_attention_heads={t.num_attention_heads}" for n, t in towers
                 if t.num_attention_heads % tp]
    if bad_heads:
        problems.append(f"{_listing(bad_heads)} not divisible by tensor_model_parallel_size={tp} (attention heads "
                        "cannot be padded)")
    bad_ffn = [f"model.{n}.ffn_hidden_size={t.ffn_hidden_size}" + (f" (padded to {widths[n]})" if widths[n] !=
               t.ffn_hidden_size else "") for n, t in towers if widths[n] % tp]
    if bad_ffn:
        fix = "" if bad_heads else (f": add --pad-ffn-to-multiple {math.lcm(multiple, tp)} (zero MLP units: the same "
                                    "function; export-open-clip --model-name trims them)")
        problems.append(f"{_listing(bad_ffn)} not divisible by tensor_model_parallel_size={tp}{fix}")
    if bad_heads:  # name the sizes that work, with the padding each needs
        working = []
        for size in _divisors(math.gcd(*(t.num_attention_heads for _, t in towers))):
            needs_pad = any(w % size for w in widths.values())
            working.append(f"{size} (with --pad-ffn-to-multiple {size})" if needs_pad else str(size))
        problems.append(f"tensor_model_parallel_size values that work: {', '.join(working)}")
    bad_layers = [f"model.{n}.num_layers={t.num_layers}" for n, t in towers if t.num_layers % pp]
    if bad_layers:
        layer_pp = ", ".join(map(str, _divisors(math.gcd(*(t.num_layers for _, t in towers)))))
        problems.append(f"{_listing(bad_layers)} not divisible by pipeline_model_parallel_size={pp}: every stage "
                        f"holds the same share of both towers' layers; sizes that work: {layer_pp}")
    return problems


def trim_ffn(cfg: CLIPConfig, state: Mapping, vision_ffn: int, text_ffn: int) -> tuple[CLIPConfig, dict]:
    """Undo `pad_ffn`: keep the first `vision_ffn` / `text_ffn` MLP units; the dropped units must be
    padding (all-zero fc2 columns), otherwise they carry weights and the trim raises."""
    cfg, state = copy.deepcopy(cfg), dict(state)
    for prefix, tower, size in (("visual", cfg.vision, vision_ffn), ("text", cfg.text, text_ffn)):
        if size == tower.ffn_hidden_size:
            continue
        if size > tower.ffn_hidden_size:
            raise UnsupportedArchitectureError(f"{prefix}: target ffn_hidden_size {size} is larger than the "
                                               f"checkpoint's {tower.ffn_hidden_size}")
        for name, dim in _ffn_tensors(prefix, tower.num_layers):
            tensor = state[name]
            if name.endswith(FC2_W) and tensor.narrow(dim, size, tensor.shape[dim] - size).abs().max() != 0:
                raise UnsupportedArchitectureError(
                    f"{name}: MLP units {size}..{tensor.shape[dim] - 1} are not zero padding; cannot trim "
                    f"ffn_hidden_size {tower.ffn_hidden_size} -> {size}")
            state[name] = tensor.narrow(dim, 0, size)
        tower.ffn_hidden_size = size
    return cfg, state


_VISION_ARCH = ("patch_dim", "img_h", "img_w", "num_channels", "class_token_length", "global_average_pool",
                "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "layernorm_epsilon",
                "activation")
_TEXT_ARCH = ("vocab_size", "encoder_seq_length", "num_layers", "hidden_size", "ffn_hidden_size",
              "num_attention_heads", "layernorm_epsilon", "activation", "eot_token_id")


def architecture_differences(ours: CLIPConfig, target: CLIPConfig) -> list[str]:
    """The model-section fields that change the computed function and differ between two configs."""
    diffs = [f"output_dim: {a} vs {b}" for a, b in [(output_dims(ours), output_dims(target))] if a != b]
    for name, fields in (("vision", _VISION_ARCH), ("text", _TEXT_ARCH)):
        a, b = getattr(ours, name), getattr(target, name)
        diffs += [f"model.{name}.{f}: {getattr(a, f)!r} vs {getattr(b, f)!r}"
                  for f in fields if getattr(a, f) != getattr(b, f)]
    return diffs
