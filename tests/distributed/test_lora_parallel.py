"""LoRA and init-from-teacher under tensor parallelism, against TP=1 with the same full weights.

TP=2 (with and without sequence parallelism), adapters on the query/value slices of the fused QKV
(column-parallel), the attention output and fc2 (row-parallel) and fc1: forward features and every
gradient (base and adapters, gathered to TP=1 shapes) equal TP=1 within 1e-5 (fp32); the merged
export gathered from TP=2 equals TP=1's merged export. A TP=1 teacher's state initialises a TP=2
student exactly where names and shapes match.
"""
import pytest
import torch

from tests.distributed.clip_fixtures import tiny_batch, tiny_clip_config
from tests.distributed.harness import run_ranks

TOL = 1e-5
TARGETS = ["q_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _run(tp: int, sequence_parallel: bool, full_state, teacher_state):
    from models.clip.distill import init_from_teacher
    from models.clip.loss import ContrastiveLoss
    from models.clip.model import CLIPModel
    from models.common.lora import LoRAConfig, apply_lora, merged_state_dict
    from parallel.context import initialize_parallel
    from parallel.sequence_parallel import allreduce_sequence_parallel_grads
    from parallel.tp_sharding import (
        gather_full_grads,
        gather_full_state_dict,
        shard_full_state_dict,
    )

    ctx = initialize_parallel(tp, 1, device="cpu", seed=7)
    cfg = tiny_clip_config()
    model = CLIPModel(cfg, sequence_parallel=sequence_parallel)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0, target_modules=TARGETS))
    if full_state is None:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("lora_B"):
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    else:
        model.load_state_dict(shard_full_state_dict(full_state, model, ctx.tp_rank, tp))
    images, tokens = tiny_batch(4, seed=3, cfg=cfg)
    image, text, scale = model(images, tokens)
    loss = ContrastiveLoss()(image, text, scale)
    (loss + image.pow(2).mean() + text.mean()).backward()
    allreduce_sequence_parallel_grads(model.parameters())
    plain = CLIPModel(cfg)  # the merged export, gathered to TP=1
    plain.load_state_dict(merged_state_dict(model))
    student = CLIPModel(tiny_clip_config(), sequence_parallel=sequence_parallel)
    report = init_from_teacher(student, teacher_state, ctx.tp_rank, tp) if teacher_state is not None else None
    return {"image": image.detach(), "text": text.detach(), "grads": gather_full_grads(model, ctx.tp_group),
            "state": gather_full_state_dict(model, ctx.tp_group),
            "merged": gather_full_state_dict(plain, ctx.tp_group),
            "student": gather_full_state_dict(student, ctx.tp_group) if report else None,
            "report": (report.copied, report.shape_mismatch) if report else None}


def _reference():
    """The TP=1 run, and a TP=1 teacher with 16-pixel patches (the students have 8)."""
    from models.clip.model import CLIPModel

    out = _run(1, False, None, None)
    cfg = tiny_clip_config()
    cfg.vision.patch_dim = 16
    out["teacher"] = {k: v for k, v in CLIPModel(cfg).state_dict().items() if v is not None}
    return out


@pytest.fixture(scope="module")
def reference():
    return run_ranks(1, _reference)[0]


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_lora_tp2_matches_tp1(reference, sequence_parallel):
    teacher = reference["teacher"] if not sequence_parallel else None
    results = run_ranks(2, _run, 2, sequence_parallel, reference["state"], teacher)
    lora_b = "visual.transformer.layers.0.self_attention.linear_qkv.lora.value.lora_B"
    assert reference["grads"][lora_b].abs().sum() > 0
    for r in results:
        torch.testing.assert_close(r["image"], reference["image"], atol=TOL, rtol=TOL)
        torch.testing.assert_close(r["text"], reference["text"], atol=TOL, rtol=TOL)
        assert r["grads"].keys() == reference["grads"].keys()
        for name, want in reference["grads"].items():
            got = r["grads"][name][: want.shape[0]] if "token_embedding" in name else r["grads"][name]
            torch.testing.assert_close(got, want, atol=TOL, rtol=TOL, msg=lambda m, n=name: f"{n}: {m}")
        for name, want in reference["merged"].items():
            if want is None:
                continue
            got = r["merged"][name][: want.shape[0]] if "token_embedding" in name else r["merged"][name]
            torch.testing.assert_close(got, want, atol=TOL, rtol=TOL, msg=lambda m, n=name: f"merged {n}: {m}")
    if teacher is None:
        return
    copied, mismatched = results[0]["report"]
    assert {n for n, _, _ in mismatched} == {"visual.conv1.weight", "visual.positional_embedding"}
    for r in results:
        for name in copied:
            want = teacher[name]
            got = r["student"][name][: want.shape[0]] if "token_embedding" in name else r["student"][name]
            assert torch.equal(got, want), name
