"""Conversations -> the VLM's training sequences: prompt templates, image placeholder expansion,
truncation, batching.

1. `encode_conversation`: the template's bos token, the system prompt, then per turn
   `instruction_template` (no loss) and `response_template` (loss, its end-of-turn token
   included), so a multi-turn conversation is masked turn by turn. Each image marker in the text
   becomes one placeholder id (`IMAGE_PLACEHOLDER`, never a vocabulary id, so a tokenizer needs no
   image token); images a sample names but whose text has no marker go right after the bos token.
2. `expand_images`: each placeholder becomes `image_tokens` positions that take the image's
   embeddings (Megatron-LM's `LLaVAModel._preprocess_data` does this expansion inside the model
   on every step; here it happens once, in the data pipeline, so the first and the last pipeline
   stage read the same, already expanded, batch). Inputs and next-token labels are shifted on the
   expanded sequence; no loss is taken on image positions nor on the prediction of an image's
   first position. Longer sequences are cut to the LLM's length (the caller counts and logs
   them); an image cut off whole is dropped from the sample.
3. `collate`: right-padded batches, the rows of every sample's images concatenated, with
   `image_index` pointing each image position at its row of the flattened image embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGE_PLACEHOLDER = -200  # Megatron-LM / LLaVA's IMAGE_TOKEN_INDEX: never a vocabulary id


@dataclass
class EncodedConversation:
    ids: list  # token ids, IMAGE_PLACEHOLDER where an image goes
    loss_mask: list  # 1 on response tokens (and each response's end-of-turn), 0 elsewhere


def _encode_text(tokenizer, text: str, image_token: str) -> list:
    """Token ids of `text` with one IMAGE_PLACEHOLDER per `image_token` marker."""
    ids = []
    for i, part in enumerate(text.split(image_token)):
        if i:
            ids.append(IMAGE_PLACEHOLDER)
        part = part.strip()
        if part:
            ids.extend(tokenizer.encode(part))
    return ids


def bos_id(tokenizer, template) -> int | None:
    if not template.bos_token:
        return None
    token_to_id = getattr(getattr(tokenizer, "tokenizer", None), "token_to_id", None)
    found = token_to_id(template.bos_token) if token_to_id is not None else None
    if found is None:
        ids = tokenizer.encode(template.bos_token)
        if len(ids) != 1:
            raise ValueError(f"data.template.bos_token={template.bos_token!r} is not one token of the tokenizer")
        found = ids[0]
    return found


def encode_conversation(turns, tokenizer, template, num_images: int = 0, *, prompt_only: bool = False
                        ) -> EncodedConversation:
    """`turns`: [(instruction, response), ...]; the last response may be None with `prompt_only`
    (generation: the sequence ends where the model's answer starts)."""
    ids, mask = [], []
    bos = bos_id(tokenizer, template)
    if bos is not None:
        ids.append(bos)
        mask.append(0)
    markers = sum(instruction.count(template.image_token) for instruction, _ in turns)
    if markers and markers != num_images:
        raise ValueError(f"the conversation has {markers} {template.image_token} markers but {num_images} images")
    if num_images and not markers:  # the image goes right after bos (the seed's image offset)
        ids.extend([IMAGE_PLACEHOLDER] * num_images)
        mask.extend([0] * num_images)
    if template.system_prompt:
        sys_ids = _encode_text(tokenizer, template.system_prompt, template.image_token)
        ids.extend(sys_ids)
        mask.extend([0] * len(sys_ids))
    for index, (instruction, response) in enumerate(turns):
        prompt = _encode_text(tokenizer, template.instruction_template.format(instruction=instruction),
                              template.image_token)
        ids.extend(prompt)
        mask.extend([0] * len(prompt))
        if response is None:
            if not (prompt_only and index == len(turns) - 1):
                raise ValueError("only the last turn of a generation prompt may have no response")
            break
        answer = tokenizer.encode(template.response_template.format(response=response).strip())
        ids.extend(answer)
        mask.extend([1] * len(answer))
    return EncodedConversation(ids, mask)


@dataclass
class ExpandedSample:
    tokens: torch.Tensor  # [L] model inputs (pad id at image positions)
    labels: torch.Tensor  # [L] next token (pad id where there is none)
    loss_mask: torch.Tensor  # [L] float
    image_index: torch.Tensor  # [L] image j's k-th position: j * image_tokens + k; -1 for text
    num_images: int  # images (the first ones of the sample) that keep at least one position
    truncated: bool
    image_tokens: int  # positions per image


def expand_images(encoded: EncodedConversation, image_tokens: int, max_length: int, pad_id: int) -> ExpandedSample:
    """Expand every placeholder to `image_tokens` positions, shift into (inputs, labels) and cut
    to `max_length` inputs."""
    seq, img, mask = [], [], []
    image = 0
    for token, m in zip(encoded.ids, encoded.loss_mask):
        if token == IMAGE_PLACEHOLDER:
            seq.extend([pad_id] * image_tokens)
            img.extend(range(image * image_tokens, (image + 1) * image_tokens))
            mask.extend([0] * image_tokens)
            image += 1
        else:
            seq.append(token)
            img.append(-1)
            mask.append(m)
    truncated = len(seq) - 1 > max_length
    seq, img, mask = seq[: max_length + 1], img[: max_length + 1], mask[: max_length + 1]
    tokens, labels = torch.tensor(seq[:-1]), torch.tensor(seq[1:])
    image_index, label_is_image = torch.tensor(img[:-1]), torch.tensor(img[1:]) >= 0
    loss_mask = torch.tensor(mask[1:], dtype=torch.float32).masked_fill(label_is_image, 0.0)
    labels = labels.masked_fill(label_is_image, pad_id)
    kept = int(image_index.max()) // image_tokens + 1 if bool((image_index >= 0).any()) else 0
    return ExpandedSample(tokens, labels, loss_mask, image_index, kept, truncated, image_tokens)


def collate(samples: list, images: list, pad_id: int, *, pad_to_multiple_of: int = 1, length: int | None = None,
            image_shape: tuple | None = None) -> dict:
    """Right-padded batch of ExpandedSamples; `images[i]` is sample i's [n_i, 3, H, W] (its first
    `samples[i].num_images` are used). `length`: pad every batch to it (pipeline parallelism needs
    one message shape per schedule run)."""
    longest = max(len(s.tokens) for s in samples)
    if length is None:
        length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    elif longest > length:
        raise ValueError(f"a sample of {longest} positions does not fit the batch length {length}")
    rows = len(samples)
    batch = {"tokens": torch.full((rows, length), pad_id, dtype=torch.long),
             "labels": torch.full((rows, length), pad_id, dtype=torch.long),
             "loss_mask": torch.zeros(rows, length),
             "attention_mask": torch.zeros(rows, length, dtype=torch.long),
             "image_index": torch.full((rows, length), -1, dtype=torch.long)}
    kept_images, offset = [], 0
    for row, (sample, sample_images) in enumerate(zip(samples, images)):
        n = len(sample.tokens)
        batch["tokens"][row, :n] = sample.tokens
        batch["labels"][row, :n] = sample.labels
        batch["loss_mask"][row, :n] = sample.loss_mask
        batch["attention_mask"][row, :n] = 1
        if sample.num_images:
            index = sample.image_index
            batch["image_index"][row, :n] = torch.where(index >= 0, index + offset, index)
            kept_images.append(sample_images[: sample.num_images])
            offset += sample.num_images * sample.image_tokens
    if kept_images:
        batch["images"] = torch.cat(kept_images)
    else:
        shape = image_shape or (3, 1, 1)
        batch["images"] = torch.zeros((0, *shape))
    return batch

