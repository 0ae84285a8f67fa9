"""Tokenizers behind one interface: SentencePiece (trained on the captions, or a user's .model),
CLIP's byte-level BPE (from a user-supplied `bpe_simple_vocab_16e6.txt.gz`, as open_clip), and
Hugging Face `tokenizer.json` files (the `tokenizers` package: Llama 3, GPT-2, Mistral, ...).

`tokenizer(texts, context_length)` gives [sot] + ids + [eot] padded to the context length; text that
is too long is cut so the end-of-text token is still the last one (open_clip's behaviour), because
the text tower pools at that position.
"""
from __future__ import annotations

import abc
import gzip
import html
import io
import logging
import os
import re

import torch

log = logging.getLogger(__name__)

TOKENIZER_KINDS = ("sentencepiece", "clip_bpe", "huggingface")


class Tokenizer(abc.ABC):
    vocab_size: int
    sot_id: int
    eot_id: int
    pad_id: int

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids without special tokens."""

    @abc.abstractmethod
    def decode(self, ids) -> str:
        """Text from ids; special tokens are dropped."""

    def __call__(self, texts: str | list[str], context_length: int = 77) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError(f"context_length={context_length}: need room for the start and end tokens")
        out = torch.full((len(texts), context_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_id] + self.encode(text)[: context_length - 2] + [self.eot_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


def eot_positions(tokens: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Index of the first end-of-text token in each row of [B, L] tokens (0 for a row without one)."""
    return (tokens == eot_id).int().argmax(dim=-1)


