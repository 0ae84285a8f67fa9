"""Pretraining text: documents from WebDataset `txt` shards or jsonl files, tokenized and packed
into fixed-length sequences with the end-of-document token between documents.

The documents are read with data/pipeline.py's machinery: shards split over data-parallel ranks
only (the TP and PP ranks of a replica read the same documents), a reproducible shard order per
epoch, a shuffle buffer of documents, unreadable shards and undecodable documents skipped with a
warning naming them and counted in `stats`. Tokens are packed Megatron's way: the stream
doc_1 EOD doc_2 EOD ... is cut into windows of seq_length + 1 tokens that overlap by one, so
every token is a label once; a batch is {"tokens": window[:-1], "labels": window[1:],
"loss_mask"} of shape [micro_batch, seq_length]. Attention crosses document boundaries (as
Megatron's default); `eod_mask_loss` drops the predictions made at an EOD input, i.e. of each
document's first token (Megatron's --eod-mask-loss).

The loader's position is exact: `state_dict()` holds the stream position (epoch, shard, document,
the shuffle buffer and its RNG) and the packer's tokens not yet emitted, so a resumed run yields
the same batches bit for bit. Two loaders built with the same arguments yield the same batches
(the first pipeline stage reads the tokens, the last the labels). Reading happens in the training
process (tokenization with the `tokenizers` package or SentencePiece is fast next to an LLM step).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import random
from dataclasses import asdict

import torch

from data.pipeline import (
    PipelineStats,
    StreamPosition,
    epoch_samples,
    expand_shards,
    read_tar_shard,
    shuffle_buffered,
    split_shards_for_dp,
)

log = logging.getLogger(__name__)

TEXT_SHARD_SUFFIXES = (".tar", ".jsonl")
TXT_KEYS = ("txt", "text")


def expand_text_shards(spec) -> list[str]:
    """Like `expand_shards`, and a directory means its *.tar and *.jsonl files."""
    if isinstance(spec, (list, tuple)):
        return [s for item in spec for s in expand_text_shards(item)]
    if isinstance(spec, str) and os.path.isdir(spec):
        found = sorted(f for suffix in TEXT_SHARD_SUFFIXES for f in glob.glob(os.path.join(spec, f"*{suffix}")))
        if not found:
            raise FileNotFoundError(f"no .tar or .jsonl shards in directory {spec!r}")
        return found
    return expand_shards(spec)


class TextDocuments:
    """This DP rank's documents (str), epoch after epoch, from tar `txt` members or jsonl lines."""

    def __init__(self, shards: list[str], shuffle_buffer: int, seed: int, dp_rank: int, infinite: bool,
                 stats: PipelineStats, text_key: str = "text"):
        self.shards, self.shuffle_buffer, self.seed, self.dp_rank = list(shards), shuffle_buffer, seed, dp_rank
        self.infinite, self.stats, self.text_key = infinite, stats, text_key

    def _skip(self, where: str, reason: str) -> None:
        self.stats.samples_skipped += 1
        log.warning("skipped document %s: %s", where, reason, extra={"per_replica": True})

    def _read_jsonl(self, url: str):
        try:
            with open(url, "rb") as fh:
                for number, line in enumerate(fh, 1):
                    yield {"__url__": url, "__key__": f"line {number}", "line": line}
        except OSError as exc:
            self.stats.shards_skipped += 1
            log.warning("skipped unreadable shard %s: %r (%d shard reads skipped so far)", url, exc,
                        self.stats.shards_skipped, extra={"per_replica": True})

    def _read_shard(self, url: str):
        return self._read_jsonl(url) if url.endswith(".jsonl") else read_tar_shard(url, self.stats)

    def _text(self, raw: dict) -> str | None:
        """The document of a raw sample, or None (skipped and counted) when there is none."""
        where = f"{raw.get('__url__')}:{raw.get('__key__')}"
        try:
            if "line" in raw:
                if not raw["line"].strip():
                    return None  # blank line: nothing to count
                record = json.loads(raw["line"])
                text = record.get(self.text_key) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    self._skip(where, f"no string field {self.text_key!r}")
                    return None
                return text
            key = next((k for k in TXT_KEYS if k in raw), None)
            if key is None:
                self._skip(where, f"no text member ({'/'.join(TXT_KEYS)}); has "
                                  f"{sorted(k for k in raw if not k.startswith('__'))}")
                return None
            return raw[key].decode("utf-8")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._skip(where, f"{type(exc).__name__}: {exc}")
            return None

    def iterate(self, pos: StreamPosition):
        """Documents from `pos` on (advancing it); the shuffle buffer holds decoded text."""
        decoded = {}

        def usable(raw):
            text = self._text(raw)
            decoded["text"] = text
            return text is not None

        def texts():
            for _ in epoch_samples(self.shards, pos, self._read_shard, usable,
                                   shuffle_key=f"{self.seed}-{self.dp_rank}" if self.shuffle_buffer > 0 else None,
                                   infinite=self.infinite):
                yield decoded["text"]

        yield from shuffle_buffered(texts(), pos, self.shuffle_buffer)


