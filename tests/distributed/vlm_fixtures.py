"""Tiny VLM configs and hand-built micro-batches shared by the VLM tests (CPU, fp32)."""
from __future__ import annotations

import torch

VOCAB, SEQ, IMG = 60, 24, 16


def tiny_vlm_config(connector: str = "mlp", *, use_cls: bool = False, feature_select_index: int = -2,
                    tied: bool = False, llm_layers: int = 2):
    from models.llm.config import llm_preset
    from models.vlm.config import (
        ConnectorConfig,
        PerceiverResamplerConfig,
        VLMConfig,
        VLMVisionConfig,
    )

    vision = VLMVisionConfig(patch_dim=8, img_h=IMG, img_w=IMG, num_layers=3, hidden_size=32, ffn_hidden_size=64,
                             num_attention_heads=4, feature_select_index=feature_select_index, use_cls=use_cls)
    perceiver = PerceiverResamplerConfig(hidden_size=48, n_latents=3, n_heads=4, head_dim=8, n_query_groups=2,
                                         ffn_hidden_size=64)
    llm = llm_preset("tiny", num_layers=llm_layers, vocab_size=VOCAB, seq_length=SEQ, ffn_hidden_size=96,
                     make_vocab_size_divisible_by=16, share_embeddings_and_output_weights=tied)
    return VLMConfig(vision=vision, connector=ConnectorConfig(type=connector, perceiver=perceiver), llm=llm)


def conversation_batches(image_tokens: int, num_micro_batches: int = 4, rows: int = 2, text_only: tuple = (2,),
                         seed: int = 5) -> list[dict]:
    """Micro-batches from random token conversations with 0-2 images per row (placeholders at
    random places), expanded and collated by models.vlm.sequence at the fixed length SEQ; the
    micro-batches in `text_only` hold no image at all."""
    from models.vlm.sequence import (
        IMAGE_PLACEHOLDER,
        EncodedConversation,
        collate,
        expand_images,
    )

    gen = torch.Generator().manual_seed(seed)
    batches = []
    for k in range(num_micro_batches):
        samples, images = [], []
        for row in range(rows):
            n_images = 0 if k in text_only else (1 + row) % 3
            text_len = SEQ + 1 - n_images * image_tokens - int(torch.randint(0, 4, (1,), generator=gen))
            ids = torch.randint(3, VOCAB, (text_len,), generator=gen).tolist()
            for _ in range(n_images):
                ids.insert(int(torch.randint(1, len(ids), (1,), generator=gen)), IMAGE_PLACEHOLDER)
            mask = (torch.rand(len(ids), generator=gen) > 0.3).long().tolist()
            samples.append(expand_images(EncodedConversation(ids, mask), image_tokens, SEQ, pad_id=0))
            images.append(torch.randn(n_images, 3, IMG, IMG, generator=gen) if n_images else None)
        batches.append(collate(samples, images, pad_id=0, length=SEQ, image_shape=(3, IMG, IMG)))
    return batches
