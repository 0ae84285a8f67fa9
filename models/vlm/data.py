"""The VLM's data: conversation sets (LLaVA-style jsonl files, WebDataset shards, the synthetic VQA set) and the
micro-batch loader with modality mixing.

Modality mixing (the seed's MultiLoader): with `data.text_batch_fraction` > 0, micro-batch k of
the run is text-only when a hash of (seed, k) says so. The hash is the same on every rank, so at
each step every data-parallel replica runs the vision path or none does (a replica that skips
the vision tower while another runs it would reduce different gradient buckets and hang ZeRO's
collectives); the model adds a zero contribution of the image path's trainable parameters to
text-only micro-batches, so their gradients exist (as zeros) either way.

Each data-parallel rank reads its own slice of an epoch's permutation (the same permutation on
every rank, from the seed and the epoch); the first and the last pipeline stage of a replica
build the same loader and read the same batches.
"""
from __future__ import annotations

import json
import logging
import os
import random

import torch
from PIL import Image

from data.vlm_synthetic import SyntheticVQA, image_tensor
from models.vlm.sequence import collate, encode_conversation, expand_images

log = logging.getLogger("engine")

ROLE_USER = ("human", "user")
ROLE_ASSISTANT = ("gpt", "assistant", "model")


def turns_of(record: dict, path: str, line: int) -> list:
    """[(instruction, response)] of a LLaVA {"conversations": [{"from", "value"}]} or an
    OpenAI-style {"messages": [{"role", "content"}]} record."""
    messages = record.get("conversations", record.get("messages"))
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{path}:{line}: no 'conversations' or 'messages' list")
    turns, pending = [], None
    for message in messages:
        role = message.get("from", message.get("role"))
        text = message.get("value", message.get("content"))
        if role == "system":
            continue
        if role in ROLE_USER:
            if pending is not None:
                raise ValueError(f"{path}:{line}: two user messages in a row")
            pending = text
        elif role in ROLE_ASSISTANT:
            if pending is None:
                raise ValueError(f"{path}:{line}: an assistant message without a user message before it")
            turns.append((pending, text))
            pending = None
        else:
            raise ValueError(f"{path}:{line}: unknown role {role!r} (use {'/'.join(ROLE_USER + ROLE_ASSISTANT)})")
    if not turns:
        raise ValueError(f"{path}:{line}: no complete (user, assistant) turn")
    return turns


def expand_files(spec: str) -> list[str]:
    import glob

    files = []
    for part in spec.split(","):
        part = part.strip()
        if os.path.isdir(part):
            files.extend(sorted(glob.glob(os.path.join(part, "*.jsonl")) + glob.glob(os.path.join(part, "*.tar"))))
        elif any(c in part for c in "*?["):
            files.extend(sorted(glob.glob(part)))
        else:
            files.append(part)
    missing = [f for f in files if not os.path.exists(f)]
    if not files or missing:
        raise FileNotFoundError(f"conversation files {spec!r}: " + (f"missing {missing[0]}" if missing else "none match"))
    return files


class JsonlConversations:
    """Conversations from jsonl files, one record per line: {"image": path | [paths] (optional),
    "conversations" | "messages": [...]}. Image paths are relative to `image_folder` (default: the
    file's folder); images are resized to `image_size` and CLIP-normalised."""

    def __init__(self, spec: str, image_size: int, image_folder: str | None = None, image_token: str = "<image>"):
        self.records, self.image_size, self.image_token = [], image_size, image_token
        for path in (expand_files(spec) if isinstance(spec, str) else spec):
            folder = image_folder or os.path.dirname(os.path.abspath(path))
            with open(path) as fh:
                for line_no, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}:{line_no}: not JSON ({exc})") from exc
                    images = record.get("image", record.get("images")) or []
                    images = [images] if isinstance(images, str) else list(images)
                    self.records.append({"images": [os.path.join(folder, p) for p in images],
                                         "turns": turns_of(record, path, line_no), "qtypes": []})

    def __len__(self) -> int:
        return len(self.records)

    def length_hint(self, index: int) -> int:
        return sum(len(a) + len(b) for a, b in self.records[index]["turns"])

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        images = []
        for path in record["images"]:
            with Image.open(path) as img:
                images.append(image_tensor(img, self.image_size))
        return {"images": images, "turns": record["turns"], "qtypes": record["qtypes"]}


