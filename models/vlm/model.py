"""A LLaVA-style vision-language model on megatron-core: this project's CLIP ViT, a connector, and the
Llama-style LLM; one pipeline stage of it per rank.

    images -> vision (ViT up to feature_select_index, class token kept or dropped) -> connector
           -> image embeddings, spliced into the LLM's token embeddings at the image positions
           -> LLM decoder -> loss on the response tokens (or logits)

As Megatron-LM's LLaVA since it dropped separate encoder stages, the vision tower and the connector
sit whole on the first pipeline stage, beside the first LLM layers; the other stages hold LLM
layers only, and the last one reads the labels. Stages pass the LLM's hidden states
({"hidden": [s, b, h]}), so the pipeline messages are those of the LLM alone.

Image placeholders are expanded in the data pipeline (models/vlm/sequence.py), not here: every
micro-batch arrives with `image_index` [b, s], the row of the flattened image embeddings
[n_images * image_tokens, h] each position takes (-1 for text), and labels and masks already laid
out over the expanded sequence, so the first and the last stage read the same batch and nothing has
to be re-laid out on the last stage (Megatron's `_preprocess_data` does both halves on the
fly). A micro-batch without an image skips the vision tower and adds a zero times the sum of the
trainable vision-path parameters instead (Megatron's dummy contribution), so every such parameter
still gets a (zero) gradient and data-parallel buckets fill and reduce the same way on every rank.

Parameter names: `vision.*` (CLIP's `visual.*` without its head), `connector.*`, `llm.*` (the
LLM's own names under `llm.`), so a CLIP and an LLM checkpoint load through a key map each.
"""
from __future__ import annotations

import dataclasses

import torch

from models.clip.config import VisionConfig
from models.clip.model import tower_transformer_config
from models.clip.towers import VisionTower
from models.common.attention import resolve_attention_backend
from models.common.stage import pipeline_stage_flags
from models.common.transformer_config import parallel_sizes
from models.llm.model import LLMModel
from models.vlm.config import VLMConfig, VLMVisionConfig
from models.vlm.connector import build_connector


def clip_vision_config(cfg: VLMVisionConfig, layers: int | None = None) -> VisionConfig:
    """The CLIP `VisionConfig` of the VLM's tower (`layers`: how many to build)."""
    fields = {f.name for f in dataclasses.fields(VisionConfig)}
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k in fields}
    values.update(output_dim=1, global_average_pool=False, num_layers=layers or cfg.num_layers)
    return VisionConfig(**values)


