"""Autoregressive generation for `LLMModel`: greedy or sampled (temperature, top-k, top-p), with a
KV cache or without, batches of left-padded prompts, stop on end-of-sequence, at any TP.

Prompts are token ids or precomputed input embeddings (`inputs_embeds`: a VLM splices image
features into the token embeddings of `model.embed_tokens`). Left padding follows Hugging Face's
`generate`: pad keys are masked, and each row's positions count its real tokens from 0
(cumsum of the attention mask), so a padded row computes what it would alone.

Every TP rank runs the same loop: logits are gathered over TP, so each rank picks the same token
from the same generator state; the pick is still broadcast from the first TP rank so ranks can
never drift apart. Pipeline parallelism is refused (a PP-sharded model must be gathered onto one
stage first, e.g. loaded at pipeline_model_parallel_size=1), as is sequence parallelism (a
single decoding position cannot be split over TP ranks; build the model without it, same
weights), as are the flash and te attention backends (the KV cache and the padding mask live
in the sdpa core attention).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from models.common.kv_cache import KVCache


@dataclass
class GenerationOutput:
    tokens: torch.Tensor  # [b, n] new tokens; after a row's end-of-sequence token, pad_token_id
    sequences: torch.Tensor | None  # [b, L + n] prompt + new tokens (token-id prompts only), as HF returns
    finished: torch.Tensor  # [b] bool: the row produced an end-of-sequence token


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> (input_ids [b, L], attention_mask [b, L]) padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, length - len(prompt):] = 1
    return ids, mask


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering of [b, V] logits, as Hugging Face's
    logits warpers in that order; removed entries are -inf. The most likely token always stays."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive (use greedy decoding for 0)")
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
        remove_sorted = mass_before >= top_p
        remove_sorted[..., 0] = False
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def select_next_tokens(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
                       generator: torch.Generator | None) -> torch.Tensor:
    """[b, V] logits -> [b] token ids."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float(), temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generation_mask(key_valid: torch.Tensor, query_start: int, query_len: int) -> torch.Tensor:
    """megatron boolean mask [b, 1, q, k] (True = masked): query column i (from `query_start`)
    attends key columns j <= i that hold real tokens. A padding query attends to itself so its
    (discarded) row never becomes all-masked, which would turn into NaNs."""
    keys = key_valid.shape[1]
    q = torch.arange(query_start, query_start + query_len, device=key_valid.device)[:, None]
    k = torch.arange(keys, device=key_valid.device)[None, :]
    allowed = (k <= q)[None] & key_valid[:, None, :].bool()
    allowed = allowed | (k == q)[None]
    return ~allowed[:, None]


PIPELINE_REFUSED = ("generation runs the whole model on one pipeline stage; load the checkpoint at "
                    "pipeline_model_parallel_size=1 (any TP) to generate")


def _check_model(model) -> None:
    if not (model.pre_process and model.post_process):
        raise ValueError(PIPELINE_REFUSED)
    if model.attention_backend != "sdpa":
        raise ValueError(f"generation runs on attention_backend=sdpa (the KV cache and the padding mask live "
                         f"there); this model uses {model.attention_backend!r}: build it with sdpa (on GPU, SDPA "
                         "picks the flash kernel itself)")
    if model.sequence_parallel.enabled:
        raise ValueError("generation needs sequence_parallel=false (one decoding position cannot be split "
                         "over TP ranks); build the model without it, the weights are the same")


def _broadcast_over_tp(tokens: torch.Tensor) -> torch.Tensor:
    if not parallel_state.model_parallel_is_initialized() or parallel_state.get_tensor_model_parallel_world_size() == 1:
        return tokens
    group = parallel_state.get_tensor_model_parallel_group()
    dist.broadcast(tokens, dist.get_global_rank(group, 0), group=group)
    return tokens