class WebDatasetConversations:
    """Conversations from WebDataset tar shards: per sample `<key>.json` (a record as in the jsonl
    files, without "image") and its images `<key>.jpg` / `.png` or `<key>.<n>.jpg` for several
    (in name order). The shards are indexed once (member offsets); samples are read on demand."""

    IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

    def __init__(self, shards: list, image_size: int, image_token: str = "<image>"):
        import tarfile

        self.image_size, self.image_token, self.samples = image_size, image_token, []
        for shard in shards:
            groups: dict = {}
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    if not member.isfile():
                        continue
                    key, _, ext = member.name.partition(".")
                    groups.setdefault(key, {})[ext] = (member.offset_data, member.size)
            for key, parts in groups.items():
                if "json" not in parts:
                    raise ValueError(f"{shard}: sample {key!r} has no {key}.json")
                images = sorted(e for e in parts if e.lower().endswith(tuple(x[1:] for x in self.IMAGE_EXTENSIONS)))
                self.samples.append((shard, key, parts["json"], [parts[e] for e in images]))

    def __len__(self) -> int:
        return len(self.samples)

    def length_hint(self, index: int) -> int:
        return self.samples[index][2][1]  # the json's size

    @staticmethod
    def _read(path: str, offset: int, size: int) -> bytes:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(size)

    def __getitem__(self, index: int) -> dict:
        import io

        shard, key, (offset, size), images = self.samples[index]
        record = json.loads(self._read(shard, offset, size))
        tensors = []
        for image_offset, image_size in images:
            with Image.open(io.BytesIO(self._read(shard, image_offset, image_size))) as img:
                tensors.append(image_tensor(img, self.image_size))
        return {"images": tensors, "turns": turns_of(record, shard, key), "qtypes": record.get("qtypes", [])}


def conversation_set(spec: str, image_size: int, image_folder: str | None, image_token: str):
    """jsonl files or WebDataset tar shards (one kind per spec) of conversations."""
    files = expand_files(spec)
    if all(f.endswith(".tar") for f in files):
        return WebDatasetConversations(files, image_size, image_token)
    if any(f.endswith(".tar") for f in files):
        raise ValueError(f"{spec}: mixes .tar shards and jsonl files; give one kind per data key")
    return JsonlConversations(spec, image_size, image_folder, image_token)


