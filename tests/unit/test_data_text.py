"""Pretraining text data: packing (EOD between documents, fixed length, labels shifted by one,
windows overlapping by one token), bit-exact resume, corrupt shards and documents skipped and
counted, tar `txt` and jsonl shards, tokenizer.json files, and the synthetic Markov corpus whose
entropy floor is checked against the empirical loss of the source on its own samples."""
import hashlib
import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch

from data.text import build_text_dataloader
from data.text_synthetic import (
    MarkovParams,
    MarkovSource,
    generate_markov_corpus,
    load_source,
    source_nll,
    token_to_symbol_map,
    window_entropy_floor,
    write_word_tokenizer,
)
from data.tokenizers import HFTokenizer, build_tokenizer

WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    write_word_tokenizer(WORDS, str(out))
    return build_tokenizer("huggingface", str(out))


def _docs(count, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, 30))) for _ in range(count)]


def _write_jsonl(path, docs):
    with open(path, "w") as fh:
        fh.writelines(json.dumps({"text": doc}) + "\n" for doc in docs)


def _write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def _loader(spec, tok, **kwargs):
    args = dict(dp_rank=0, dp_size=1, batch_size=3, tokenizer=tok, seq_length=16, shuffle_buffer=0, infinite=False)
    return build_text_dataloader(spec, **{**args, **kwargs})


def _stream(docs, tok):
    return [t for doc in docs for t in tok.encode(doc) + [tok.eot_id]]


def test_packing_separates_documents_and_shifts_labels(tmp_path, word_tokenizer):
    docs = _docs(50)
    _write_jsonl(tmp_path / "a.jsonl", docs)
    batches = list(_loader(str(tmp_path / "a.jsonl"), word_tokenizer))
    stream = _stream(docs, word_tokenizer)
    rebuilt = []
    for batch in batches:
        assert batch["tokens"].shape[1] == 16 and batch["tokens"].dtype == torch.long
        assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])  # labels are the next tokens
        for tokens, labels, mask in zip(batch["tokens"], batch["labels"], batch["loss_mask"]):
            real = int(mask.sum())
            rebuilt.extend(tokens[:real].tolist())
            last_label = labels[real - 1].item()
    rebuilt.append(last_label)
    assert rebuilt == stream  # every token once as an input (and once as a label), EOD between documents
    assert stream.count(word_tokenizer.eot_id) == len(docs)
    assert batches[-1]["loss_mask"].sum() < batches[-1]["loss_mask"].numel()  # the tail window is padded


def test_eod_mask_loss_drops_predictions_made_at_eod(tmp_path, word_tokenizer):
    _write_jsonl(tmp_path / "a.jsonl", _docs(20))
    for batch in _loader(str(tmp_path / "a.jsonl"), word_tokenizer, eod_mask_loss=True):
        at_eod = batch["tokens"] == word_tokenizer.eot_id
        assert at_eod.any() and (batch["loss_mask"][at_eod] == 0).all()


def test_tar_txt_and_jsonl_give_the_same_tokens(tmp_path, word_tokenizer):
    docs = _docs(30, seed=1)
    _write_jsonl(tmp_path / "docs.jsonl", docs)
    _write_tar(tmp_path / "docs.tar", [(f"{i:05d}.txt", d.encode()) for i, d in enumerate(docs)])
    from_jsonl = [b["tokens"] for b in _loader(str(tmp_path / "docs.jsonl"), word_tokenizer)]
    from_tar = [b["tokens"] for b in _loader(str(tmp_path / "docs.tar"), word_tokenizer)]
    assert all(torch.equal(a, b) for a, b in zip(from_jsonl, from_tar)) and len(from_jsonl) == len(from_tar)