class PackedTextLoader:
    """Iterable of batches {"tokens", "labels": long [B, S], "loss_mask": float [B, S]} with
    `stats` and an exact `state_dict()` / `load_state_dict()` (see the module docstring)."""

    def __init__(self, documents: TextDocuments, tokenizer, seq_length: int, batch_size: int,
                 eod_mask_loss: bool = False, add_bos: bool = False):
        if seq_length < 1 or batch_size < 1:
            raise ValueError(f"seq_length={seq_length} and batch_size={batch_size} must be >= 1")
        self.documents, self.tokenizer = documents, tokenizer
        self.seq_length, self.batch_size = seq_length, batch_size
        self.eod_mask_loss, self.add_bos = eod_mask_loss, add_bos
        self.eod_id = tokenizer.eot_id
        self.stats = documents.stats
        self.batches_consumed = 0
        self.tokens_seen = 0  # tokens delivered as inputs on this rank
        self.position: StreamPosition | None = None
        self.carry: list[int] = []  # packed tokens not yet emitted (the next window starts with them)
        self.resume_from: dict | None = None

    def _new_position(self) -> StreamPosition:
        return StreamPosition(rng=random.Random(f"{self.documents.seed}-{self.documents.dp_rank}-text"))

    def _windows(self):
        """Windows of seq_length + 1 tokens; the last token of one is the first of the next."""
        size = self.seq_length + 1
        for text in self.documents.iterate(self.position):
            ids = self.tokenizer.encode(text)
            self.carry.extend(([self.tokenizer.sot_id] if self.add_bos else []) + ids + [self.eod_id])
            while len(self.carry) >= size:
                window, self.carry = self.carry[:size], self.carry[size - 1:]
                yield window, size
        if not self.documents.infinite and len(self.carry) > 1:  # one pass: the tail, padded and masked
            window, self.carry = self.carry, []
            yield window + [self.tokenizer.pad_id] * (size - len(window)), len(window)

    def _batch(self, windows: list[tuple[list[int], int]]) -> dict:
        data = torch.tensor([w for w, _ in windows], dtype=torch.long)
        tokens, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
        loss_mask = torch.zeros(tokens.shape, dtype=torch.float)
        for row, (_, real) in enumerate(windows):
            loss_mask[row, : real - 1] = 1.0
        if self.eod_mask_loss:
            loss_mask[tokens == self.eod_id] = 0.0
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask}

    def __iter__(self):
        if self.resume_from is not None:
            self.position = StreamPosition.from_state(self.resume_from["stream"]) if self.resume_from["stream"] \
                else self._new_position()
            self.carry = list(self.resume_from["carry"])
            self.resume_from = None
        else:
            self.position, self.carry = self._new_position(), []
        pending = []
        for window in self._windows():
            pending.append(window)
            if len(pending) == self.batch_size:
                yield self._deliver(pending)
                pending = []
        if pending and not self.documents.infinite:
            yield self._deliver(pending)

    def _deliver(self, windows) -> dict:
        batch = self._batch(windows)
        self.stats.samples_seen += len(windows)
        self.batches_consumed += 1
        self.tokens_seen += batch["tokens"].numel()
        return batch

    # -- resumable position (checkpoints) ---------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's position between batches: stream position, packer carry, counters."""
        if self.resume_from is not None:  # restored but not iterated yet
            stream, carry = self.resume_from["stream"], self.resume_from["carry"]
        else:
            stream = self.position.state_dict() if self.position is not None else None
            carry = list(self.carry)
        docs = self.documents
        return {"version": 1, "kind": "packed_text", "num_shards": len(docs.shards), "dp_rank": docs.dp_rank,
                "seq_length": self.seq_length, "batches_consumed": self.batches_consumed,
                "tokens_seen": self.tokens_seen, "stats": asdict(self.stats), "exact": True, "stream": stream,
                "carry": carry}

    def load_state_dict(self, state: dict) -> bool:
        """Resume at `state` when the next iteration starts. Returns True when the position is
        restored exactly; False (a fresh stream with a seed of its own, past the saved epoch) when
        the shard split or the sequence length changed."""
        self.batches_consumed, self.tokens_seen = state["batches_consumed"], state.get("tokens_seen", 0)
        for key, value in state["stats"].items():
            setattr(self.stats, key, value)
        docs = self.documents
        same = (state["num_shards"] == len(docs.shards) and state["dp_rank"] == docs.dp_rank
                and state["seq_length"] == self.seq_length)
        if same:
            self.resume_from = {"stream": state["stream"], "carry": state["carry"]}
            return True
        log.warning("data position saved for %d shards / rank %d / seq_length %d does not fit %d / %d / %d: "
                    "starting a fresh stream", state["num_shards"], state["dp_rank"], state["seq_length"],
                    len(docs.shards), docs.dp_rank, self.seq_length, extra={"per_replica": True})
        epoch = (state["stream"] or {}).get("epoch", 0) + 1
        position = StreamPosition(rng=random.Random(f"{docs.seed}-{docs.dp_rank}-resume{state['batches_consumed']}"),
                                  epoch=epoch)
        self.resume_from = {"stream": position.state_dict(), "carry": []}
        return False


def build_text_dataloader(shards, *, dp_rank: int, dp_size: int, batch_size: int, tokenizer, seq_length: int,
                          shuffle_buffer: int = 1000, seed: int = 0, infinite: bool = True, text_key: str = "text",
                          eod_mask_loss: bool = False, add_bos: bool = False) -> PackedTextLoader:
    """Training (`infinite=True`: endless epochs, full batches) or evaluation (one pass; the last
    window padded with loss_mask 0, the last batch possibly smaller) loader over this DP rank's
    share of `shards` (tar with txt members, or jsonl with `text_key`; patterns, globs,
    directories or lists). `tokenizer`: a data.tokenizers.Tokenizer (its eot_id is the EOD).
    `add_bos`: start each document with the tokenizer's bos token (Llama 3 style)."""
    shard_list = split_shards_for_dp(expand_text_shards(shards), dp_rank, dp_size)
    documents = TextDocuments(shard_list, shuffle_buffer, seed, dp_rank, infinite, PipelineStats(), text_key)
    return PackedTextLoader(documents, tokenizer, seq_length, batch_size, eod_mask_loss, add_bos)
