import gzip

import pytest
import torch

from data.tokenizers import ClipBPETokenizer, SentencePieceTokenizer, build_tokenizer, eot_positions

CAPTIONS = [f"a {s} {c} {shape} on the {p}" for s in ("small", "large") for c in ("red", "blue", "green")
            for shape in ("circle", "square", "star") for p in ("left", "right", "top")]


def test_sentencepiece_train_encode_decode(tmp_path):
    tok = build_tokenizer("sentencepiece", None, CAPTIONS, vocab_size=200, cache_dir=str(tmp_path))
    assert tok.decode(tok.encode("a small red circle on the left")) == "a small red circle on the left"
    ids = tok(["a large blue star on the top", "a red square"], context_length=16)
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    assert (ids[:, 0] == tok.sot_id).all()
    assert (ids[0] == tok.eot_id).sum() == 1 and ids[0, -1] == tok.pad_id
    # reused from the cache directory, same model
    again = build_tokenizer("sentencepiece", None, None, vocab_size=200, cache_dir=str(tmp_path))
    assert torch.equal(again(["a red square"], 16), ids[1:])


def test_truncation_keeps_eot(tmp_path):
    tok = SentencePieceTokenizer.train(CAPTIONS, str(tmp_path / "m"), vocab_size=100)
    ids = tok(" ".join(CAPTIONS[:10]), context_length=8)
    assert ids[0, 0] == tok.sot_id and ids[0, -1] == tok.eot_id
    assert eot_positions(ids, tok.eot_id).tolist() == [7]


def _write_merges(path):
    merges = ["#version: 0.2", "r e", "re d</w>", "c i", "ci r", "l e</w>", "s t", "st a", "sta r</w>"]
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(merges) + "\n")


def test_clip_bpe_round_trip_and_special_ids(tmp_path):
    path = tmp_path / "bpe.txt.gz"
    _write_merges(path)
    tok = ClipBPETokenizer(str(path))
    assert tok.vocab_size == 512 + 8 + 2
    assert (tok.sot_id, tok.eot_id, tok.pad_id) == (tok.vocab_size - 2, tok.vocab_size - 1, 0)
    ids = tok.encode("A  red  Star!")
    assert tok.encoder["red</w>"] in ids and tok.encoder["star</w>"] in ids  # merges applied
    assert tok.decode(ids) == "a red star !"
    row = tok("red star", context_length=6)[0]
    assert row.tolist()[:4] == [tok.sot_id, tok.encoder["red</w>"], tok.encoder["star</w>"], tok.eot_id]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="use one of sentencepiece, clip_bpe"):
        build_tokenizer("wordpiece")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        build_tokenizer("sentencepiece", str(tmp_path / "nope.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model"):
        build_tokenizer("sentencepiece", str(bad))
    corrupt = tmp_path / "bpe.gz"
    corrupt.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ValueError, match="bpe.gz"):
        build_tokenizer("clip_bpe", str(corrupt))