class VLMModel(torch.nn.Module):
    """This rank's pipeline stage of the VLM (see `stage_forward`)."""

    def __init__(self, cfg: VLMConfig, pre_process: bool | None = None, post_process: bool | None = None,
                 tensor_model_parallel_size: int | None = None, pipeline_model_parallel_size: int | None = None,
                 **transformer_overrides):
        super().__init__()
        running_tp, running_pp = parallel_sizes()
        tp = tensor_model_parallel_size or running_tp
        pp = pipeline_model_parallel_size or running_pp
        self.cfg = cfg
        self.pre_process, self.post_process = pipeline_stage_flags(pre_process, post_process)
        llm_cfg = dataclasses.replace(cfg.llm, attention_backend=cfg.attention_backend,
                                      use_flash_attention=cfg.use_flash_attention,
                                      megatron_amp_O2=cfg.megatron_amp_O2)
        self.llm = LLMModel(llm_cfg, self.pre_process, self.post_process, tp, pp, **transformer_overrides)
        self.attention_backend = self.llm.attention_backend
        self.image_tokens = cfg.image_tokens
        if self.pre_process:
            vision_cfg = clip_vision_config(cfg.vision, cfg.vision.layers_used)
            # Whole on this stage (pipeline size 1), without sequence parallelism: the image
            # sequence is short next to the LLM's, and its features are needed whole.
            overrides = {**transformer_overrides, "sequence_parallel": False}
            vision_config = tower_transformer_config(vision_cfg, tensor_model_parallel_size=tp,
                                                     pipeline_model_parallel_size=1, whole_model_on_stage=True,
                                                     **overrides)
            backend = resolve_attention_backend(cfg.attention_backend, cfg.use_flash_attention)
            self.vision = VisionTower(vision_cfg, vision_config, backend, pre_process=True, post_process=False)
            self.vision.to(vision_config.params_dtype)  # conv, class token, positions, ln_pre
            connector_config = dataclasses.replace(self.llm.config, sequence_parallel=False,
                                                   pipeline_model_parallel_size=1)
            self.connector = build_connector(cfg.connector, cfg.vision.hidden_size, cfg.llm.hidden_size,
                                             connector_config)
            self.connector.to(connector_config.params_dtype)

    # -- the image path (first stage) -----------------------------------------------------------
    def vision_trainable(self) -> list[torch.nn.Parameter]:
        if not self.pre_process:
            return []
        return [p for m in (self.vision, self.connector) for p in m.parameters() if p.requires_grad]

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images [n, 3, H, W] -> ViT features [n, s, vision_width] (class token(s) kept or dropped)."""
        trains = any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(trains and torch.is_grad_enabled()):
            hidden = self.vision.encode(self.vision.embed(images))  # [s, n, w]
        if not self.cfg.vision.use_cls:
            hidden = hidden[self.cfg.vision.class_token_length:]
        return hidden.transpose(0, 1)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Images [n, 3, H, W] -> LLM input embeddings [n, image_tokens, llm_width]."""
        return self.connector(self.image_features(images))

    def input_embeddings(self, tokens: torch.Tensor, images: torch.Tensor | None = None,
                         image_index: torch.Tensor | None = None,
                         image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings [b, s, h] with the image embeddings at the image positions.

        `image_index` [b, s]: the row of the flattened image embeddings [n * image_tokens, h] each
        position takes, -1 for text. `image_embeds` [n, image_tokens, h]: precomputed (generation
        encodes each image once); otherwise computed from `images`.
        """
        embeds = self.llm.embed_tokens(tokens)
        if image_embeds is None and images is not None and images.shape[0] > 0:
            image_embeds = self.image_embeddings(images.to(embeds.device))
        if image_embeds is None:
            if image_index is not None and bool((image_index >= 0).any()):
                raise ValueError("image positions in the batch but no images")
            trainable = self.vision_trainable()
            if trainable and torch.is_grad_enabled():
                # A text-only micro-batch: every trainable parameter of the image path still takes
                # part in the graph (with a zero gradient), as on ranks whose batch has images.
                embeds = embeds + 0.0 * sum(p.sum() for p in trainable).to(embeds.dtype)
            return embeds
        flat = image_embeds.reshape(-1, image_embeds.shape[-1]).to(embeds.dtype)
        if image_index is None:
            raise ValueError("images without image_index: where do their embeddings go?")
        if int(image_index.max()) >= flat.shape[0]:
            raise ValueError(f"image_index points at embedding row {int(image_index.max())} but {image_embeds.shape[0]} "
                             f"images give {flat.shape[0]} rows")
        is_image = (image_index >= 0).unsqueeze(-1)
        return torch.where(is_image, flat[image_index.clamp(min=0)], embeds)

    # -- one pipeline stage ----------------------------------------------------------------------
    def stage_forward(self, inputs: dict | None = None, tokens: torch.Tensor | None = None,
                      images: torch.Tensor | None = None, image_index: torch.Tensor | None = None,
                      labels: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
                      parallel_output: bool = False) -> dict:
        """First stage: `tokens` [b, s] (pad ids at image positions), `images` [n, 3, H, W] (may be
        empty) and `image_index` [b, s]. Later stages: `inputs` = {"hidden": ...}. Not the last
        stage: returns {"hidden"}. Last stage: {"loss"} with `labels`/`loss_mask` [b, s];
        {"logits": [b, s, V]} without; `parallel_output` adds this TP rank's vocabulary slice of the
        logits [s, b, V_pad / TP] to the loss (evaluation: no gather of the full vocabulary)."""
        embeds = None
        if self.pre_process:
            if tokens is None:
                raise ValueError("the first pipeline stage of the VLM takes tokens (and images)")
            embeds = self.input_embeddings(tokens, images, image_index)
        if parallel_output and self.post_process:
            return self._with_parallel_logits(inputs, embeds, labels, loss_mask)
        return self.llm.stage_forward(inputs, None, labels, loss_mask, inputs_embeds=embeds)

    def _with_parallel_logits(self, inputs, embeds, labels, loss_mask) -> dict:
        """{"loss", "logits": vocab-parallel [s, b, V_pad / TP]} on the last stage: the logits are
        taken from the LLM's output layer while the LLM computes its (vocab-parallel) loss, so the
        full vocabulary is never gathered and nothing of the LLM's forward is repeated here."""
        if labels is None:
            raise ValueError("parallel_output needs labels (the loss runs on the vocab-parallel logits)")
        captured = {}
        handle = self.llm.output_layer.register_forward_hook(lambda _m, _a, out: captured.update(logits=out[0]))
        try:
            out = self.llm.stage_forward(inputs, None, labels, loss_mask, inputs_embeds=embeds)
        finally:
            handle.remove()
        return {"loss": out["loss"], "logits": captured["logits"][: labels.shape[1]]}

    def forward(self, tokens, images=None, image_index=None, labels=None, loss_mask=None):
        """The whole model (one pipeline stage): the loss with labels, else logits [b, s, V]."""
        if not (self.pre_process and self.post_process):
            raise RuntimeError("VLMModel.forward runs the whole model; under pipeline parallelism use "
                               "engine.schedules with models.vlm.model.vlm_forward_step")
        out = self.stage_forward(None, tokens, images, image_index, labels, loss_mask)
        return out["loss"] if labels is not None else out["logits"]

    # -- optimizer hook --------------------------------------------------------------------------
    # The image path (open_clip's rule, as the CLIP family): no decay for learned positions, the class
    # token, the resampler's latents and norms; the LLM keeps its own rule (Megatron's: tensors of fewer
    # than 2 dims only, the embedding and output layer are decayed).
    NO_DECAY_NAME_PARTS = ("embedding", "class_embedding", "latents", "norm", "ln_")

    def no_weight_decay(self, name: str, param: torch.nn.Parameter) -> bool:
        if param.ndim < 2:
            return True
        if name.startswith("llm."):
            return LLMModel.no_weight_decay(name[4:], param)
        return any(part in name for part in self.NO_DECAY_NAME_PARTS)


def vlm_forward_step(model: VLMModel, batch: dict | None, inputs: dict | None):
    """One micro-batch through this stage, for `engine.schedules.forward_backward` (reads_data on
    the first stage: tokens, images, image_index; and the last: labels, loss_mask). `tokens` in
    the info counts the real (not padding) positions of the expanded sequences, images included."""
    device = next(model.parameters()).device
    info = {"samples": 0, "tokens": 0}
    tokens = images = image_index = labels = loss_mask = None
    if batch is None:
        if model.pre_process or model.post_process:
            raise RuntimeError("the first and last pipeline stages of the VLM read the batch (reads_data=True)")
    else:
        info = {"samples": int(batch["tokens"].shape[0]), "tokens": int(batch["attention_mask"].sum())}
        if model.pre_process:
            tokens = batch["tokens"].to(device, non_blocking=True)
            images = batch["images"].to(device, non_blocking=True)
            image_index = batch["image_index"].to(device, non_blocking=True)
        if model.post_process:
            labels = batch["labels"].to(device, non_blocking=True)
            loss_mask = batch["loss_mask"].to(device, non_blocking=True)
    out = model.stage_forward(inputs, tokens, images, image_index, labels, loss_mask)
    return (out["loss"], info) if model.post_process else (out, info)


def freeze_parts(model: VLMModel, vision: bool, connector: bool, llm: bool, lora: bool = False) -> None:
    """requires_grad per part (Megatron-LM's --freeze-ViT / --freeze-LM, LLaVA's stages): frozen
    parts get no gradient and, since the optimizer skips them, no optimizer state. With `lora`
    the LLM's base weights are frozen and only its adapters (`*.lora.*`) train."""
    from models.common.lora import is_lora_key

    for name, param in model.named_parameters():
        part = name.split(".", 1)[0]
        if part == "vision":
            trains = not vision
        elif part == "connector":
            trains = not connector
        elif lora:
            trains = is_lora_key(name)
        else:
            trains = not llm
        param.requires_grad_(trains)
