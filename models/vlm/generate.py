"""Answer questions about images with a `VLMModel`: each image is encoded once (vision tower and
connector), spliced into the prompt's token embeddings, and the LLM's own generation loop
(models/llm/generate.py: KV cache or none, greedy / temperature / top-k / top-p, left padding,
stop on the end-of-turn token, any TP) continues from those embeddings.

Prompts go through the training template with an open last turn (`encode_conversation(...,
prompt_only=True)`), so the model sees exactly the layout it was trained on, up to where its
answer starts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.llm.generate import generate
from models.vlm.sequence import encode_conversation, expand_images


@dataclass
class VLMAnswer:
    token_ids: list
    text: str
    finished: bool


def stop_token_id(tokenizer, template) -> int:
    """The id generation stops on: data.template.stop_token (the end-of-turn token the responses
    were trained to end with), else the tokenizer's end-of-text."""
    if template.stop_token:
        ids = tokenizer.encode(template.stop_token)
        if len(ids) != 1:
            raise ValueError(f"data.template.stop_token={template.stop_token!r} is not one token of the tokenizer")
        return ids[0]
    return tokenizer.eot_id


def prompt_batch(model, prompts: list, tokenizer, template) -> dict:
    """Left-padded {"tokens", "image_index", "attention_mask"} [b, L] and the images [n, 3, H, W] of
    `prompts`: [{"images": [tensor [3, H, W], ...], "turns": [(instruction, response), ..., (question, None)]}]."""
    max_length = model.cfg.llm.max_position_embeddings
    expanded, images = [], []
    for prompt in prompts:
        enc = encode_conversation(prompt["turns"], tokenizer, template, len(prompt["images"]), prompt_only=True)
        enc.ids.append(tokenizer.pad_id)  # expand_images shifts by one: keep the whole prompt as inputs
        enc.loss_mask.append(0)
        item = expand_images(enc, model.image_tokens, max_length, tokenizer.pad_id)
        if item.truncated:
            raise ValueError(f"a prompt of {len(item.tokens)}+ positions exceeds model.llm.max_position_embeddings")
        expanded.append(item)
        images.extend(prompt["images"][: item.num_images])
    length = max(len(e.tokens) for e in expanded)
    rows = len(prompts)
    tokens = torch.full((rows, length), tokenizer.pad_id, dtype=torch.long)
    image_index = torch.full((rows, length), -1, dtype=torch.long)
    attention_mask = torch.zeros((rows, length), dtype=torch.long)
    offset = 0
    for row, item in enumerate(expanded):
        n = len(item.tokens)
        tokens[row, length - n:] = item.tokens
        index = item.image_index
        image_index[row, length - n:] = torch.where(index >= 0, index + offset, index)
        attention_mask[row, length - n:] = 1
        offset += item.num_images * item.image_tokens
    return {"tokens": tokens, "image_index": image_index, "attention_mask": attention_mask,
            "images": torch.stack(images) if images else None}


@torch.no_grad()
def answer(model, prompts: list, tokenizer, template, *, max_new_tokens: int = 16, do_sample: bool = False,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, use_cache: bool = True,
           seed: int = 0) -> list[VLMAnswer]:
    """Generate an answer to each prompt (a batch, left-padded). Collective over TP ranks."""
    device = next(model.parameters()).device
    batch = prompt_batch(model, prompts, tokenizer, template)
    was_training = model.training
    model.eval()
    try:
        image_embeds = model.image_embeddings(batch["images"].to(device)) if batch["images"] is not None else None
        embeds = model.input_embeddings(batch["tokens"].to(device), image_index=batch["image_index"].to(device),
                                        image_embeds=image_embeds)
    finally:
        model.train(was_training)
    stop = stop_token_id(tokenizer, template)
    out = generate(model.llm, inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                   max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=tokenizer.pad_id,
                   do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, use_cache=use_cache,
                   seed=seed)
    answers = []
    for ids, finished in zip(out.tokens.tolist(), out.finished.tolist()):
        if finished:
            ids = ids[: ids.index(stop)]  # the answer without its end-of-turn token
        answers.append(VLMAnswer(ids, tokenizer.decode(ids).strip(), bool(finished)))
    return answers
