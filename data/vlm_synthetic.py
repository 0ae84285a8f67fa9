"""A synthetic visual question-answering set on the shapes images of data/synthetic.py.

Each image holds one to three shapes of one colour and one kind; a single shape also has a size
(small, large) and a position (left, right, top, bottom, center), several shapes are small and
sit in distinct positions. Shapes, colours, sizes, positions and backgrounds are those of the CLIP
set (drawn by data/synthetic.py's `draw_shape`), so a tower trained by the CLIP demo
(configs/clip/tiny.yaml, 64x64) reads these images at `image_size=64`; they differ from its images
in holding up to three shapes, a position jitter of 3% (not 4%) of the side, and no JPEG round trip. Questions of five types have one-word answers:

    colour   "what colour is the shape"          -> red | green | ...          (chance 1/6)
    shape    "what shape is it"                  -> circle | square | ...      (chance 1/6)
    count    "how many shapes are there"         -> one | two | three          (chance 1/3)
    position "where is the shape"                -> left | right | ...  (one shape, chance 1/5)
    size     "is the shape small or large"       -> small | large       (one shape, chance 1/2)

A conversation asks up to `max_turns` of them about one image; the captioning variant is one turn
"describe the image" -> its caption (LLaVA's stage-1 pretraining data). Text-only conversations
(for modality mixing) ask the same questions about a caption given in words, answerable without an
image. Every sample is a pure function of (seed, split, index): nothing is written but the
word-level tokenizer, so any rank builds any sample.
"""
from __future__ import annotations

import json
import os
import random

import numpy as np
import torch
from PIL import Image, ImageDraw

from data.synthetic import (
    BACKGROUNDS,
    COLORS,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    SIZES,
    draw_shape,
)

QUESTION_TYPES = ("colour", "shape", "count", "position", "size")
QUESTIONS = {
    "colour": "what colour is the shape",
    "shape": "what shape is it",
    "count": "how many shapes are there",
    "position": "where is the shape",
    "size": "is the shape small or large",
}
COUNT_WORDS = ["one", "two", "three"]
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "cross": "crosses",
           "diamond": "diamonds"}
CAPTION_INSTRUCTION = "describe the image"
# Chance accuracy of each question type (uniform guessing among its answers).
CHANCE = {"colour": 1 / len(COLORS), "shape": 1 / len(SHAPES), "count": 1 / len(COUNT_WORDS),
          "position": 1 / len(POSITIONS), "size": 1 / len(SIZES)}
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>")
# CLIP's (OpenAI) normalisation
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def scene(rng: random.Random) -> dict:
    count = rng.choice([1, 1, 2, 3])  # half the images hold one shape: position and size questions
    positions = rng.sample(list(POSITIONS), count)
    return {"color": rng.choice(list(COLORS)), "shape": rng.choice(SHAPES), "count": count,
            "size": rng.choice(list(SIZES)) if count == 1 else "small", "positions": positions}


def render_scene(s: dict, image_size: int, rng: random.Random) -> Image.Image:
    background = tuple(max(0, min(255, c + rng.randint(-8, 8))) for c in rng.choice(BACKGROUNDS))
    img = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(img)
    for position in s["positions"]:
        fx, fy = POSITIONS[position]
        jitter = 0.03 * image_size
        cx, cy = fx * image_size + rng.uniform(-jitter, jitter), fy * image_size + rng.uniform(-jitter, jitter)
        draw_shape(draw, s["shape"], s["color"], s["size"], cx, cy, image_size, rng)
    return img


def answer(s: dict, qtype: str) -> str:
    return {"colour": s["color"], "shape": s["shape"], "count": COUNT_WORDS[s["count"] - 1],
            "position": s["positions"][0], "size": s["size"]}[qtype]


def caption(s: dict) -> str:
    if s["count"] == 1:
        return f"a {s['size']} {s['color']} {s['shape']} {POSITION_PHRASES[s['positions'][0]]}"
    return f"{COUNT_WORDS[s['count'] - 1]} {s['color']} {PLURALS[s['shape']]}"


def question_types(s: dict) -> list[str]:
    return list(QUESTION_TYPES) if s["count"] == 1 else ["colour", "shape", "count"]


def image_tensor(img: Image.Image, size: int | None = None) -> torch.Tensor:
    """PIL image -> [3, H, W] float, CLIP-normalised (resized to `size` first when given)."""
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


class SyntheticVQA:
    """Map-style: sample i of a split is {"images": [3, H, W] x n, "turns": [(instruction, response)],
    "qtypes": [type per turn]} (text_only: no images, the caption in the instruction)."""

    def __init__(self, num_samples: int, *, split: str = "train", image_size: int = 32, max_turns: int = 2,
                 seed: int = 0, captions: bool = False, text_only: bool = False, image_token: str = "<image>"):
        self.num_samples, self.split, self.image_size, self.max_turns = num_samples, split, image_size, max_turns
        self.seed, self.captions, self.text_only, self.image_token = seed, captions, text_only, image_token

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, index: int) -> tuple[dict, random.Random]:
        rng = random.Random(f"{self.seed}-{self.split}-{'text' if self.text_only else 'image'}-{index}")
        return scene(rng), rng

    def length_hint(self, index: int) -> int:
        """Turns, a cheap proxy of the sequence length for length-grouped batching."""
        return 1 if self.captions else 1 + index % self.max_turns

    def __getitem__(self, index: int) -> dict:
        s, rng = self.scene(index)
        if self.captions:
            turns, qtypes = [(f"{self.image_token} {CAPTION_INSTRUCTION}", caption(s))], ["caption"]
        else:
            count = 1 + index % self.max_turns
            qtypes = rng.sample(question_types(s), min(count, len(question_types(s))))
            turns = [(QUESTIONS[q], answer(s, q)) for q in qtypes]
            if self.text_only:
                turns[0] = (f"{caption(s)} {turns[0][0]}", turns[0][1])
            else:
                turns[0] = (f"{self.image_token} {turns[0][0]}", turns[0][1])
        images = [] if self.text_only else [image_tensor(render_scene(s, self.image_size, rng))]
        return {"images": images, "turns": turns, "qtypes": qtypes}


def vocabulary() -> list[str]:
    words = set()
    for text in list(QUESTIONS.values()) + [CAPTION_INSTRUCTION]:
        words.update(text.split())
    words.update(COLORS)
    words.update(SHAPES)
    words.update(PLURALS.values())
    words.update(COUNT_WORDS)
    words.update(SIZES)
    words.update(POSITIONS)
    for phrase in POSITION_PHRASES.values():
        words.update(phrase.split())
    words.update(["a"])
    return sorted(words)


def write_tokenizer(out_dir: str) -> str:
    """The set's word-level tokenizer.json (+ tokenizer_config.json) in `out_dir`; returns its path."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    os.makedirs(out_dir, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *vocabulary()])}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    path = os.path.join(out_dir, "tokenizer.json")
    tokenizer.save(path + f".tmp{os.getpid()}")
    os.replace(path + f".tmp{os.getpid()}", path)
    config = os.path.join(out_dir, "tokenizer_config.json")
    with open(config + f".tmp{os.getpid()}", "w") as fh:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, fh, indent=1)
    os.replace(config + f".tmp{os.getpid()}", config)
    return path


def vocab_size() -> int:
    return len(SPECIAL_TOKENS) + len(vocabulary())


def chance_accuracy(qtype: str) -> float:
    return CHANCE.get(qtype, 0.0)

