"""The VLM family: a CLIP ViT, a connector and the Llama-style LLM trained on conversations, from one
`VLMExperimentConfig`, registered with the engine as `VLM` (see `engine.family`).

Two stages as LLaVA: connector pretraining (configs/vlm/pretrain.yaml: vision and LLM frozen,
captions) and instruction tuning (configs/vlm/instruct.yaml: connector + LLM, or LoRA adapters on
the LLM with instruct_lora.yaml). Frozen parameters have requires_grad=False, so the engine's
optimizers give them no state and no gradient buffer.

Data: jsonl conversations (`data.train_data`) or, without them, the synthetic VQA set over the
shapes images (data/vlm_synthetic.py), whose evaluation reports exact-match accuracy per
question type beside its chance level.

Pipeline: the first stage reads tokens, images and image positions; the last reads labels and
the loss mask (both get loaders built with the same arguments); middle stages read nothing.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from data.tokenizers import Tokenizer
from engine.checkpoint import KeyMap
from engine.family import ModelFamily, TrainingParts
from engine.flops import gpt_flops_per_token, transformer_layer_flops
from engine.precision import PrecisionPlan
from models.common.attention import announce_attention_backend
from models.llm.config import LLMConfig, llm_layout_problems, llm_vocab_rows
from models.llm.family import load_tokenizer
from models.vlm.config import VLMConfig, VLMExperimentConfig, vision_problems
from models.vlm.connector import connector_layout_problems
from models.vlm.data import VLMLoader, conversation_set, synthetic_sets
from models.vlm.evaluate import make_eval_fn
from models.vlm.model import VLMModel, freeze_parts, vlm_forward_step
from parallel.p2p import StageLink

log = logging.getLogger("engine")


@dataclass
class VLMData:
    train: object
    text: object | None
    eval: object | None
    tokenizer: Tokenizer
    qtypes: tuple = ()


def _tokenizer_path(cfg) -> str:
    return cfg.data.tokenizer.path or os.path.join(cfg.data.synthetic.out_dir, "tokenizer.json")


def prepare_data(cfg, ctx) -> VLMData:
    data = cfg.data
    image_size = cfg.model.vision.img_h
    if data.train_data is None:
        from data.vlm_synthetic import QUESTION_TYPES, write_tokenizer

        if data.tokenizer.path is None:
            if ctx.rank == 0:
                write_tokenizer(data.synthetic.out_dir)
            dist.barrier()
        tokenizer = load_tokenizer(data.tokenizer, _tokenizer_path(cfg))
        if data.synthetic.image_size != image_size:
            raise ValueError(f"data.synthetic.image_size={data.synthetic.image_size} differs from model.vision.img_h="
                             f"{image_size}")
        train, text, evals = synthetic_sets(data.synthetic, data.template.image_token, data.use_captions)
        return VLMData(train, text, evals, tokenizer, QUESTION_TYPES)
    tokenizer = load_tokenizer(data.tokenizer, data.tokenizer.path)
    token = data.template.image_token

    def load(spec):
        return conversation_set(spec, image_size, data.image_folder, token) if spec else None

    return VLMData(load(data.train_data), load(data.text_data), load(data.eval_data), tokenizer)


def build_model(cfg, ctx, precision: PrecisionPlan) -> VLMModel:
    model = VLMModel(cfg.model, use_cpu_initialization=ctx.device.type == "cpu",
                     sequence_parallel=cfg.parallel.sequence_parallel, **precision.transformer_overrides()).to(ctx.device)
    announce_attention_backend(model.attention_backend, ctx.device)
    m = cfg.model
    if m.lora.enabled:
        from models.common.lora import LoRAConfig, apply_lora

        base = dataclasses.asdict(m.lora)
        base.pop("enabled")
        adapted = apply_lora(model, LoRAConfig(**base), include=["llm."])
        if ctx.is_logging_rank:
            log.info("LoRA rank %d on %d LLM linears (%s)", m.lora.rank, len(adapted), ", ".join(m.lora.target_modules))
    from models.vlm.init import load_pretrained_parts

    load_pretrained_parts(cfg, model, ctx)
    freeze_parts(model, vision=m.freeze.vision, connector=m.freeze.connector, llm=m.freeze.llm, lora=m.lora.enabled)
    if ctx.is_logging_rank:
        from models.common.lora import count_parameters

        trainable, total = count_parameters(model, ctx.dims.tp)
        parts = [f"{p} {'frozen' if getattr(m.freeze, p) else 'trains'}" for p in ("vision", "connector", "llm")]
        if m.lora.enabled:
            parts[-1] = "llm LoRA"
        log.info("VLM: %.2fM parameters on this stage (%s), %.2fM train; %d image positions per image (%s "
                 "connector)", total / 1e6, ", ".join(parts), trainable / 1e6, m.image_tokens, m.connector.type)
    return model


def _loader(cfg, data: VLMData, dataset, text_dataset, *, dp_rank, dp_size, batch_size, train: bool):
    return VLMLoader(dataset, data.tokenizer, cfg.data.template, image_tokens=cfg.model.image_tokens,
                     max_length=cfg.model.llm.seq_length, batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size,
                     seed=cfg.trainer.seed, text_dataset=text_dataset,
                     text_batch_fraction=cfg.data.text_batch_fraction if train else 0.0,
                     pad_to_multiple_of=cfg.data.pad_to_multiple_of, fixed_length=cfg.parallel.pipeline_model_parallel_size > 1,
                     group_by_length=cfg.data.group_by_length and train, length_group_size=cfg.data.length_group_size,
                     image_shape=(cfg.model.vision.num_channels, cfg.model.vision.img_h, cfg.model.vision.img_w),
                     shuffle=train, infinite=train)


def build(cfg, ctx, precision: PrecisionPlan) -> TrainingParts:
    """This rank's share of a VLM run."""
    data = prepare_data(cfg, ctx)
    if data.tokenizer.vocab_size > cfg.model.llm.vocab_size:
        raise ValueError(f"model.llm.vocab_size={cfg.model.llm.vocab_size} is smaller than the tokenizer's "
                         f"{data.tokenizer.vocab_size} tokens")
    model = build_model(cfg, ctx, precision)
    train_loader = None
    if model.pre_process or model.post_process:
        text = data.text if cfg.data.text_batch_fraction > 0 else None
        train_loader = _loader(cfg, data, data.train, text, dp_rank=ctx.dp_rank, dp_size=ctx.dims.dp,
                               batch_size=cfg.trainer.micro_batch_size, train=True)
    eval_fn = None
    if data.eval is not None:
        link = StageLink(ctx.device) if ctx.dims.pp > 1 else None
        eval_fn = make_eval_fn(cfg, ctx, model, partial(_loader, cfg, data, data.eval, None, dp_rank=0, dp_size=1,
                                                        batch_size=cfg.eval.batch_size, train=False), link, data.qtypes)
    # checkpoint.init_from (a stage-1 VLM checkpoint) into a LoRA model: the adapters are new
    init_key_map = KeyMap(allow_missing=["*.lora.*"]) if cfg.model.lora.enabled else None
    return TrainingParts(model=model, forward_step=vlm_forward_step, train_loader=train_loader, eval_fn=eval_fn,
                         summary=partial(data_totals, ctx, train_loader if model.pre_process else None),
                         flops_per_sample=vlm_flops_per_sample(cfg.model), init_key_map=init_key_map)


