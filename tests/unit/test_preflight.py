"""What a run with user data can get wrong is found before any process group exists (CLIP's
preflight), tokenizers a user brings are checked for the ids the project uses, a tokenizer can be
trained on the user's own shards, logs print once, and the memory estimator refuses what the
launcher refuses."""
import json
import logging
import os
import subprocess
import sys
import tarfile

import pytest

from data.synthetic import generate_shapes_dataset
from engine.config import load_config
from engine.family import get_family
from engine.run import RankFilter
from engine.schema import BARE_KEYS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("userdata")
    generate_shapes_dataset(str(out), num_train=64, num_eval=16, image_size=16, samples_per_shard=32, seed=0)
    return out


def _cfg(*overrides):
    clip = get_family("clip")
    return load_config(clip.config_cls, os.path.join(REPO, "configs/clip/tiny.yaml"), list(overrides), BARE_KEYS)


def test_user_shards_without_a_tokenizer_name_the_key_and_the_fix(shards):
    problems = get_family("clip").preflight(_cfg(f"data.train_shards={shards}/train-*.tar"))
    assert len(problems) == 1
    assert "data.tokenizer.path is required with user shards" in problems[0]
    assert "pad_id=0, unk_id=1, bos_id=2" in problems[0] and "python -m data.train_tokenizer" in problems[0]


def test_missing_files_are_named(shards, tmp_path):
    problems = get_family("clip").preflight(_cfg(
        f"data.train_shards={tmp_path}/none-{{000..003}}.tar", f"data.classes_file={tmp_path}/classes.json",
        "data.tokenizer.type=clip_bpe", f"data.tokenizer.path={tmp_path}/bpe.txt.gz"))
    text = "\n".join(problems)
    assert "data.train_shards: no shards match" not in text  # braces expand to names; the files are checked later
    assert f"data.classes_file={tmp_path}/classes.json: no such file" in text
    assert f"data.tokenizer.path={tmp_path}/bpe.txt.gz: no such file" in text


def _train_default_spm(tmp_path, texts) -> str:
    """A SentencePiece model trained with SentencePiece's defaults (no pad piece, bos 1, eos 2)."""
    import sentencepiece as spm

    prefix = str(tmp_path / "default")
    spm.SentencePieceTrainer.Train(sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=60,
                                   hard_vocab_limit=False, minloglevel=2, num_threads=1)
    return prefix + ".model"


def test_a_default_sentencepiece_model_is_refused_with_the_ids_named(shards, tmp_path):
    from data.synthetic import read_captions

    path = _train_default_spm(tmp_path, read_captions(str(shards)))
    problems = get_family("clip").preflight(_cfg(f"data.train_shards={shards}/train-*.tar",
                                                 f"data.tokenizer.path={path}"))
    assert len(problems) == 1 and "pad_id=-1" in problems[0] and "pad_id=0, unk_id=1, bos_id=2" in problems[0]


def test_train_a_tokenizer_on_user_shards(shards, tmp_path):
    from data.tokenizers import SentencePieceTokenizer

    out = tmp_path / "tok" / "spm.model"
    result = subprocess.run([sys.executable, "-m", "data.train_tokenizer", f"{shards}/train-{{000000..000001}}.tar",
                             "--out", str(out), "--vocab-size", "120"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    tok = SentencePieceTokenizer(str(out))
    assert (tok.pad_id, tok.sot_id, tok.eot_id) == (0, 2, 3)
    assert tok.decode(tok("a small red circle on the left")[0].tolist()) == "a small red circle on the left"
    assert get_family("clip").preflight(_cfg(f"data.train_shards={shards}/train-*.tar",
                                             f"data.tokenizer.path={out}")) == []
    again = subprocess.run([sys.executable, "-m", "data.train_tokenizer", f"{shards}", "--out", str(out)],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists" in again.stderr  # never overwrites


def test_zero_shot_without_class_index_is_warned_at_start(shards, tmp_path, caplog):
    from data.train_tokenizer import train_from_shards

    plain = tmp_path / "plain-000000.tar"
    with tarfile.open(shards / "eval-000000.tar") as src, tarfile.open(plain, "w") as dst:
        for member in src:
            data = src.extractfile(member).read()
            if member.name.endswith(".json"):
                sample = json.loads(data)
                sample.pop("class_index")
                data = json.dumps(sample).encode()
            member.size = len(data)
            import io
            dst.addfile(member, io.BytesIO(data))
    tok = train_from_shards(f"{shards}/train-*.tar", str(tmp_path / "spm.model"), vocab_size=120)
    with caplog.at_level(logging.WARNING):
        problems = get_family("clip").preflight(_cfg(
            f"data.train_shards={shards}/train-*.tar", f"data.eval_shards={plain}",
            f"data.classes_file={shards}/classes.json", f"data.tokenizer.path={tok}"))
    assert problems == []
    assert any("zero-shot evaluation is off" in r.message and "'class_index'" in r.message
               and "classes.json" in r.message for r in caplog.records)


def test_rank_filter_prints_rank_independent_records_once():
    def record(level, **extra):
        rec = logging.LogRecord("engine", level, __file__, 1, "message", None, None)
        rec.__dict__.update(extra)
        return rec

    rank0, rank1_leader, rank1 = RankFilter(0), RankFilter(1, replica_leader=True), RankFilter(3)
    assert rank0.filter(record(logging.INFO)) and rank0.filter(record(logging.WARNING))
    assert not rank1.filter(record(logging.WARNING)) and not rank1_leader.filter(record(logging.WARNING))
    assert rank1.filter(record(logging.ERROR))
    assert rank1_leader.filter(record(logging.WARNING, per_replica=True))
    assert not rank1.filter(record(logging.WARNING, per_replica=True))


def test_memory_estimate_refuses_what_the_launcher_refuses():
    result = subprocess.run([sys.executable, "examples/estimate_memory.py", "--config", "configs/clip/g14.yaml",
                             "--world-size", "4", "tensor_model_parallel_size=4"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    assert "error: model.vision.num_attention_heads=22 is not divisible by tensor_model_parallel_size=4" in result.stderr
    assert "Traceback" not in result.stderr and "total" not in result.stdout


def test_a_second_run_on_a_locked_directory_stops_before_writing(tmp_path):
    from engine.checkpoint.lock import RunLock

    out = tmp_path / "run"
    lock = RunLock(str(out / "checkpoints")).acquire()  # this test process is the live holder
    try:
        result = subprocess.run([sys.executable, "examples/pretrain_clip.py", "--config", "configs/clip/tiny.yaml",
                                 "device=cpu", f"trainer.output_dir={out}", f"data.synthetic.out_dir={tmp_path}/shapes"],
                                cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        lock.release()
    assert result.returncode == 2, result.stderr
    assert "error:" in result.stderr and f"pid {os.getpid()}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "config.yaml").exists() and not (tmp_path / "shapes").exists()  # nothing was written
