"""Extraction on 4 ranks (TP=2 x DP=2: the source shards split over the two replicas, each replica's
towers tensor-parallel) writes what one process writes: the same chunks in the same order, the same
keys and captions, features within 1e-5 (fp32 storage)."""
import torch

from tests.distributed.dit_fixtures import condition_spec, read_captions, tiny_shapes, tiny_target_checkpoint
from tests.distributed.harness import run_ranks


def _extract(out, shards, checkpoint, tokenizer, tp):
    from models.dit.extraction import extract
    from models.dit.towers import TowerSpec
    from parallel.context import initialize_parallel

    ctx = initialize_parallel(tp, 1, device="cpu", seed=0)
    manifest = extract(out, shards, condition_spec(),
                       TowerSpec(f"checkpoint:{checkpoint}", tokenizer=f"sentencepiece:{tokenizer}"),
                       device=ctx.device, dp_rank=ctx.dp_rank, dp_size=ctx.dims.dp, tp_rank=ctx.tp_rank,
                       rank=ctx.rank, samples_per_chunk=5, batch_size=4, dtype="float32")
    return manifest


def _contents(directory):
    from models.dit.embeddings import EmbeddingSet

    data = EmbeddingSet(directory, verify_checksums=True)
    keys = [k for i in range(len(data.chunks)) for k in data.metadata(i)["keys"]]
    return ([c.name for c in data.chunks], keys, data.captions(),
            data.read_all(["condition", "target_patches", "target_embedding", "text_embedding"]))


def test_tp2_dp2_extraction_equals_one_process(tmp_path):
    shards = tiny_shapes(str(tmp_path / "shapes"))
    checkpoint, tokenizer = tiny_target_checkpoint(str(tmp_path), read_captions(shards))
    single = run_ranks(1, _extract, str(tmp_path / "one"), shards, checkpoint, tokenizer, 1)[0]
    four = run_ranks(4, _extract, str(tmp_path / "four"), shards, checkpoint, tokenizer, 2)
    assert all(m["num_samples"] == single["num_samples"] == 36 for m in four)
    a, b = _contents(str(tmp_path / "one")), _contents(str(tmp_path / "four"))
    assert a[:3] == b[:3]
    for name, tensor in a[3].items():
        torch.testing.assert_close(b[3][name], tensor, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
