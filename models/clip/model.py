"""CLIP: an image tower, a text tower and a learnable temperature."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.clip.config import CLIPConfig
from models.clip.towers import TextTower, VisionTower
from models.common.attention import resolve_attention_backend
from models.common.recompute import recompute_settings
from models.common.stage import pipeline_stage_flags
from models.common.transformer_config import make_transformer_config, parallel_sizes


def tower_transformer_config(tower, **overrides):
    """The megatron `TransformerConfig` of one tower section (vision or text)."""
    overrides = {**recompute_settings(tower), **overrides}
    return make_transformer_config(
        num_layers=tower.num_layers,
        hidden_size=tower.hidden_size,
        ffn_hidden_size=tower.ffn_hidden_size,
        num_attention_heads=tower.num_attention_heads,
        hidden_dropout=tower.hidden_dropout,
        attention_dropout=tower.attention_dropout,
        layernorm_epsilon=tower.layernorm_epsilon,
        activation=tower.activation,
        **overrides,
    )


def normalize_features(features: torch.Tensor) -> torch.Tensor:
    """L2-normalised, in fp32 (the contrastive loss and evaluation compare unit vectors)."""
    return F.normalize(features.float(), dim=-1)


class CLIPModel(torch.nn.Module):
    """Both towers and the temperature; under pipeline parallelism, this rank's stage of them.

    Each stage holds a slice of the vision layers and the same share of the text layers, so both
    towers advance together and every stage has work; the first stage embeds, the last pools,
    projects and holds `logit_scale` (see `stage_forward`).
    """

    def __init__(self, cfg: CLIPConfig, pre_process: bool | None = None, post_process: bool | None = None,
                 tensor_model_parallel_size: int | None = None, pipeline_model_parallel_size: int | None = None,
                 **transformer_overrides):
        """`transformer_overrides` go to both towers' TransformerConfig (dtype, init, recompute, SP...).
        The parallel sizes default to the running parallel state's."""
        super().__init__()
        self.cfg = cfg
        self.pre_process, self.post_process = pipeline_stage_flags(pre_process, post_process)
        running_tp, running_pp = parallel_sizes()
        transformer_overrides = {"tensor_model_parallel_size": tensor_model_parallel_size or running_tp,
                                 "pipeline_model_parallel_size": pipeline_model_parallel_size or running_pp,
                                 **transformer_overrides}
        backend = resolve_attention_backend(cfg.attention_backend, cfg.use_flash_attention)
        self.attention_backend = backend
        stage = {"pre_process": self.pre_process, "post_process": self.post_process}
        self.visual = VisionTower(cfg.vision, tower_transformer_config(cfg.vision, **transformer_overrides), backend,
                                  **stage)
        self.text = TextTower(cfg.text, tower_transformer_config(cfg.text, **transformer_overrides), backend, **stage)
        if self.post_process:
            self.logit_scale = torch.nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))

    def stage_forward(self, inputs: dict | None = None, images: torch.Tensor | None = None,
                      tokens: torch.Tensor | None = None) -> dict:
        """Run this stage on whatever it is given; either tower may be absent (evaluation).

        First stage: `images` / `tokens`. Later stages: `inputs`, the previous stage's output
        ({"vision": [s, b, h], "text": [s, b, h], "eot": [b]}). Returns the same kind of dict for
        the next stage, or on the last stage the projected, unnormalised
        {"image_features": [b, d], "text_features": [b, d]}.
        """
        inputs = inputs or {}
        out = {}
        vision = self.visual.embed(images) if self.pre_process and images is not None else inputs.get("vision")
        if vision is not None:
            vision = self.visual.encode(vision)
            if self.post_process:
                out["image_features"] = self.visual.head(vision)
            else:
                out["vision"] = vision
        text = self.text.embed(tokens) if self.pre_process and tokens is not None else inputs.get("text")
        if text is not None:
            eot = self.text.eot_positions(tokens) if self.pre_process else inputs["eot"]
            text = self.text.encode(text)
            if self.post_process:
                out["text_features"] = self.text.head(text, eot)
            else:
                out["text"], out["eot"] = text, eot
        return out

    def trim_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """`tokens` cut to the length the text tower needs (`TextTower.trimmed_length`) when
        model.text.trim_to_longest is on and the whole tower runs on this stage; else unchanged.
        A pipelined tower keeps the full length: stage messages have one shape per schedule run."""
        if not (self.cfg.text.trim_to_longest and self.pre_process and self.post_process) or tokens.is_meta:
            return tokens  # (meta tensors, for shape-only runs, have no values to read)
        return tokens[:, :self.text.trimmed_length(tokens)]

    def _single_stage(self, what: str) -> None:
        if not (self.pre_process and self.post_process):
            raise RuntimeError(f"CLIPModel.{what} runs the whole model; under pipeline parallelism use "
                               "engine.schedules (training) or models.clip.family.pipelined_encoders (encoding)")

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        self._single_stage("encode_image")
        features = self.stage_forward(images=images)["image_features"]
        return normalize_features(features) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        self._single_stage("encode_text")
        features = self.stage_forward(tokens=self.trim_text(tokens))["text_features"]
        return normalize_features(features) if normalize else features

    # Not decayed (open_clip / CLIP practice): gains and biases of norms, all biases, embeddings
    # and learned positions, class tokens, and the temperature.
    NO_DECAY_NAME_PARTS = ("embedding", "class_embedding", "logit_scale", "norm", "ln_")

    def no_weight_decay(self, name: str, param: torch.nn.Parameter) -> bool:
        """The optimizer's weight-decay policy for this model (engine.optim)."""
        return param.ndim < 2 or any(part in name for part in self.NO_DECAY_NAME_PARTS)

    # The temperature's own optimizer group (an engine.optim.ParamGroup with FastCLIP's lr_tau and
    # schedule), set by the family; None: logit_scale is an undecayed parameter like the others.
    temperature_group = None

    def param_group(self, name: str, param: torch.nn.Parameter):
        """The optimizer's group of each parameter (engine.optim's `param_group` hook)."""
        from engine.optim import DECAY, NO_DECAY

        if name == "logit_scale" and self.temperature_group is not None:
            return self.temperature_group
        return NO_DECAY if self.no_weight_decay(name, param) else DECAY

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped as open_clip (max 100) to keep the softmax from collapsing."""
        return self.logit_scale.float().exp().clamp(max=self.cfg.max_logit_scale)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        self._single_stage("forward")
        out = self.stage_forward(images=images, tokens=self.trim_text(tokens))
        return normalize_features(out["image_features"]), normalize_features(out["text_features"]), self.scale()


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