def _until_eot(ids, sot_id: int, eot_id: int) -> list[int]:
    """Ids as ints without a leading start token and without the end token and what follows it."""
    out = []
    for i in (int(i) for i in ids):
        if i == eot_id:
            break
        if i != sot_id:
            out.append(i)
    return out


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece with pad=0, unk=1, sot=2 (bos), eot=3 (eos) when trained here.

    `lowercase`: lower-case text before encoding (CLIP's captions; a language model's own .model
    keeps case: lowercase=False). `require_pad`: a model without a pad piece (Llama 2's) is
    accepted when False, padding with the eos id.
    """

    def __init__(self, model_path: str, lowercase: bool = True, require_pad: bool = True):
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"SentencePiece model not found: {model_path}")
        self.model_path = model_path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except Exception as exc:  # sentencepiece raises OSError/RuntimeError for corrupt files
            raise ValueError(f"cannot load SentencePiece model {model_path}: {exc}") from exc
        self.lowercase = lowercase
        self.vocab_size = self.sp.GetPieceSize()
        self.pad_id, self.sot_id, self.eot_id = self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()
        if self.pad_id < 0 and not require_pad:
            self.pad_id = self.eot_id
        if min(self.pad_id, self.sot_id, self.eot_id) < 0:
            from data.train_tokenizer import REQUIREMENTS

            raise ValueError(f"{model_path}: pad_id={self.pad_id}, bos_id={self.sot_id}, eos_id={self.eot_id} "
                             f"(-1: missing); {REQUIREMENTS}")

    def encode(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text.lower() if self.lowercase else text)

    def decode(self, ids) -> str:
        return self.sp.DecodeIds([i for i in _until_eot(ids, self.sot_id, self.eot_id) if i != self.pad_id])

    @classmethod
    def train(cls, texts: list[str], model_prefix: str, vocab_size: int = 1000) -> SentencePieceTokenizer:
        """Train a BPE model on `texts` (single-threaded, so the same texts give the same model).

        `vocab_size` is an upper bound: a small corpus gets fewer pieces (hard_vocab_limit off), and
        if SentencePiece still reports a maximum, training is retried with it. Writes
        `<model_prefix>.model`.
        """
        import sentencepiece as spm

        if not texts:
            raise ValueError("cannot train a SentencePiece model on no text")
        os.makedirs(os.path.dirname(model_prefix) or ".", exist_ok=True)
        lowered = [t.lower() for t in texts]
        for _ in range(2):
            model = io.BytesIO()  # in memory: no file path is recorded in the model, so bytes are reproducible
            try:
                spm.SentencePieceTrainer.Train(
                    sentence_iterator=iter(lowered), model_writer=model, vocab_size=vocab_size,
                    model_type="bpe", hard_vocab_limit=False, character_coverage=1.0,
                    pad_id=0, unk_id=1, bos_id=2, eos_id=3, num_threads=1, minloglevel=2,
                )
                break
            except RuntimeError as exc:
                too_high = re.search(r"value <= (\d+)", str(exc))
                if too_high and int(too_high.group(1)) < vocab_size:  # retry once with the reported maximum
                    log.info("SentencePiece: vocab_size %d too large for the corpus, using %s",
                             vocab_size, too_high.group(1))
                    vocab_size = int(too_high.group(1))
                    continue
                if "smaller than required_chars" in str(exc):
                    needed = re.search(r"(\d+) vs (\d+)", str(exc))
                    raise ValueError(f"SentencePiece vocab_size={vocab_size} is below the "
                                     f"{needed.group(2) if needed else 'number of'} distinct characters "
                                     f"and special pieces of the corpus; raise vocab_size") from exc
                raise
        # Written under a temporary name and renamed, so a rank never loads half a file.
        tmp = f"{model_prefix}.model.tmp{os.getpid()}"
        with open(tmp, "wb") as fh:
            fh.write(model.getvalue())
        os.replace(tmp, model_prefix + ".model")
        return cls(model_prefix + ".model")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP map from bytes to printable unicode characters (so BPE never sees raw bytes)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _clean(text: str) -> str:
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip().lower()


class ClipBPETokenizer(Tokenizer):
    """OpenAI CLIP / open_clip byte-level BPE. sot and eot are the last two ids; pad is 0."""

    # OpenAI's vocabulary uses the first 48894 merges of the file (49408 tokens in all).
    MAX_MERGES = 49152 - 256 - 2

    def __init__(self, bpe_path: str):
        import regex

        if not os.path.isfile(bpe_path):
            raise FileNotFoundError(f"CLIP BPE merges file not found: {bpe_path}")
        try:
            with gzip.open(bpe_path, "rt", encoding="utf-8") as fh:
                lines = fh.read().split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read CLIP BPE merges file {bpe_path}: {exc}") from exc
        merges = [tuple(line.split()) for line in lines[1: self.MAX_MERGES + 1] if line.strip()]
        if any(len(m) != 2 for m in merges):
            raise ValueError(f"{bpe_path}: merges lines must hold two symbols each")
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        base = list(self.byte_encoder.values())
        vocab = base + [v + "</w>" for v in base] + ["".join(m) for m in merges]
        vocab += ["<start_of_text>", "<end_of_text>"]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.vocab_size = len(vocab)
        self.sot_id, self.eot_id, self.pad_id = self.vocab_size - 2, self.vocab_size - 1, 0
        self.pattern = regex.compile(
            r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        # A plain dict (as OpenAI's) keeps the tokenizer picklable for spawned DataLoader workers.
        self.cache = {"<start_of_text>": ("<start_of_text>",), "<end_of_text>": ("<end_of_text>",)}

    def _bpe(self, token: str) -> tuple[str, ...]:
        if token not in self.cache:
            self.cache[token] = self._merge(token)
        return self.cache[token]

    def _merge(self, token: str) -> tuple[str, ...]:
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text: str) -> list[int]:
        ids = []
        for token in self.pattern.findall(_clean(text)):
            if token not in ("<start_of_text>", "<end_of_text>"):
                token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[piece] for piece in self._bpe(token))
        return ids

    def decode(self, ids) -> str:
        # Padding follows the end-of-text token; id 0 (the pad id) is also "!" so it is not dropped.
        text = "".join(self.decoder[i] for i in _until_eot(ids, self.sot_id, self.eot_id))
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()


# Special-token names tried, in order, when neither the caller nor tokenizer_config.json names one.
EOS_CANDIDATES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|im_end|>", "[SEP]")
BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]")
PAD_CANDIDATES = ("<pad>", "<|finetune_right_pad_id|>", "[PAD]")


def _special_from_config(config: dict, key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (fast tokenizer, the `tokenizers` package).

    Text is encoded without the tokenizer's own special tokens (the data pipeline places the
    end-of-document token itself). Special tokens come from the arguments, else from a
    `tokenizer_config.json` beside the file (bos_token, eos_token, pad_token), else from common
    names (Llama 3's <|begin_of_text|> / <|end_of_text|>, GPT-2's <|endoftext|>, </s>, ...). An
    end-of-text token is required; without a pad token, padding uses it.
    """

    def __init__(self, path: str, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None):
        from tokenizers import Tokenizer as FastTokenizer

        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"Hugging Face tokenizer file not found: {file}")
        try:
            self.tokenizer = FastTokenizer.from_file(file)
        except Exception as exc:
            raise ValueError(f"cannot load Hugging Face tokenizer {file}: {exc}") from exc
        self.path = file
        config_path = os.path.join(os.path.dirname(file), "tokenizer_config.json")
        config = {}
        if os.path.isfile(config_path):
            import json

            with open(config_path) as fh:
                config = json.load(fh)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.eot_id = self._special(eos_token or _special_from_config(config, "eos_token"), EOS_CANDIDATES, "eos")
        if self.eot_id is None:
            raise ValueError(f"{file}: no end-of-text token found (tried {', '.join(EOS_CANDIDATES)}); name it "
                             "with data.tokenizer.eos_token")
        bos = self._special(bos_token or _special_from_config(config, "bos_token"), BOS_CANDIDATES, "bos")
        pad = self._special(pad_token or _special_from_config(config, "pad_token"), PAD_CANDIDATES, "pad")
        self.sot_id = self.eot_id if bos is None else bos
        self.pad_id = self.eot_id if pad is None else pad

    def _special(self, name: str | None, candidates, what: str) -> int | None:
        if name is not None:
            token_id = self.tokenizer.token_to_id(name)
            if token_id is None:
                raise ValueError(f"{self.path}: {what} token {name!r} is not in the vocabulary")
            return token_id
        return next((self.tokenizer.token_to_id(c) for c in candidates if self.tokenizer.token_to_id(c) is not None),
                    None)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        kept = [i for i in _until_eot(ids, self.sot_id, self.eot_id) if i != self.pad_id]
        return self.tokenizer.decode(kept, skip_special_tokens=True)


