"""A synthetic text corpus with a known entropy rate: documents from a random order-2 Markov source
over made-up words, written as WebDataset `txt` shards with a word-level `tokenizer.json`.

The source: an alphabet of `num_words` words plus the end-of-document token EOD. After EOD the next
document's first word is drawn from a start distribution; after any other pair of tokens (a, b)
the next token comes from a sparse Dirichlet distribution over `branching` words, plus EOD with
probability 1 / mean_doc_words. The tokenizer maps each word to one token and the data pipeline
puts EOD between documents, so the model's tokens are exactly the source's symbols and the floor is
exact in nats per model token:

- entropy rate h = sum over pairs (a, b) of pi(a, b) H(next | a, b), pi the stationary
  distribution of the pair chain (power iteration on the exact transition tables);
- a packed training window of S predictions sees no context before its first token, so its first
  prediction costs H(X1 | X0) (stationary, order 1) and the others h: the best possible mean loss
  over a window is (H(X1 | X0) + (S - 1) h) / S (`window_entropy_floor`).

`source_nll` scores batches with the true source (the Bayes-optimal predictor given each window),
so a demo can print the model's validation loss beside what the source itself scores on the very
same windows. Deterministic from the seed.

    python -m data.text_synthetic --out data_cache/markov --num-train 20000 --num-eval 1000
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import logging
import os
import tarfile
from dataclasses import asdict, dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")  # ids 0..3; </s> is the end-of-document token
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"


@dataclass
class MarkovParams:
    num_words: int = 64
    branching: int = 6  # words a context can continue with
    alpha: float = 0.5  # Dirichlet concentration of each context's distribution (lower: more peaked)
    mean_doc_words: float = 40.0  # EOD probability 1 / mean_doc_words after every word
    seed: int = 0


def make_words(count: int, rng: np.random.Generator) -> list[str]:
    """`count` distinct pronounceable made-up words (two or three consonant-vowel syllables)."""
    words: set[str] = set()
    while len(words) < count:
        syllables = rng.integers(2, 4)
        words.add("".join(CONSONANTS[rng.integers(len(CONSONANTS))] + VOWELS[rng.integers(len(VOWELS))]
                          for _ in range(syllables)))
    return sorted(words)


class MarkovSource:
    """The source's exact tables over symbols 0..V-1 (words) and V (EOD).

    `transitions[a, b]` is P(next | a, b) over V + 1 symbols; rows with b == EOD are the start
    distribution (documents are independent of what came before).
    """

    def __init__(self, params: MarkovParams):
        self.params = params
        rng = np.random.default_rng(params.seed)
        v = params.num_words
        self.words = make_words(v, rng)
        self.eod = v
        p_end = 1.0 / params.mean_doc_words
        table = np.zeros((v + 1, v + 1, v + 1))
        for a in range(v + 1):
            for b in range(v):
                support = rng.choice(v, size=params.branching, replace=False)
                table[a, b, support] = (1 - p_end) * rng.dirichlet([params.alpha] * params.branching)
                table[a, b, self.eod] = p_end
        start = np.zeros(v + 1)
        start[:v] = rng.dirichlet([1.0] * v)
        table[:, self.eod, :] = start
        self.transitions = table
        self.start = start

    # -- sampling --------------------------------------------------------------------------------
    def documents(self, count: int, rng: np.random.Generator) -> list[list[int]]:
        """`count` documents as symbol lists (words only; EOD ends each)."""
        docs = []
        cumulative = self.transitions.cumsum(-1)
        for _ in range(count):
            a, b, doc = self.eod, self.eod, []
            while True:
                c = int(np.searchsorted(cumulative[a, b], rng.random() * cumulative[a, b, -1], side="right"))
                c = min(c, self.eod)
                if c == self.eod:
                    break
                doc.append(c)
                a, b = b, c
            docs.append(doc)
        return docs

    # -- exact entropies -------------------------------------------------------------------------
    def stationary_pairs(self, iterations: int = 5000, tol: float = 1e-15) -> np.ndarray:
        """pi(a, b): the stationary distribution of the pair chain (a, b) -> (b, c)."""
        n = self.eod + 1
        pi = np.full((n, n), 1.0 / n**2)
        for _ in range(iterations):
            nxt = np.einsum("ab,abc->bc", pi, self.transitions)
            if np.abs(nxt - pi).sum() < tol:
                return nxt
            pi = nxt
        return pi

    def entropies(self) -> dict:
        """Entropy rate (order 2) and the order-1 conditional entropy H(X1 | X0), in nats per token."""
        pi = self.stationary_pairs()
        with np.errstate(divide="ignore", invalid="ignore"):
            logp = np.where(self.transitions > 0, np.log(self.transitions), 0.0)
        rate = float(-(pi[..., None] * self.transitions * logp).sum())
        marginal = pi.sum(0)  # mu(b)
        order1 = np.einsum("ab,abc->bc", pi, self.transitions) / np.maximum(marginal[:, None], 1e-300)
        with np.errstate(divide="ignore", invalid="ignore"):
            log1 = np.where(order1 > 0, np.log(order1), 0.0)
        first = float(-(marginal[:, None] * order1 * log1).sum())
        mean_doc_tokens = 1.0 / float(marginal[self.eod])  # tokens per document, EOD included
        return {"entropy_rate_nats": rate, "first_position_nats": first, "mean_doc_tokens": mean_doc_tokens}

    def order1(self) -> np.ndarray:
        pi = self.stationary_pairs()
        return np.einsum("ab,abc->bc", pi, self.transitions) / np.maximum(pi.sum(0)[:, None], 1e-300)


def window_entropy_floor(entropies: dict, seq_length: int) -> float:
    """The best mean loss over packed windows of `seq_length` predictions (nats per token)."""
    return (entropies["first_position_nats"] + (seq_length - 1) * entropies["entropy_rate_nats"]) / seq_length


def source_nll(source: MarkovSource, token_to_symbol: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor,
               loss_mask: torch.Tensor | None = None) -> float:
    """Mean negative log-likelihood the true source gives the labels of a batch, seeing only each
    window (order 1 at a window's first position, order 2 after): the Bayes-optimal predictor's
    loss on exactly these windows."""
    mask = np.ones(labels.shape) if loss_mask is None else loss_mask.numpy().astype(np.float64)
    sym_in = token_to_symbol[tokens].numpy()
    sym_out = token_to_symbol[labels].numpy()
    counted = mask > 0  # a counted label and every input up to it must be source symbols
    inputs_needed = np.flip(np.maximum.accumulate(np.flip(counted, 1), 1), 1)
    if (sym_out[counted] < 0).any() or (sym_in[inputs_needed] < 0).any():
        raise ValueError("tokens outside the source's alphabet (special tokens other than the end of document)")
    sym_in, sym_out = np.where(sym_in < 0, 0, sym_in), np.where(sym_out < 0, 0, sym_out)  # padding: not counted
    probs = np.empty(sym_out.shape)
    probs[:, 0] = source.order1()[sym_in[:, 0], sym_out[:, 0]]
    probs[:, 1:] = source.transitions[sym_in[:, :-1], sym_in[:, 1:], sym_out[:, 1:]]
    nll = -np.log(np.where(counted, probs, 1.0))
    return float((nll * mask).sum() / max(mask.sum(), 1.0))


def write_word_tokenizer(words: list[str], out_dir: str) -> str:
    """A word-level tokenizer.json (specials, then the words; whitespace split) + tokenizer_config.json."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    path = os.path.join(out_dir, "tokenizer.json")
    tokenizer.save(path + ".tmp")
    os.replace(path + ".tmp", path)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as fh:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, fh, indent=1)
    return path


