"""The LLM family: a Llama-architecture decoder pre-trained on packed text, from one
`LLMExperimentConfig`, registered with the engine as `LLM` (see `engine.family`).

Data: WebDataset `txt` shards or jsonl files with a Hugging Face tokenizer.json or a SentencePiece
model; without `data.train_shards`, a synthetic corpus from an order-2 Markov source whose entropy
rate is known (data/text_synthetic.py), so the validation loss is reported beside the floor no
model can beat (`entropy_floor`), the true source's own loss on the same windows (`source_nll`)
and the model's distance to the floor (`gap`).

Pipeline: the first stage reads tokens, the last reads labels and the loss mask (both get loaders
built with the same arguments, so they yield the same batches); middle stages read nothing.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from data.text import build_text_dataloader, expand_text_shards
from data.tokenizers import Tokenizer, build_tokenizer
from engine.family import ModelFamily, TrainingParts
from engine.flops import gpt_flops_per_token
from engine.precision import PrecisionPlan
from engine.schema import NEMO_GENERIC_ALIASES
from engine.schedules import pipelined_forward
from models.common.attention import announce_attention_backend
from models.llm.config import (
    LLMConfig,
    LLMExperimentConfig,
    llm_layout_problems,
    llm_vocab_rows,
)
from models.llm.model import LLMModel, count_parameters, llm_forward_step
from parallel.p2p import StageLink

log = logging.getLogger("engine")


@dataclass
class LLMData:
    train_shards: list[str]
    eval_shards: list[str]
    tokenizer: Tokenizer
    source: object | None = None  # data.text_synthetic.MarkovSource of the synthetic corpus
    token_to_symbol: torch.Tensor | None = None  # token id -> the source's symbol (synthetic corpus)
    entropies: dict | None = None  # the source's exact entropies (nats per token)


def _synthetic_params(cfg):
    from data.text_synthetic import MarkovParams

    syn = cfg.data.synthetic
    return MarkovParams(num_words=syn.num_words, branching=syn.branching, alpha=syn.alpha,
                        mean_doc_words=syn.mean_doc_words, seed=syn.seed)


def synthetic_vocab_size(cfg) -> int:
    """Tokens of the synthetic corpus's word-level tokenizer: the special tokens and one per word."""
    from data.text_synthetic import SPECIAL_TOKENS

    return len(SPECIAL_TOKENS) + cfg.data.synthetic.num_words


def load_tokenizer(tok_cfg, path: str) -> Tokenizer:
    """The run's tokenizer: a language model's own, so SentencePiece keeps case and may lack a pad
    piece (Llama 2's; padding then uses eos)."""
    if tok_cfg.type == "sentencepiece":
        return build_tokenizer("sentencepiece", path, lowercase=False, require_pad=False)
    special = {k: v for k, v in (("bos_token", tok_cfg.bos_token), ("eos_token", tok_cfg.eos_token)) if v is not None}
    return build_tokenizer("huggingface", path, **special)


def prepare_data(cfg, ctx) -> LLMData:
    """Shards and tokenizer; without `data.train_shards` the synthetic corpus is written first
    (on global rank 0, the others wait; skipped when it is already there)."""
    data = cfg.data
    if data.train_shards is not None:
        return LLMData(expand_text_shards(data.train_shards),
                       expand_text_shards(data.eval_shards) if data.eval_shards else [],
                       load_tokenizer(data.tokenizer, data.tokenizer.path))
    from data.text_synthetic import generate_markov_corpus, load_source, token_to_symbol_map

    syn = data.synthetic
    if ctx.rank == 0:
        generate_markov_corpus(syn.out_dir, num_train=syn.num_train, num_eval=syn.num_eval,
                               docs_per_shard=syn.docs_per_shard, params=_synthetic_params(cfg))
    dist.barrier()
    source = load_source(syn.out_dir)
    tokenizer = load_tokenizer(data.tokenizer, os.path.join(syn.out_dir, "tokenizer.json"))
    return LLMData(expand_text_shards(os.path.join(syn.out_dir, "train-*.tar")),
                   expand_text_shards(os.path.join(syn.out_dir, "eval-*.tar")) if syn.num_eval else [],
                   tokenizer, source, token_to_symbol_map(tokenizer, source), source.entropies())


