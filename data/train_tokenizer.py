"""Train a SentencePiece tokenizer on the captions of your own WebDataset shards, with the special
pieces this project expects (pad=0, unk=1, bos=2 start-of-text, eos=3 end-of-text).

    python -m data.train_tokenizer 'shards/train-{000000..000099}.tar' --out tokenizer/spm.model --vocab-size 8000

then train with `data.tokenizer.type=sentencepiece data.tokenizer.path=tokenizer/spm.model`.
Captions are the `txt` (or `text`, `caption`) members; unreadable shards are skipped and named.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tarfile

log = logging.getLogger(__name__)

CAPTION_SUFFIXES = (".txt", ".text", ".caption")
REQUIREMENTS = ("a user-supplied SentencePiece model needs pad, bos and eos pieces: this project uses pad_id=0, "
                "unk_id=1, bos_id=2 (start of text), eos_id=3 (end of text), e.g. spm_train ... --pad_id=0 "
                "--unk_id=1 --bos_id=2 --eos_id=3, or train one on your shards' captions with "
                "`python -m data.train_tokenizer '<your shards>' --out tokenizer/spm.model`")


def read_shard_captions(shards: list[str], max_captions: int | None = None) -> tuple[list[str], list[str]]:
    """(captions, skipped shards) from the caption members of `shards`, in shard order."""
    captions, skipped = [], []
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(CAPTION_SUFFIXES):
                        captions.append(tar.extractfile(member).read().decode("utf-8", errors="replace").strip())
                        if max_captions is not None and len(captions) >= max_captions:
                            return captions, skipped
        except (OSError, tarfile.TarError) as exc:
            skipped.append(f"{shard} ({exc})")
            log.warning("skipped unreadable shard %s: %s", shard, exc)
    return captions, skipped


def train_from_shards(spec, out_path: str, vocab_size: int = 8000, max_captions: int | None = None) -> str:
    """Write `out_path` (a .model) trained on the captions of the shards `spec` names."""
    from data.pipeline import expand_shards
    from data.tokenizers import SentencePieceTokenizer

    if not out_path.endswith(".model"):
        raise ValueError(f"--out {out_path}: the file name must end in .model")
    if os.path.exists(out_path):
        raise FileExistsError(f"{out_path} exists; choose a new file (nothing was written)")
    captions, skipped = read_shard_captions(expand_shards(spec), max_captions)
    if not captions:
        raise ValueError(f"no captions (txt members) found in {spec!r}" + (f"; unreadable: {skipped}" if skipped else ""))
    prefix = out_path[: -len(".model")]
    tmp_prefix = prefix + ".tmp"
    SentencePieceTokenizer.train(captions, tmp_prefix, vocab_size)
    shutil.move(tmp_prefix + ".model", out_path)
    for leftover in (tmp_prefix + ".vocab",):
        if os.path.exists(leftover):
            os.remove(leftover)
    tok = SentencePieceTokenizer(out_path)
    log.info("wrote %s: %d pieces from %d captions%s", out_path, tok.vocab_size, len(captions),
             f" ({len(skipped)} shards skipped)" if skipped else "")
    return out_path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.train_tokenizer", description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", help="brace pattern, glob or directory of .tar shards (quote it)")
    parser.add_argument("--out", required=True, help="the .model file to write (must not exist)")
    parser.add_argument("--vocab-size", type=int, default=8000, help="upper bound; a small corpus gets fewer")
    parser.add_argument("--max-captions", type=int, default=None, help="read at most this many captions")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = train_from_shards(args.shards, args.out, args.vocab_size, args.max_captions)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path}; train with data.tokenizer.type=sentencepiece data.tokenizer.path={path}")


if __name__ == "__main__":
    main()