class VLMLoader:
    """Endless micro-batches of one data-parallel rank (see the module docstring), with
    state_dict()/load_state_dict() for exact resume."""

    def __init__(self, dataset, tokenizer, template, *, image_tokens: int, max_length: int, batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, text_dataset=None, text_batch_fraction: float = 0.0,
                 pad_to_multiple_of: int = 8, fixed_length: bool = False, group_by_length: bool = True,
                 length_group_size: int = 16, image_shape: tuple = (3, 1, 1),
                 shuffle: bool = True, infinite: bool = True):
        if text_batch_fraction > 0 and text_dataset is None:
            raise ValueError("data.text_batch_fraction > 0 needs text-only conversations (data.text_data, or the "
                             "synthetic set)")
        for name, ds in (("conversations", dataset), ("text-only conversations", text_dataset)):
            if ds is not None and len(ds) // dp_size < batch_size:
                raise ValueError(f"{len(ds)} {name} give fewer than trainer.micro_batch_size={batch_size} per "
                                 f"data-parallel rank (DP={dp_size})")
        self.dataset, self.text_dataset, self.tokenizer, self.template = dataset, text_dataset, tokenizer, template
        self.image_tokens, self.max_length, self.batch_size = image_tokens, max_length, batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.text_batch_fraction, self.pad_to_multiple_of, self.fixed_length = text_batch_fraction, pad_to_multiple_of, fixed_length
        self.group_by_length, self.length_group_size = group_by_length, length_group_size
        self.image_shape, self.shuffle, self.infinite = image_shape, shuffle, infinite
        # position of each stream: (epoch, next index into this rank's order)
        self.position = {"image": [0, 0], "text": [0, 0]}
        self.micro_batches = 0
        self.truncated = self.samples_seen = self.tokens_seen = self.text_batches = 0
        self._orders = {}

    # -- order -----------------------------------------------------------------------------------
    def _order(self, stream: str, epoch: int) -> list[int]:
        key = (stream, epoch)
        if key not in self._orders:
            ds = self.dataset if stream == "image" else self.text_dataset
            n = len(ds) // self.dp_size * self.dp_size
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 7 + (stream == "text"))
                everyone = torch.randperm(len(ds), generator=gen)[:n].tolist()
            else:
                everyone = list(range(n))
            mine = everyone[self.dp_rank::self.dp_size]
            if self.group_by_length and self.shuffle:
                # sort windows of length_group_size batches by length, keep the batch order random
                window = self.length_group_size * self.batch_size
                grouped = []
                for start in range(0, len(mine), window):
                    chunk = sorted(mine[start:start + window], key=ds.length_hint)
                    batches = [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
                    random.Random(f"{self.seed}-{epoch}-{start}").shuffle(batches)
                    grouped.extend(i for b in batches for i in b)
                mine = grouped
            self._orders = {k: v for k, v in self._orders.items() if k[0] != stream}
            self._orders[key] = mine
        return self._orders[key]

    def _take(self, stream: str) -> list[int] | None:
        epoch, index = self.position[stream]
        order = self._order(stream, epoch)
        if index + self.batch_size > len(order):
            if not self.infinite:
                return None
            epoch, index = epoch + 1, 0
            order = self._order(stream, epoch)
        self.position[stream] = [epoch, index + self.batch_size]
        return order[index:index + self.batch_size]

    def is_text_batch(self, k: int) -> bool:
        """Micro-batch k is text-only: the same answer on every rank."""
        if self.text_batch_fraction <= 0:
            return False
        return random.Random(f"{self.seed}-modality-{k}").random() < self.text_batch_fraction

    # -- batches ---------------------------------------------------------------------------------
    def make_batch(self, samples: list[dict]) -> dict:
        expanded, images = [], []
        for sample in samples:
            encoded = encode_conversation(sample["turns"], self.tokenizer, self.template, len(sample["images"]))
            item = expand_images(encoded, self.image_tokens, self.max_length, self.tokenizer.pad_id)
            self.truncated += item.truncated
            expanded.append(item)
            images.append(torch.stack(sample["images"]) if sample["images"] else None)
        batch = collate(expanded, images, self.tokenizer.pad_id, pad_to_multiple_of=self.pad_to_multiple_of,
                        length=self.max_length if self.fixed_length else None, image_shape=self.image_shape)
        batch["qtypes"] = [s["qtypes"] for s in samples]
        return batch

    def __iter__(self):
        while True:
            text = self.is_text_batch(self.micro_batches)
            stream = "text" if text else "image"
            picks = self._take(stream)
            if picks is None:
                return
            ds = self.text_dataset if text else self.dataset
            before = self.truncated
            batch = self.make_batch([ds[i] for i in picks])
            if self.truncated > before:
                log.warning("%d conversation(s) longer than model.llm.seq_length=%d cut (%d so far on this rank)",
                            self.truncated - before, self.max_length, self.truncated, extra={"per_replica": True})
            self.micro_batches += 1
            self.text_batches += text
            self.samples_seen += len(picks)
            self.tokens_seen += int(batch["attention_mask"].sum())
            yield batch

    def state_dict(self) -> dict:
        return {"position": {k: list(v) for k, v in self.position.items()}, "micro_batches": self.micro_batches,
                "counts": [self.truncated, self.samples_seen, self.tokens_seen, self.text_batches],
                "dp_rank": self.dp_rank, "dp_size": self.dp_size}

    def load_state_dict(self, state: dict) -> bool:
        if "position" not in state or state.get("dp_size") != self.dp_size or state.get("dp_rank") != self.dp_rank:
            return False
        self.position = {k: list(v) for k, v in state["position"].items()}
        self.micro_batches = state["micro_batches"]
        self.truncated, self.samples_seen, self.tokens_seen, self.text_batches = state["counts"]
        return True


def synthetic_sets(syn, image_token: str, captions: bool) -> tuple:
    """(train, text-only train, eval) synthetic sets of a `data.synthetic` section."""
    train = SyntheticVQA(syn.num_train, split="train", image_size=syn.image_size, max_turns=syn.max_turns,
                         seed=syn.seed, captions=captions, image_token=image_token)
    text = SyntheticVQA(syn.num_train, split="train", image_size=syn.image_size, max_turns=syn.max_turns,
                        seed=syn.seed, text_only=True, image_token=image_token)
    evals = SyntheticVQA(syn.num_eval, split="eval", image_size=syn.image_size, max_turns=1, seed=syn.seed,
                         image_token=image_token) if syn.num_eval else None
    return train, text, evals