def token_to_symbol_map(tokenizer, source: MarkovSource) -> torch.Tensor:
    """Token id -> source symbol (word index, or EOD for the tokenizer's end-of-text id); -1 elsewhere."""
    table = torch.full((tokenizer.vocab_size,), -1, dtype=torch.long)
    for index, word in enumerate(source.words):
        ids = tokenizer.encode(word)
        if len(ids) != 1:
            raise ValueError(f"word {word!r} is not one token of this tokenizer: the floor would not be per token")
        table[ids[0]] = index
    table[tokenizer.eot_id] = source.eod
    return table


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.uid, info.gid, info.mode = len(payload), 0, 0, 0, 0o644
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(payload))


def _write_split(out_dir: str, split: str, docs: list[list[int]], words: list[str], per_shard: int) -> list[dict]:
    shards = []
    for shard_id, start in enumerate(range(0, len(docs), per_shard)):
        path = os.path.join(out_dir, f"{split}-{shard_id:06d}.tar")
        chunk = docs[start:start + per_shard]
        with tarfile.open(path + ".tmp", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, doc in enumerate(chunk, start):
                _add_member(tar, f"{split}{i:08d}.txt", " ".join(words[s] for s in doc).encode())
        os.replace(path + ".tmp", path)  # a shard appears whole or not at all
        shards.append({"path": os.path.basename(path), "documents": len(chunk),
                       "tokens": sum(len(d) + 1 for d in chunk)})
    return shards


def generate_markov_corpus(out_dir: str, num_train: int = 20000, num_eval: int = 1000, docs_per_shard: int = 2000,
                           params: MarkovParams | None = None) -> dict:
    """Write train/eval shards, tokenizer.json and source.json (entropies) into `out_dir`; return
    the manifest. Skips the work when a manifest with the same parameters and shards is there."""
    params = params or MarkovParams()
    settings = {"num_train": num_train, "num_eval": num_eval, "docs_per_shard": docs_per_shard,
                "source": asdict(params), "format_version": FORMAT_VERSION}
    manifest_path = os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest_path):
        with open(manifest_path) as fh:
            manifest = json.load(fh)
        files = [s["path"] for split in ("train", "eval") for s in manifest.get(split, [])]
        if manifest.get("params") == settings and all(os.path.exists(os.path.join(out_dir, f)) for f in files):
            log.info("synthetic Markov corpus already in %s; not regenerating", out_dir)
            return manifest
        os.remove(manifest_path)
        for old in glob.glob(os.path.join(out_dir, "train-*.tar")) + glob.glob(os.path.join(out_dir, "eval-*.tar")):
            os.remove(old)
    os.makedirs(out_dir, exist_ok=True)
    source = MarkovSource(params)
    log.info("writing a synthetic Markov corpus to %s (%d train, %d eval documents)", out_dir, num_train, num_eval)
    train = _write_split(out_dir, "train", source.documents(num_train, np.random.default_rng([params.seed, 1])),
                         source.words, docs_per_shard)
    evals = _write_split(out_dir, "eval", source.documents(num_eval, np.random.default_rng([params.seed, 2])),
                         source.words, docs_per_shard)
    write_word_tokenizer(source.words, out_dir)
    entropies = source.entropies()
    with open(os.path.join(out_dir, "source.json"), "w") as fh:
        json.dump({"params": asdict(params), **entropies,
                   "note": "nats per token of the word-level tokenizer.json here (EOD counted as a token); a "
                           "packed window of S predictions has floor (first_position_nats + (S-1) * "
                           "entropy_rate_nats) / S"}, fh, indent=1)
    manifest = {"params": settings, "entropies": entropies, "train": train, "eval": evals,
                "tokenizer": "tokenizer.json"}
    with open(manifest_path + ".tmp", "w") as fh:
        json.dump(manifest, fh, indent=1)
    os.replace(manifest_path + ".tmp", manifest_path)  # written last: its presence means complete
    return manifest


def load_source(out_dir: str) -> MarkovSource:
    """The source a corpus directory was written from (rebuilt from its parameters)."""
    with open(os.path.join(out_dir, "source.json")) as fh:
        return MarkovSource(MarkovParams(**json.load(fh)["params"]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-train", type=int, default=20000, help="training documents")
    parser.add_argument("--num-eval", type=int, default=1000, help="evaluation documents")
    parser.add_argument("--docs-per-shard", type=int, default=2000)
    defaults = MarkovParams()
    for name in ("num_words", "branching", "alpha", "mean_doc_words", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(getattr(defaults, name)),
                            default=getattr(defaults, name))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    params = MarkovParams(args.num_words, args.branching, args.alpha, args.mean_doc_words, args.seed)
    manifest = generate_markov_corpus(args.out, args.num_train, args.num_eval, args.docs_per_shard, params)
    print(json.dumps({"entropies": manifest["entropies"],
                      **{split: {"shards": len(manifest[split]), "tokens": sum(s["tokens"] for s in manifest[split])}
                         for split in ("train", "eval")}}))


if __name__ == "__main__":
    main()