def data_totals(ctx, loader) -> dict:
    """Conversations, tokens, text-only micro-batches and truncated conversations, summed over DP."""
    counts = torch.tensor([loader.samples_seen, loader.tokens_seen, loader.text_batches, loader.truncated]
                          if loader is not None and ctx.tp_rank == 0 else [0, 0, 0, 0],
                          dtype=torch.float64, device=ctx.device)
    dist.all_reduce(counts)
    seen, tokens, text, cut = (int(v) for v in counts.tolist())
    return {"data_conversations_read": seen, "data_tokens_read": tokens, "data_text_only_micro_batches": text,
            "data_conversations_truncated": cut}


def vlm_flops_per_sample(m: VLMConfig) -> float:
    """Training FLOPs of one sequence of model.llm.seq_length positions with one image: the LLM's
    (engine.flops' decoder formula) plus the vision tower's layers forward only (3x when it trains)
    and the connector's matmuls. Frozen parts still run forward and pass gradients back where a
    trained part lies before them; counted as trained (the MFU convention)."""
    llm = m.llm
    per_token = gpt_flops_per_token(num_layers=llm.num_layers, hidden=llm.hidden_size, ffn=llm.ffn_hidden_size,
                                    num_heads=llm.num_attention_heads, seq_len=llm.seq_length,
                                    vocab_size=llm.vocab_size, num_query_groups=llm.num_query_groups,
                                    kv_channels=llm.kv_channels, gated_mlp=llm.activation in ("swiglu", "geglu"))
    v = m.vision
    layer = transformer_layer_flops(v.seq_length, v.hidden_size, v.ffn_hidden_size, v.num_attention_heads, None, None,
                                    False)
    vision = 3 * v.layers_used * sum(layer.values())
    connector = 3 * 2 * v.num_features * (v.hidden_size * llm.hidden_size + llm.hidden_size ** 2)
    return per_token * llm.seq_length + vision + connector