def build_tokenizer(kind: str, path: str | None = None, train_texts: list[str] | None = None,
                    vocab_size: int = 1000, cache_dir: str | None = None, lowercase: bool = True,
                    require_pad: bool = True, **special_tokens) -> Tokenizer:
    """A tokenizer by kind. SentencePiece without `path` is trained on `train_texts` into
    `cache_dir` once and reused from there. SentencePiece: `lowercase` (CLIP lower-cases captions,
    a language model keeps case) and `require_pad` (False accepts a .model without a pad piece,
    as Llama 2's, padding with eos). `special_tokens` (huggingface): bos_token / eos_token /
    pad_token names."""
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"data.tokenizer.type={kind!r}: use one of {', '.join(TOKENIZER_KINDS)}")
    if kind == "clip_bpe":
        if path is None:
            raise ValueError("data.tokenizer.type=clip_bpe needs data.tokenizer.path (bpe_simple_vocab_16e6.txt.gz)")
        return ClipBPETokenizer(path)
    if kind == "huggingface":
        if path is None:
            raise ValueError("data.tokenizer.type=huggingface needs data.tokenizer.path (a tokenizer.json or its directory)")
        return HFTokenizer(path, **special_tokens)
    if path is not None:
        return SentencePieceTokenizer(path, lowercase=lowercase, require_pad=require_pad)
    if cache_dir is None:
        raise ValueError("training a SentencePiece tokenizer needs a cache directory")
    prefix = os.path.join(cache_dir, f"spm_bpe_{vocab_size}")
    if os.path.exists(prefix + ".model"):
        return SentencePieceTokenizer(prefix + ".model")
    if train_texts is None:
        raise ValueError(f"no SentencePiece model at {prefix}.model and no captions to train one")
    log.info("training a SentencePiece BPE tokenizer (vocab <= %d) on %d captions", vocab_size, len(train_texts))
    return SentencePieceTokenizer.train(train_texts, prefix, vocab_size)
