"""Re-sharding: a checkpoint saved at TP=2 x PP=2 x DP=2 with ZeRO-1 loads at TP=1/PP=1/DP=1 (into
the replicated AdamW), at TP=4 and at PP=4, and training continues with the same losses; saved again at the
new layout it holds bit-identical canonical tensors (weights and Adam moments), so the re-sharding
itself is exact. Offline re-sharding (`reshard_checkpoint`) loads the same way.

Tolerance on losses: the layouts sum in different orders (TP all-reduces, pipeline, DP gathers);
measured differences are below 1e-7 relative; 1e-5 still catches a lost moment or a wrong shard
(1e-3 and up).
"""
import os

import pytest
import torch

from engine.checkpoint.reader import CheckpointReader
from tests.distributed.harness import run_ranks
from tests.distributed.test_checkpoint_helpers import reshard_overrides, run_layout

BEFORE, AFTER = 2, 2


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    shapes = str(root / "shapes")
    results = run_ranks(8, run_layout, reshard_overrides(shapes, 2, 2, 8, "distributed_fused_adam"),
                        str(root / "tp2pp2dp2"), None, BEFORE, AFTER, timeout=600)
    return {"root": root, "shapes": shapes, "path": results[0]["saved"], "losses": results[-1]["losses"]}


def _assert_same_tensors(a: str, b: str):
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert set(ra.keys("model/")) == set(rb.keys("model/"))
    for key in ra.keys("model/") + ra.keys("optim/exp_avg"):
        a, b = ra.read_tensor(key), rb.read_tensor(key)
        if ra.tensors[key]["padded"]:  # vocab rows padded to a multiple of 128 x TP: extra rows are zeros
            rows = min(a.shape[0], b.shape[0])
            assert not a[rows:].any() and not b[rows:].any(), key
            a, b = a[:rows], b[:rows]
        assert torch.equal(a, b), key
    return ra, rb


@pytest.mark.parametrize("tp,pp,world,optimizer", [
    (1, 1, 1, "adamw"), (4, 1, 4, "distributed_fused_adam"), (1, 4, 4, "distributed_fused_adam")])
def test_load_at_another_layout_continues_with_the_same_loss(saved, tp, pp, world, optimizer):
    out = str(saved["root"] / f"tp{tp}pp{pp}")
    results = run_ranks(world, run_layout, reshard_overrides(saved["shapes"], tp, pp, world, optimizer), out,
                        saved["path"], 0, AFTER, timeout=600)
    want = saved["losses"][BEFORE:]
    got = results[0]["losses"]
    print(f"TP={tp} PP={pp}: losses {got}, saved layout {want}, max rel diff "
          f"{max(abs(a - b) / abs(b) for a, b in zip(got, want)):.1e}")
    assert got == pytest.approx(want, rel=1e-5), (got, want)
    assert results[0]["step"] == BEFORE + AFTER
    # saved again right after loading: the same canonical tensors, bit for bit
    ra, rb = _assert_same_tensors(saved["path"], results[0]["saved"])
    assert rb.meta["layout"]["tensor_model_parallel_size"] == tp
    assert rb.meta["optimizer"]["step"] == ra.meta["optimizer"]["step"] == BEFORE


def test_offline_reshard_then_load(saved):
    from engine.checkpoint.tools import reshard_checkpoint

    offline = reshard_checkpoint(saved["path"], str(saved["root"] / "offline_tp4"), 4, 1)
    _assert_same_tensors(saved["path"], offline)
    assert len(CheckpointReader(offline).chunks("model/text.transformer.layers.3.mlp.linear_fc1.weight")) == 4
    out = str(saved["root"] / "from_offline")
    results = run_ranks(4, run_layout, reshard_overrides(saved["shapes"], 4, 1, 4, "distributed_fused_adam"), out,
                        offline, 0, AFTER, timeout=600)
    assert results[0]["losses"] == pytest.approx(saved["losses"][BEFORE:], rel=1e-5)
    assert os.path.basename(results[0]["saved"]) == f"step_{BEFORE:09d}"


def test_model_only_checkpoint_starts_training_at_any_layout(saved):
    """`write_model_checkpoint` (what weight converters write) from the full TP=1 weights of the
    saved run: loads at TP=2 x DP=2 as weights only (step 0, fresh Adam state), and its first loss is
    the saved run's loss on the same batch."""
    from engine.checkpoint.tools import read_model_checkpoint, write_model_checkpoint

    cfg, full = read_model_checkpoint(saved["path"])
    weights = write_model_checkpoint(str(saved["root"] / "weights_only"), cfg, full)
    out = str(saved["root"] / "from_weights")
    results = run_ranks(4, run_layout, reshard_overrides(saved["shapes"], 2, 1, 4, "adamw"), out, weights, 0, 1,
                        BEFORE, timeout=600)
    assert results[0]["losses"][0] == pytest.approx(saved["losses"][BEFORE], rel=1e-5)
    assert results[0]["step"] == 1 and results[0]["adam_step"] == 1  # counted from 0: no optimizer state
