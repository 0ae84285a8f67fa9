"""Data config sections more than one model family uses."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class TokenizerConfig:
    type: str = "sentencepiece"  # sentencepiece | clip_bpe
    path: Optional[str] = None  # a .model (sentencepiece) or bpe_simple_vocab_16e6.txt.gz (clip_bpe)
    vocab_size: int = 1000  # when training a SentencePiece model from the captions
