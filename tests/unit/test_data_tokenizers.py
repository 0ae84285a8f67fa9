import gzip

import pytest
import torch

from data.tokenizers import ClipBPETokenizer, SentencePieceTokenizer, build_tokenizer, eot_positions

CAPTIONS = [f"a {s} {c} {shape} on the {p}" for s in ("small", "large") for c in ("red", "blue", "green")
            for shape in ("circle", "square", "star") for p in ("left", "right", "top")]


def test_sentencepiece_train_encode_decode(tmp_path):
    tok = build_tokenizer("sentencepiece", None, CAPTIONS, vocab_size=200, cache_dir=str(tmp_path))
    assert tok.vocab_size <= 200 and len({tok.pad_id, tok.sot_id, tok.eot_id}) == 3
    for caption in CAPTIONS[:10]:
        assert tok.decode(tok.encode(caption)) == caption
    ids = tok(["a large blue star on the top", "a red square"], context_length=16)
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    assert (ids[:, 0] == tok.sot_id).all()
    eot = eot_positions(ids, tok.eot_id)
    for row, text in enumerate(["a large blue star on the top", "a red square"]):
        n = len(tok.encode(text))
        assert eot[row] == n + 1 and (ids[row] == tok.eot_id).sum() == 1
        assert (ids[row, n + 2:] == tok.pad_id).all()  # padding after eot
        assert ids[row, 1:n + 1].tolist() == tok.encode(text)
        assert tok.decode(ids[row]) == text  # specials and padding dropped
    # reused from the cache directory, same model, no texts needed
    again = build_tokenizer("sentencepiece", None, None, vocab_size=200, cache_dir=str(tmp_path))
    assert torch.equal(again(["a red square"], 16), ids[1:])


def test_sentencepiece_training_is_deterministic(tmp_path):
    a = SentencePieceTokenizer.train(CAPTIONS, str(tmp_path / "a" / "m"), vocab_size=60)
    b = SentencePieceTokenizer.train(CAPTIONS, str(tmp_path / "b" / "m"), vocab_size=60)
    assert (tmp_path / "a" / "m.model").read_bytes() == (tmp_path / "b" / "m.model").read_bytes()
    assert a.encode("a small red circle") == b.encode("a small red circle")
    assert not list(tmp_path.glob("*/*.tmp*"))  # temporary files renamed away


def test_sentencepiece_vocab_adapts_to_small_corpus(tmp_path):
    tok = SentencePieceTokenizer.train(["a red circle", "a blue square"], str(tmp_path / "m"), vocab_size=1000)
    assert 10 < tok.vocab_size < 1000
    assert tok.decode(tok.encode("a blue circle")) == "a blue circle"
    with pytest.raises(ValueError, match="vocab_size=5"):
        SentencePieceTokenizer.train(["a red circle", "a blue square"], str(tmp_path / "tiny"), vocab_size=5)


def test_truncation_keeps_eot(tmp_path):
    tok = SentencePieceTokenizer.train(CAPTIONS, str(tmp_path / "m"), vocab_size=100)
    long_text = " ".join(CAPTIONS[:10])
    ids = tok([long_text, "a red star"], context_length=8)
    assert ids[0, 0] == tok.sot_id and ids[0, -1] == tok.eot_id
    assert ids[0, 1:7].tolist() == tok.encode(long_text)[:6]
    assert eot_positions(ids, tok.eot_id).tolist() == [7, len(tok.encode("a red star")) + 1]
    with pytest.raises(ValueError, match="context_length"):
        tok("a", context_length=1)


def _write_merges(path):
    merges = ["#version: 0.2", "r e", "re d</w>", "c i", "ci r", "l e</w>", "s t", "st a", "sta r</w>"]
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(merges) + "\n")


def test_clip_bpe_round_trip_and_special_ids(tmp_path):
    path = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    _write_merges(path)
    tok = build_tokenizer("clip_bpe", str(path))
    assert isinstance(tok, ClipBPETokenizer)
    assert tok.vocab_size == 512 + 8 + 2  # bytes, bytes + '</w>', merges, two specials
    assert (tok.sot_id, tok.eot_id, tok.pad_id) == (tok.vocab_size - 2, tok.vocab_size - 1, 0)
    assert tok.encoder["<start_of_text>"] == tok.sot_id and tok.encoder["<end_of_text>"] == tok.eot_id
    ids = tok.encode("A  red  Star!")
    assert ids == [tok.encoder["a</w>"], tok.encoder["red</w>"], tok.encoder["star</w>"], tok.encoder["!</w>"]]
    assert tok.decode(ids) == "a red star !"
    assert tok.encode("circle") == [tok.encoder["cir"], tok.encoder["c"], tok.encoder["le</w>"]]
    assert tok.decode(tok.encode("héllo wörld 42")) == "héllo wörld 4 2"  # multi-byte chars survive
    assert tok.decode(tok.encode("wow!!")) == "wow !!"  # '!' is id 0, the pad id: kept inside text
    assert tok.encode("<end_of_text>") == [tok.eot_id]
    row = tok("red star", context_length=6)[0]
    assert row.tolist() == [tok.sot_id, tok.encoder["red</w>"], tok.encoder["star</w>"], tok.eot_id, 0, 0]
    assert tok.decode(row) == "red star"


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="use one of sentencepiece, clip_bpe"):
        build_tokenizer("wordpiece")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        build_tokenizer("sentencepiece", str(tmp_path / "nope.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model"):
        build_tokenizer("sentencepiece", str(bad))
    with pytest.raises(FileNotFoundError, match="missing.txt.gz"):
        build_tokenizer("clip_bpe", str(tmp_path / "missing.txt.gz"))
    corrupt = tmp_path / "bpe.gz"
    corrupt.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ValueError, match="bpe.gz"):
        build_tokenizer("clip_bpe", str(corrupt))
    with pytest.raises(ValueError, match="cache"):
        build_tokenizer("sentencepiece", None, CAPTIONS)


def test_tokenizers_pickle(tmp_path):
    """Spawned DataLoader workers receive the tokenizer by pickle."""
    import pickle

    _write_merges(tmp_path / "bpe.txt.gz")
    bpe = ClipBPETokenizer(str(tmp_path / "bpe.txt.gz"))
    sp = SentencePieceTokenizer.train(CAPTIONS, str(tmp_path / "m"), vocab_size=60)
    for tok in (bpe, sp):
        tok.encode("a red star")
        assert torch.equal(pickle.loads(pickle.dumps(tok))(["a red star"], 8), tok(["a red star"], 8))