def test_corrupt_shards_and_documents_are_skipped_and_counted(tmp_path, word_tokenizer, caplog):
    good = _docs(10, seed=2)
    _write_jsonl(tmp_path / "0-good.jsonl", good)
    with open(tmp_path / "1-bad.jsonl", "w") as fh:
        fh.write('{"text": "w1 w2"}\n{not json\n{"other": 1}\n\n{"text": "w3"}\n')
    _write_tar(tmp_path / "2-members.tar", [("a.txt", b"w4 w5"), ("b.txt", b"\xff\xfe"), ("c.json", b"{}")])
    full = tmp_path / "full.tar"
    _write_tar(full, [(f"{i}.txt", " ".join(WORDS).encode()) for i in range(20)])
    (tmp_path / "3-truncated.tar").write_bytes(full.read_bytes()[:3000])
    shards = [str(tmp_path / n) for n in ("0-good.jsonl", "1-bad.jsonl", "2-members.tar", "3-truncated.tar")]
    shards.append(str(tmp_path / "4-missing.jsonl"))
    loader = _loader(shards, word_tokenizer)
    tokens = [t for b in loader for t in b["tokens"][b["loss_mask"] > 0].tolist()]
    # bad json line, line without "text", undecodable txt member, sample without a txt member
    assert loader.stats.samples_skipped == 4
    assert loader.stats.shards_skipped == 2  # the truncated tar and the missing file
    assert "4-missing.jsonl" in caplog.text and "3-truncated.tar" in caplog.text
    assert tokens[: len(_stream(good, word_tokenizer))] == _stream(good, word_tokenizer)
    assert word_tokenizer.encode("w1 w2") + [word_tokenizer.eot_id] + word_tokenizer.encode("w3") == \
        tokens[len(_stream(good, word_tokenizer)):][:4]


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("shuffle_buffer", [0, 7])
def test_resume_is_bit_exact_across_epochs(tmp_path, word_tokenizer, shuffle_buffer):
    for i in range(3):
        _write_jsonl(tmp_path / f"s{i}.jsonl", _docs(8, seed=10 + i))
    spec = str(tmp_path / "s*.jsonl")
    args = dict(infinite=True, shuffle_buffer=shuffle_buffer, seed=5, batch_size=2, seq_length=12)
    straight = _take(iter(_loader(spec, word_tokenizer, **args)), 40)  # several epochs of this small corpus
    first = _loader(spec, word_tokenizer, **args)
    it = iter(first)
    _take(it, 13)
    state = first.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)  # the position travels in a checkpoint
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    resumed = _loader(spec, word_tokenizer, **args)
    assert resumed.load_state_dict(state) is True
    assert resumed.state_dict()["carry"] == state["carry"]  # saving again before iterating keeps it
    rest = _take(iter(resumed), 27)
    for a, b in zip(straight[13:], rest):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.batches_consumed == 40


def test_a_changed_split_starts_a_fresh_stream(tmp_path, word_tokenizer):
    for i in range(2):
        _write_jsonl(tmp_path / f"s{i}.jsonl", _docs(8, seed=i))
    loader = _loader(str(tmp_path / "s*.jsonl"), word_tokenizer, infinite=True)
    it = iter(loader)
    _take(it, 3)
    other = _loader(str(tmp_path / "s0.jsonl"), word_tokenizer, infinite=True)
    assert other.load_state_dict(loader.state_dict()) is False
    assert next(iter(other))["tokens"].shape == (3, 16)


