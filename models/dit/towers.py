"""Vision towers for embedding extraction: any CLIP vision tower this project builds or imports, at
the running tensor-parallel size, with the patch features of a chosen layer.

A tower is named by a source string:

    checkpoint:PATH      an engine CLIP checkpoint (a step directory or a checkpoint root: its latest)
    open_clip:FILE       open_clip weights (a .safetensors/.pt file or local dir), through conversion/
    hf:DIR               a Hugging Face CLIPModel directory, through conversion/
    random:CONFIG.yaml   a randomly initialised tower of a CLIP config (plus overrides), from a seed

The conditioning tower needs only its vision tower; the target tower also gives its own image
embedding and, when its text tower is there, the caption embeddings (so the full CLIP is built).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field

import torch

log = logging.getLogger("engine")
SOURCE_KINDS = ("checkpoint", "open_clip", "hf", "random")


@dataclass
class TowerSpec:
    source: str  # KIND:PATH, see the module docstring
    layer: int = -1  # -1: the output tokens (after the final norm); k >= 1: the hidden states after layer k
    model_name: str | None = None  # open_clip: the architecture name (ViT-L-14, ...) when the file has no config
    overrides: list = field(default_factory=list)  # random: config overrides (model.vision.hidden_size=...)
    seed: int = 0  # random: the initialisation seed
    tokenizer: str | None = None  # KIND:PATH of the text tokenizer (sentencepiece:... or clip_bpe:...)

    @property
    def kind(self) -> str:
        kind = self.source.split(":", 1)[0]
        if ":" not in self.source or kind not in SOURCE_KINDS:
            raise ValueError(f"tower source {self.source!r}: use one of {', '.join(k + ':PATH' for k in SOURCE_KINDS)}")
        return kind

    @property
    def path(self) -> str:
        return self.source.split(":", 1)[1]

    def describe(self) -> dict:
        return dataclasses.asdict(self)


class VisionOnly(torch.nn.Module):
    """A CLIP vision tower under the name `visual`, so CLIP state dicts load into it as they are."""

    def __init__(self, visual):
        super().__init__()
        self.visual = visual


@dataclass
class LoadedTower:
    spec: TowerSpec
    clip_cfg: object  # models.clip.config.CLIPConfig
    model: torch.nn.Module  # CLIPModel (with text) or VisionOnly
    tokenizer: object = None

    @property
    def visual(self):
        return self.model.visual

    @property
    def grid(self) -> tuple[int, int]:
        v = self.clip_cfg.vision
        return v.img_h // v.patch_dim, v.img_w // v.patch_dim

    @property
    def width(self) -> int:
        return self.clip_cfg.vision.hidden_size

    @property
    def has_text(self) -> bool:
        return hasattr(self.model, "text") and self.tokenizer is not None

    def describe(self) -> dict:
        return {**self.spec.describe(), "vision": dataclasses.asdict(self.clip_cfg.vision),
                "output_dim": self.clip_cfg.output_dim, "grid": list(self.grid), "text": self.has_text}


def _build(clip_cfg, with_text: bool, device, cpu_init: bool = False):
    from models.clip.model import CLIPModel, tower_transformer_config
    from models.clip.towers import VisionTower
    from models.common.attention import resolve_attention_backend
    from models.common.transformer_config import parallel_sizes

    tp, _ = parallel_sizes()
    overrides = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": 1,
                 "use_cpu_initialization": cpu_init or device.type == "cpu"}
    if with_text:
        return CLIPModel(clip_cfg, pre_process=True, post_process=True, **overrides).to(device)
    backend = resolve_attention_backend(clip_cfg.attention_backend, clip_cfg.use_flash_attention)
    visual = VisionTower(clip_cfg.vision, tower_transformer_config(clip_cfg.vision, **overrides), backend)
    return VisionOnly(visual).to(device)


def _load_full_state(model, full: dict) -> None:
    """A TP=1 CLIP state dict into `model` (this rank's TP shard of the entries it has)."""
    from megatron.core import parallel_state

    from parallel.tp_sharding import shard_full_state_dict

    own = model.state_dict()
    subset = {k: v for k, v in full.items() if k in own}
    missing = sorted(k for k in own if k not in subset)
    if missing:
        raise KeyError(f"the tower's weights lack {missing[:6]}")
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    model.load_state_dict(shard_full_state_dict(subset, model, rank, tp), strict=True)


def _find_tokenizer_dir(checkpoint: str, output_dir: str | None) -> str | None:
    """The tokenizer a CLIP run trained for itself: <output_dir>/tokenizer, or one beside a parent
    of the checkpoint."""
    candidates = [os.path.join(output_dir, "tokenizer")] if output_dir else []
    parent = os.path.abspath(checkpoint)
    for _ in range(3):
        parent = os.path.dirname(parent)
        candidates.append(os.path.join(parent, "tokenizer"))
    return next((c for c in candidates if os.path.isdir(c)), None)


def _tokenizer(spec_tokenizer: str | None, exp_cfg=None, checkpoint: str | None = None):
    from data.tokenizers import build_tokenizer

    if spec_tokenizer:
        kind, _, path = spec_tokenizer.partition(":")
        return build_tokenizer(kind, path)
    if exp_cfg is None:
        return None
    tok = exp_cfg.data.tokenizer
    if tok.path is not None:
        return build_tokenizer(tok.type, tok.path) if os.path.exists(tok.path) else None
    cache = _find_tokenizer_dir(checkpoint, exp_cfg.trainer.output_dir)
    if cache is None:
        return None
    try:
        return build_tokenizer(tok.type, None, vocab_size=tok.vocab_size, cache_dir=cache)
    except ValueError:
        return None


def load_tower(spec: TowerSpec, device, with_text: bool = False) -> LoadedTower:
    """Build the tower at the running TP and load its weights (collective over the world for
    engine checkpoints). `with_text`: the full CLIP, for caption embeddings (when a tokenizer is found)."""
    from engine.config import load_config
    from engine.schema import BARE_KEYS
    from models.clip.config import CLIPExperimentConfig

    kind = spec.kind
    if kind == "random":
        exp = load_config(CLIPExperimentConfig, spec.path, list(spec.overrides), BARE_KEYS)
        state = torch.random.get_rng_state()
        torch.manual_seed(spec.seed)  # the same weights on every rank and at every TP (megatron's CPU init is full-size)
        try:
            model = _build(exp.model, False, device, cpu_init=True)
        finally:
            torch.random.set_rng_state(state)
        return LoadedTower(spec, exp.model, model.eval())
    if kind == "checkpoint":
        from megatron.core import parallel_state

        from engine.checkpoint import KeyMap, load_model_weights
        from engine.checkpoint.manager import resolve_checkpoint
        from engine.checkpoint.reader import CheckpointReader
        from engine.checkpoint.state import Placement
        from engine.checkpoint.tools import checkpoint_family, config_from_yaml

        path = resolve_checkpoint(spec.path)
        reader = CheckpointReader(path)
        family = checkpoint_family(reader.meta)
        if family.name != "clip":
            raise ValueError(f"{spec.source}: a {family.name} checkpoint; a vision tower comes from a CLIP checkpoint")
        exp = config_from_yaml(reader.meta["config_yaml"], family)
        tokenizer = _tokenizer(spec.tokenizer, exp, path) if with_text else None
        model = _build(exp.model, with_text and tokenizer is not None, device)
        place = Placement(parallel_state.get_tensor_model_parallel_rank(),
                          parallel_state.get_tensor_model_parallel_world_size())
        allow = [] if hasattr(model, "text") else ["text.*", "logit_scale"]
        load_model_weights(path, model, place, KeyMap(allow_unused=allow))
        return LoadedTower(spec, exp.model, model.eval(), tokenizer)
    if kind == "open_clip":
        from conversion.clip_layout import image_stats
        from conversion.openclip_format import (
            clip_config_from_openclip,
            openclip_config_from_state_dict,
            openclip_model_config,
            openclip_to_clip_state_dict,
            read_openclip,
        )

        state, dir_cfg, preprocess = read_openclip(spec.path)
        model_cfg = (openclip_model_config(spec.model_name) if spec.model_name else
                     dir_cfg or openclip_config_from_state_dict(state))
        cfg = clip_config_from_openclip(model_cfg)
        if preprocess:
            cfg.vision.image_mean, cfg.vision.image_std = image_stats(preprocess.get("mean"), preprocess.get("std"))
        full = openclip_to_clip_state_dict(state, cfg)
    else:  # hf
        from conversion.hf_clip_format import (
            clip_config_from_hf,
            hf_to_clip_state_dict,
            read_hf_clip,
        )

        hf_cfg, state, preprocessor = read_hf_clip(spec.path)
        cfg = clip_config_from_hf(hf_cfg, preprocessor)
        full = hf_to_clip_state_dict(state, cfg)
    tokenizer = _tokenizer(spec.tokenizer) if with_text else None
    model = _build(cfg, with_text and tokenizer is not None, device)
    _load_full_state(model, full)
    return LoadedTower(spec, cfg, model.eval(), tokenizer)


@torch.no_grad()
def tower_features(tower: LoadedTower, images: torch.Tensor, want_embedding: bool = False):
    """(patch features [b, P, width] of the chosen layer, the tower's own image embedding [b, d] or None)."""
    visual, layer = tower.visual, tower.spec.layer
    blocks = visual.transformer.layers
    if layer != -1 and not 1 <= layer <= len(blocks):
        raise ValueError(f"tower {tower.spec.source}: layer {layer} is outside 1..{len(blocks)} (or -1 for the output)")
    captured = {}

    def keep_output(module, args, output):  # returns None: the layer's output is left as it is
        captured["x"] = output[0]

    handle = blocks[layer - 1].register_forward_hook(keep_output) if layer != -1 else None
    try:
        x = visual.embed(images.to(next(visual.parameters()).dtype))
        if layer != -1 and not want_embedding:  # stop after the chosen layer
            for block_layer in blocks[:layer]:
                x, _ = block_layer(hidden_states=x, attention_mask=None)
            hidden = x
        else:
            out = visual.encode(x)
            hidden = captured["x"] if layer != -1 else out
    finally:
        if handle is not None:
            handle.remove()
    cfg = tower.clip_cfg.vision
    patches = hidden[cfg.class_token_length:cfg.seq_length].transpose(0, 1).float()
    embedding = visual.head(out).float() if want_embedding else None
    return patches, embedding


@torch.no_grad()
def text_embeddings(tower: LoadedTower, captions: list[str], device) -> torch.Tensor:
    tokens = tower.tokenizer(captions, context_length=tower.clip_cfg.text.encoder_seq_length).to(device)
    return tower.model.encode_text(tokens, normalize=False).float()