def build_model(cfg, ctx, precision: PrecisionPlan) -> LLMModel:
    model = LLMModel(cfg.model, use_cpu_initialization=ctx.device.type == "cpu",
                     sequence_parallel=cfg.parallel.sequence_parallel, **precision.transformer_overrides()).to(ctx.device)
    # Every parameter is megatron's, created in the precision's dtype; the rotary frequencies
    # (a buffer) stay fp32, which is why the model is not cast as a whole.
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {precision.params_dtype}:
        raise RuntimeError(f"LLM parameters in {sorted(map(str, dtypes))}, expected {precision.params_dtype}")
    announce_attention_backend(model.attention_backend, ctx.device)
    if ctx.is_logging_rank:
        log.info("LLM: %.2fM parameters on this rank (%d layers of %d on this stage, TP=%d); vocabulary %d, padded "
                 "to %d", count_parameters(model) / 1e6, len(model.decoder.layers), cfg.model.num_layers,
                 ctx.dims.tp, cfg.model.vocab_size, model.padded_vocab_size)
    return model


def _text_loader(cfg, data: LLMData, shards, *, dp_rank, dp_size, batch_size, train: bool):
    return build_text_dataloader(
        shards, dp_rank=dp_rank, dp_size=dp_size, batch_size=batch_size, tokenizer=data.tokenizer,
        seq_length=cfg.model.seq_length, shuffle_buffer=cfg.data.shuffle_buffer if train else 0,
        seed=cfg.trainer.seed if train else 0, infinite=train, text_key=cfg.data.text_key,
        eod_mask_loss=cfg.data.eod_mask_loss, add_bos=cfg.data.add_bos)


def make_eval_fn(cfg, ctx, model: LLMModel, data: LLMData, link: StageLink | None):
    """Validation loss over the eval set (or its first `eval.num_batches` batches), forward only
    through the pipeline. Every rank reads the same eval stream and DP rank r runs batches r,
    r + DP, ...; the token-weighted sums are reduced over DP and PP, so every rank reports the
    same numbers, and they do not depend on the layout."""
    if not data.eval_shards:
        return None
    floor = None
    if data.entropies is not None:
        from data.text_synthetic import source_nll, window_entropy_floor

        floor = window_entropy_floor(data.entropies, cfg.model.seq_length)

    def evaluate(step: int) -> dict:
        model.eval()
        loader = _text_loader(cfg, data, data.eval_shards, dp_rank=0, dp_size=1, batch_size=cfg.eval.batch_size,
                              train=False)
        # [model nll sum, predicted tokens, source nll sum], float64 so the sums are exact enough
        sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)
        for index, batch in enumerate(loader):
            if cfg.eval.num_batches and index >= cfg.eval.num_batches:
                break
            if index % ctx.dims.dp != ctx.dp_rank:
                continue
            tokens, labels = batch["tokens"].to(ctx.device), batch["labels"].to(ctx.device)
            mask = batch["loss_mask"].to(ctx.device)
            out = pipelined_forward(model, link, model.stage_forward, tokens, labels, mask)
            if out is not None:  # the last stage
                count = batch["loss_mask"].sum().double()
                sums[0] += out["loss"].double() * count
                sums[1] += count
                if data.source is not None:
                    sums[2] += source_nll(data.source, data.token_to_symbol, batch["tokens"], batch["labels"],
                                          batch["loss_mask"]) * count
        model.train()
        if link is not None:
            dist.all_reduce(sums, group=ctx.pp_group)
        dist.all_reduce(sums, group=ctx.dp_group)
        tokens_counted = max(sums[1].item(), 1.0)
        metrics = {"val_loss": sums[0].item() / tokens_counted, "val_tokens": sums[1].item()}
        if data.source is not None:
            metrics["source_nll"] = sums[2].item() / tokens_counted
            if floor is not None and not cfg.data.eod_mask_loss:  # the floor counts every position
                metrics["entropy_floor"] = floor
                metrics["gap"] = metrics["val_loss"] - floor
        return metrics

    return evaluate