def preflight(cfg) -> list[str]:
    problems = vision_problems(cfg.model)
    # The VLM sets these once for the tower and the LLM (model.*); the LLM section's copies are not read.
    llm_defaults = LLMConfig()
    for key in ("attention_backend", "use_flash_attention", "megatron_amp_O2"):
        if getattr(cfg.model.llm, key) != getattr(llm_defaults, key):
            problems.append(f"model.llm.{key}={getattr(cfg.model.llm, key)!r} is not read: the VLM sets it for the "
                            f"vision tower and the LLM together, use model.{key}")
    data = cfg.data
    if data.train_data is None:
        from data.vlm_synthetic import vocab_size

        if data.tokenizer.path is not None:
            problems.append(f"data.tokenizer.path={data.tokenizer.path} is set without data.train_data: the synthetic "
                            "set uses its own word-level tokenizer")
        if vocab_size() > cfg.model.llm.vocab_size:
            problems.append(f"model.llm.vocab_size={cfg.model.llm.vocab_size} is smaller than the synthetic set's "
                            f"{vocab_size()} tokens")
        if data.synthetic.image_size != cfg.model.vision.img_h or cfg.model.vision.img_h != cfg.model.vision.img_w:
            problems.append(f"data.synthetic.image_size={data.synthetic.image_size} must equal model.vision.img_h and "
                            f"img_w ({cfg.model.vision.img_h}x{cfg.model.vision.img_w})")
        if data.text_batch_fraction > 0 and data.use_captions:
            problems.append("data.text_batch_fraction > 0 with data.use_captions: the synthetic text-only "
                            "conversations are questions, not captions")
    else:
        from models.vlm.data import expand_files

        for key in ("train_data", "text_data", "eval_data"):
            spec = getattr(data, key)
            if spec:
                try:
                    expand_files(spec)
                except FileNotFoundError as exc:
                    problems.append(f"data.{key}: {exc}")
        if data.text_batch_fraction > 0 and not data.text_data:
            problems.append("data.text_batch_fraction > 0 needs data.text_data (text-only conversations)")
        if data.tokenizer.path is None:
            problems.append("data.tokenizer.path is required with data.train_data")
        elif not os.path.exists(data.tokenizer.path):
            problems.append(f"data.tokenizer.path={data.tokenizer.path}: no such file or directory")
    if cfg.model.lora.enabled and not cfg.model.freeze.llm:
        log.info("model.lora.enabled: the LLM's base weights are frozen, its adapters train")
    if cfg.model.init.vision:
        from models.vlm.init import vision_checkpoint_problems

        problems += vision_checkpoint_problems(cfg.model.init.vision, cfg.model.vision)
    if cfg.model.init.llm and not os.path.exists(cfg.model.init.llm):
        problems.append(f"model.init.llm={cfg.model.init.llm}: no such file or directory")
    return problems


def check_layout(cfg, tp: int, pp: int) -> list[str]:
    m = cfg.model
    problems = llm_layout_problems(m.llm, tp, pp)
    problems = [p.replace("model.", "model.llm.", 1) for p in problems]
    v = m.vision
    for key, value in (("num_attention_heads", v.num_attention_heads), ("ffn_hidden_size", v.ffn_hidden_size)):
        if value % tp:
            problems.append(f"model.vision.{key}={value} is not divisible by tensor_model_parallel_size={tp}")
    return problems + connector_layout_problems(m.connector, v.hidden_size, m.llm.hidden_size, tp)


def reference_model(model_cfg: VLMConfig) -> VLMModel:
    return VLMModel(model_cfg, pre_process=True, post_process=True, tensor_model_parallel_size=1,
                    pipeline_model_parallel_size=1, use_cpu_initialization=True)


def vocab_rows(model_cfg: VLMConfig, tp: int) -> int:
    return llm_vocab_rows(model_cfg.llm, tp)


VLM = ModelFamily(
    name="vlm",
    config_cls=VLMExperimentConfig,
    build=build,
    check_layout=check_layout,
    reference_model=reference_model,
    vocab_rows=vocab_rows,
    entry_point="examples/pretrain_vlm.py",
    preflight=preflight,
    description="VLM: CLIP ViT + mlp2x_gelu / perceiver connector + Llama-style LLM on conversations (LLaVA-style "
                "pretraining and instruction tuning, full or LoRA)",
)