@torch.no_grad()
def generate(model, input_ids: torch.Tensor | Sequence[Sequence[int]] | None = None, *,
             attention_mask: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
             max_new_tokens: int = 32, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, use_cache: bool = True, seed: int = 0) -> GenerationOutput:
    """Continue each prompt by up to `max_new_tokens` tokens; stops early once every row has
    produced an `eos_token_id`.

    input_ids: [b, L] (left-padded, with `attention_mask` [b, L], 1 = real token) or a list of
    token-id lists (padded here). inputs_embeds: [b, L, hidden] instead of ids (with the same
    attention mask). Greedy unless `do_sample`; `seed` drives sampling, the same on every TP rank.
    """
    _check_model(model)
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give input_ids or inputs_embeds (one of them)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    device = next(model.parameters()).device
    if input_ids is not None and not torch.is_tensor(input_ids):
        input_ids, attention_mask = left_pad(input_ids, pad)
    prompt = input_ids if input_ids is not None else inputs_embeds
    batch, length = prompt.shape[:2]
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask = attention_mask.to(device)
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded: the last column of attention_mask must be 1 in every row")
    total = length + max_new_tokens
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if int(positions[:, -1].max()) + max_new_tokens >= model.cfg.max_position_embeddings:
        raise ValueError(f"prompt + max_new_tokens reaches position {int(positions[:, -1].max()) + max_new_tokens}, "
                         f"beyond model.max_position_embeddings={model.cfg.max_position_embeddings}")
    key_valid = torch.cat([attention_mask.bool(), attention_mask.new_ones(batch, max_new_tokens, dtype=torch.bool)], 1)
    if input_ids is not None:
        input_ids = input_ids.to(device)
    else:
        inputs_embeds = inputs_embeds.to(device)
    generator = torch.Generator(device=device).manual_seed(seed) if do_sample else None
    was_training = model.training
    model.eval()
    cache = KVCache(total) if use_cache else None
    new_tokens = []
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
    try:
        # The prompt (prefill): the whole prompt, with or without the cache.
        logits = _step(model, cache, input_ids, inputs_embeds, positions, key_valid[:, :length], 0)
        for step in range(max_new_tokens):
            next_tokens = select_next_tokens(logits[:, -1].float(), do_sample, temperature, top_k, top_p, generator)
            next_tokens = _broadcast_over_tp(next_tokens.contiguous())
            next_tokens = torch.where(finished, torch.full_like(next_tokens, pad), next_tokens)
            new_tokens.append(next_tokens)
            if eos:
                finished |= torch.isin(next_tokens, eos_ids)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            end = length + step + 1
            next_positions = positions[:, -1:] + step + 1
            if cache is not None:
                logits = _step(model, cache, next_tokens[:, None], None, next_positions, key_valid[:, :end], end - 1)
            else:
                generated = torch.stack(new_tokens, dim=1)
                all_positions = torch.cat([positions, positions[:, -1:] + torch.arange(1, step + 2, device=device)], 1)
                if input_ids is not None:
                    logits = _step(model, None, torch.cat([input_ids, generated], 1), None, all_positions,
                                   key_valid[:, :end], 0)
                else:
                    embeds = torch.cat([inputs_embeds, model.embed_tokens(generated).to(inputs_embeds.dtype)], 1)
                    logits = _step(model, None, None, embeds, all_positions, key_valid[:, :end], 0)
    finally:
        model.train(was_training)
    tokens = torch.stack(new_tokens, dim=1)
    sequences = torch.cat([input_ids, tokens], dim=1) if input_ids is not None else None
    return GenerationOutput(tokens, sequences, finished)


def _step(model, cache: KVCache | None, tokens, embeds, positions, key_valid, query_start: int) -> torch.Tensor:
    """Logits of the last position [b, 1, V] for the given new positions (all of them without a cache)."""
    query_len = (tokens if tokens is not None else embeds).shape[1]
    mask = generation_mask(key_valid, query_start, query_len)
    kwargs = dict(tokens=tokens, inputs_embeds=embeds, position_ids=positions, attention_mask=mask,
                  last_position_only=True)
    if cache is None:
        return model.stage_forward(**kwargs)["logits"]
    with cache.active():
        logits = model.stage_forward(**kwargs)["logits"]
    cache.advance(query_len)
    return logits