def build(cfg, ctx, precision: PrecisionPlan) -> TrainingParts:
    """This rank's share of an LLM run: the stage's model, the packed text loader on the first and
    the last stage (tokens and labels), the validation loss through the pipeline."""
    data = prepare_data(cfg, ctx)
    if data.tokenizer.vocab_size > cfg.model.vocab_size:  # preflight catches this for files it can read
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                         f"{data.tokenizer.vocab_size} tokens")
    if data.entropies is not None and ctx.is_logging_rank:
        from data.text_synthetic import window_entropy_floor

        log.info("synthetic Markov corpus in %s: entropy rate %.4f nats/token, first position %.4f; floor of a "
                 "%d-token window %.4f nats/token", cfg.data.synthetic.out_dir, data.entropies["entropy_rate_nats"],
                 data.entropies["first_position_nats"], cfg.model.seq_length,
                 window_entropy_floor(data.entropies, cfg.model.seq_length))
    if cfg.checkpoint.init_from and ctx.is_logging_rank:
        warn_model_differs_from_init(cfg)
    model = build_model(cfg, ctx, precision)
    train_loader = None
    if model.pre_process or model.post_process:
        train_loader = _text_loader(cfg, data, data.train_shards, dp_rank=ctx.dp_rank, dp_size=ctx.dims.dp,
                                    batch_size=cfg.trainer.micro_batch_size, train=True)
    link = StageLink(ctx.device) if ctx.dims.pp > 1 else None  # evaluation's own forward-only link
    return TrainingParts(model=model, forward_step=llm_forward_step, train_loader=train_loader,
                         eval_fn=make_eval_fn(cfg, ctx, model, data, link),
                         summary=partial(data_totals, ctx, train_loader if model.pre_process else None),
                         flops_per_sample=llm_flops_per_sequence(cfg.model))


def warn_model_differs_from_init(cfg) -> None:
    """`checkpoint.init_from` loads weights by name and shape only; a model section that differs from
    the one the checkpoint was written with in anything else (norm epsilon, RoPE base or scaling,
    a Hugging Face import's settings) would run other numerics on the same weights. Say which keys."""
    from dataclasses import asdict

    from engine.checkpoint.manager import resolve_checkpoint
    from engine.checkpoint.reader import CheckpointReader
    from engine.checkpoint.storage import CheckpointError
    from engine.checkpoint.tools import config_from_yaml
    from engine.config import _flatten

    try:
        meta = CheckpointReader(resolve_checkpoint(cfg.checkpoint.init_from)).meta
        if meta.get("family") != "llm":
            return  # loading will name the mismatch
        saved = _flatten(asdict(config_from_yaml(meta["config_yaml"], LLM).model))
    except (CheckpointError, OSError, KeyError):
        return  # loading will name what is wrong with the checkpoint
    ours = _flatten(asdict(cfg.model))
    ignore = ("seq_length", "hidden_dropout", "attention_dropout", "attention_backend", "use_flash_attention",
              "megatron_amp_O2", "activations_checkpoint_granularity", "activations_checkpoint_method",
              "activations_checkpoint_num_layers")  # training choices, not the function the weights compute
    changed = [f"model.{k}: {saved[k]!r} in the checkpoint, {ours.get(k)!r} here" for k in sorted(saved)
               if k not in ignore and saved[k] != ours.get(k)]
    if changed:
        log.warning("checkpoint.init_from=%s was written with another model section; the weights load, but these "
                    "keys change what they compute: %s (take them from the checkpoint's config: `python "
                    "examples/convert_checkpoint.py inspect %s`)", cfg.checkpoint.init_from, "; ".join(changed),
                    cfg.checkpoint.init_from)


def llm_flops_per_sequence(model_cfg: LLMConfig) -> float:
    """Model FLOPs of one training sample (a sequence of seq_length tokens), engine.flops' decoder
    formula: 6 * N * S (N the matmul parameters: layer linears and the output layer over the true
    vocabulary, not the embedding lookup) + 12 * L * S^2 * heads * head_dim, causal not discounted."""
    m = model_cfg
    per_token = gpt_flops_per_token(num_layers=m.num_layers, hidden=m.hidden_size, ffn=m.ffn_hidden_size,
                                    num_heads=m.num_attention_heads, seq_len=m.seq_length, vocab_size=m.vocab_size,
                                    num_query_groups=m.num_query_groups, kv_channels=m.kv_channels,
                                    gated_mlp=m.activation in ("swiglu", "geglu"))
    return per_token * m.seq_length