def test_same_arguments_same_batches_and_dp_split(tmp_path, word_tokenizer):
    for i in range(4):
        _write_jsonl(tmp_path / f"s{i}.jsonl", _docs(6, seed=20 + i))
    spec = str(tmp_path)  # a directory: its .jsonl files
    args = dict(infinite=True, shuffle_buffer=5, seed=3)
    first_stage, last_stage = (_take(iter(_loader(spec, word_tokenizer, **args)), 10) for _ in range(2))
    assert all(torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"])
               for a, b in zip(first_stage, last_stage))
    per_rank = [[b["tokens"] for b in _loader(spec, word_tokenizer, dp_rank=r, dp_size=2)] for r in range(2)]
    digest = [{hashlib.sha1(t.numpy().tobytes()).hexdigest() for batch in rank for t in batch} for rank in per_rank]
    assert digest[0] and digest[1] and not digest[0] & digest[1]


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|begin_of_text|>", "<|end_of_text|>"])
    tok.train_from_iterator([" ".join(_docs(200))] * 3, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = HFTokenizer(str(tmp_path / "tokenizer.json"))  # special tokens found by their Llama 3 names
    assert hf.eot_id == tok.token_to_id("<|end_of_text|>") and hf.sot_id == tok.token_to_id("<|begin_of_text|>")
    assert hf.pad_id == hf.eot_id and hf.vocab_size == tok.get_vocab_size()
    text = "w3 w17 w5 w5 w39"
    assert hf.decode(hf.encode(text)) == text and hf.eot_id not in hf.encode(text)
    with pytest.raises(ValueError, match="eos token '</s>' is not in the vocabulary"):
        HFTokenizer(str(tmp_path), eos_token="</s>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<unk>"}}))
    assert HFTokenizer(str(tmp_path)).eot_id == tok.token_to_id("<unk>")  # tokenizer_config.json wins
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        HFTokenizer(str(tmp_path / "nowhere"))


# -- the synthetic corpus ------------------------------------------------------------------------

def test_entropy_rate_matches_the_sources_own_loss_on_its_samples():
    source = MarkovSource(MarkovParams(num_words=20, branching=4, mean_doc_words=15, seed=1))
    entropies = source.entropies()
    docs = source.documents(4000, np.random.default_rng(7))
    stream = [s for doc in docs for s in [*doc, source.eod]]
    seq = np.array(stream)
    nll = -np.log(source.transitions[seq[:-2], seq[1:-1], seq[2:]])
    # Markov chain CLT: the empirical mean is within a few standard errors (tokens are weakly dependent).
    standard_error = nll.std() / math.sqrt(len(nll))
    assert abs(nll.mean() - entropies["entropy_rate_nats"]) < 6 * standard_error
    assert abs(len(stream) / len(docs) - entropies["mean_doc_tokens"]) < 0.05 * entropies["mean_doc_tokens"]
    assert entropies["first_position_nats"] > entropies["entropy_rate_nats"]


def test_corpus_windows_score_the_floor(tmp_path):
    out = str(tmp_path / "markov")
    manifest = generate_markov_corpus(out, num_train=300, num_eval=600, docs_per_shard=200,
                                      params=MarkovParams(num_words=30, seed=2))
    again = generate_markov_corpus(out, num_train=300, num_eval=600, docs_per_shard=200,
                                   params=MarkovParams(num_words=30, seed=2))
    assert again == manifest  # reused, not rewritten
    tok = build_tokenizer("huggingface", out)
    source = load_source(out)
    table = token_to_symbol_map(tok, source)  # every word is one token: the floor is per model token
    seq_length = 32
    loader = build_text_dataloader(f"{out}/eval-*.tar", dp_rank=0, dp_size=1, batch_size=16, tokenizer=tok,
                                   seq_length=seq_length, shuffle_buffer=0, infinite=False)
    losses, weights = [], []
    for batch in loader:
        losses.append(source_nll(source, table, batch["tokens"], batch["labels"], batch["loss_mask"]))
        weights.append(float(batch["loss_mask"].sum()))
    oracle = float(np.average(losses, weights=weights))
    floor = window_entropy_floor(manifest["entropies"], seq_length)
    assert abs(oracle - floor) < 0.05 * floor, (oracle, floor)
    # A different, deterministic corpus from another seed; the same seed writes the same bytes.
    other = str(tmp_path / "copy")
    generate_markov_corpus(other, num_train=300, num_eval=600, docs_per_shard=200,
                           params=MarkovParams(num_words=30, seed=2))
    assert (tmp_path / "copy" / "train-000000.tar").read_bytes() == (tmp_path / "markov" / "train-000000.tar").read_bytes()