def data_totals(ctx, train_loader) -> dict:
    """Sequences and tokens read, documents and shard reads skipped, summed over data-parallel
    replicas (collective). One rank per replica counts: TP rank 0 of the first stage."""
    stats = train_loader.stats if train_loader is not None and ctx.tp_rank == 0 else None
    counts = torch.tensor([stats.samples_seen, train_loader.tokens_seen, stats.samples_skipped, stats.shards_skipped]
                          if stats else [0, 0, 0, 0], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(counts)
    seen, tokens, skipped, shards = (int(v) for v in counts.tolist())
    return {"data_sequences_read": seen, "data_tokens_read": tokens, "data_documents_skipped": skipped,
            "data_shard_reads_skipped": shards}


def preflight(cfg) -> list[str]:
    """What can be checked before any process group exists: shards, the tokenizer (it loads, has an
    end-of-text token, fits model.vocab_size) and the synthetic corpus's settings."""
    data, problems = cfg.data, []
    tok = data.tokenizer
    if data.train_shards is None:
        if data.eval_shards is not None:
            problems.append("data.eval_shards is set without data.train_shards: give both, or neither for the "
                            "synthetic corpus")
        if tok.path is not None:
            problems.append(f"data.tokenizer.path={tok.path} is set without data.train_shards: the synthetic corpus "
                            "uses its own word-level tokenizer (unset data.tokenizer.path or give data.train_shards)")
        if tok.type != "huggingface":
            problems.append(f"data.tokenizer.type={tok.type}: the synthetic corpus's tokenizer is a Hugging Face "
                            "tokenizer.json (data.tokenizer.type=huggingface)")
        syn = data.synthetic
        if syn.branching > syn.num_words:
            problems.append(f"data.synthetic.branching={syn.branching} exceeds data.synthetic.num_words={syn.num_words}")
        vocab = synthetic_vocab_size(cfg)
        if vocab > cfg.model.vocab_size:
            problems.append(f"model.vocab_size={cfg.model.vocab_size} is smaller than the synthetic corpus's {vocab} "
                            f"tokens (data.synthetic.num_words={syn.num_words} + 4 special): set "
                            f"model.vocab_size={vocab}")
        return problems
    for key in ("train_shards", "eval_shards"):
        spec = getattr(data, key)
        if spec is not None:
            try:
                shards = expand_text_shards(spec)
            except FileNotFoundError as exc:
                problems.append(f"data.{key}: {exc}")
                continue
            missing = [s for s in shards if not os.path.exists(s)]
            if len(missing) == len(shards):
                problems.append(f"data.{key}={spec}: none of its {len(shards)} shards exists (first: {missing[0]})")
            elif missing:  # the reader skips them with a warning each time; say so once up front
                log.warning("data.%s: %d of %d shards do not exist (first: %s); they will be skipped", key,
                            len(missing), len(shards), missing[0])
    if tok.path is None:
        problems.append(f"data.tokenizer.path is required with data.train_shards (a tokenizer.json for "
                        f"data.tokenizer.type=huggingface, a .model for sentencepiece); got type={tok.type}")
    elif not os.path.exists(tok.path):
        problems.append(f"data.tokenizer.path={tok.path}: no such file or directory")
    else:
        try:
            tokenizer = load_tokenizer(tok, tok.path)
        except (ValueError, FileNotFoundError) as exc:
            problems.append(f"data.tokenizer.path: {exc}")
        else:
            if tokenizer.vocab_size > cfg.model.vocab_size:
                problems.append(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                                f"{tokenizer.vocab_size} tokens ({tok.path}): set model.vocab_size="
                                f"{tokenizer.vocab_size} (or use the model's own tokenizer)")
    return problems


def check_layout(cfg, tp: int, pp: int) -> list[str]:
    return llm_layout_problems(cfg.model, tp, pp)


def reference_model(model_cfg: LLMConfig) -> LLMModel:
    return LLMModel(model_cfg, pre_process=True, post_process=True, tensor_model_parallel_size=1,
                    pipeline_model_parallel_size=1, use_cpu_initialization=True)


# NeMo's megatron_gpt_config.yaml places parallel, batch and optimizer keys under model.*, and calls
# the sequence length encoder_seq_length: a NeMo user's keys work here, each use logged once.
NEMO_ALIASES = {
    **NEMO_GENERIC_ALIASES,
    "model.encoder_seq_length": "model.seq_length",
    "model.data.eod_mask_loss": "data.eod_mask_loss",
}

LLM = ModelFamily(
    name="llm",
    config_cls=LLMExperimentConfig,
    build=build,
    check_layout=check_layout,
    reference_model=reference_model,
    vocab_rows=llm_vocab_rows,
    entry_point="examples/pretrain_llm.py",
    preflight=preflight,
    config_aliases=NEMO_ALIASES,
    description="LLM: Llama-architecture decoder (RMSNorm, GQA, RoPE, SwiGLU) on packed text; tiny, "
                "Llama-3.2-1B and Llama-3-8B shapes",
)
