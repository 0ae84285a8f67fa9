"""Converted open_clip and Hugging Face CLIP weights at TP=2: each rank's embeddings equal the
source model's within 1e-5 (fp32), and the gathered weights convert back to a strict load with the
same outputs. The TP=1 side of the same round trips is in tests/unit/test_convert_*.py.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import run_ranks

TOL = 1e-5
TP = 2


def _run_converted(tp: int, jobs: dict) -> dict:
    """On each rank: build CLIPModel at `tp`, load its cut of each job's full state dict, embed, gather."""
    from models.clip.model import CLIPModel
    from parallel.context import initialize_parallel
    from parallel.tp_sharding import gather_full_state_dict, shard_full_state_dict

    ctx = initialize_parallel(tp, 1, device="cpu", seed=7)
    results = {}
    for name, (cfg, full, images, tokens) in jobs.items():
        model = CLIPModel(cfg).eval()
        shard = shard_full_state_dict(full, model, ctx.tp_rank, tp)
        model.load_state_dict(shard, strict=True)
        rows = model.text.token_embedding.weight.shape[0]
        with torch.no_grad():
            image, text = model.encode_image(images), model.encode_text(tokens)
        results[name] = {"image": image, "text": text, "state": gather_full_state_dict(model, ctx.tp_group),
                         "local_vocab_rows": rows}
    return results


def _open_clip_job(tmp_path, model_cfg=None, pad_ffn_to: int = 1):
    from conversion.clip_layout import pad_ffn
    from conversion.openclip_format import import_openclip
    from tests.unit.test_convert_open_clip import TINY, build_openclip, openclip_embeddings, tiny_inputs

    model_cfg = model_cfg or TINY
    reference = build_openclip(model_cfg, tmp_path)
    images, tokens = tiny_inputs(model_cfg)
    cfg, full = import_openclip(reference.state_dict(), model_cfg)
    if pad_ffn_to > 1:
        cfg, full = pad_ffn(cfg, full, pad_ffn_to)
    return reference, openclip_embeddings(reference, images, tokens), (cfg, full, images, tokens)


def _padded_open_clip_job(tmp_path):
    """MLP widths 129/161 (odd, as ViT-g-14's 6143) padded with zero units to 130/162 for TP=2."""
    from tests.unit.test_convert_open_clip import TINY_ODD_FFN

    return _open_clip_job(tmp_path, TINY_ODD_FFN, pad_ffn_to=TP)


def _hf_job():
    from conversion.hf_clip_format import clip_config_from_hf, hf_to_clip_state_dict
    from tests.unit.test_convert_hf_clip import TINY_TEXT, TINY_VISION, build_hf, hf_embeddings, hf_inputs

    reference = build_hf(TINY_TEXT, TINY_VISION, 32)
    images, ids = hf_inputs(TINY_TEXT, TINY_VISION)
    cfg = clip_config_from_hf(reference.config.to_dict())
    return reference, hf_embeddings(reference, images, ids), (cfg, hf_to_clip_state_dict(reference.state_dict(), cfg),
                                                              images, ids)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Both formats in one TP=2 launch (spawning ranks is the slow part)."""
    references, jobs = {}, {}
    for name, make in (("open_clip", lambda: _open_clip_job(tmp_path_factory.mktemp("oc"))), ("hf", _hf_job),
                       ("open_clip_padded", lambda: _padded_open_clip_job(tmp_path_factory.mktemp("ocp")))):
        try:
            reference, embeddings, job = make()
        except pytest.skip.Exception as skip:  # that library is not importable outside CI
            references[name] = skip
            continue
        references[name], jobs[name] = (reference, embeddings), job
    results = run_ranks(TP, _run_converted, TP, jobs) if jobs else [{} for _ in range(TP)]
    return references, jobs, results


def _check(converted, name, to_source):
    references, jobs, results = converted
    if isinstance(references[name], BaseException):
        pytest.skip(str(references[name]))
    (reference, (ref_image, ref_text)), (cfg, full, images, tokens) = references[name], jobs[name]
    # vocab 300 pads to 384 rows at TP=1 and 512 at TP=2: each rank holds 256 rows
    assert full["text.token_embedding.weight"].shape[0] == 384
    for rank, res in enumerate(results):
        res = res[name]
        assert res["local_vocab_rows"] == 256
        torch.testing.assert_close(res["image"], ref_image, atol=TOL, rtol=TOL, msg=lambda m: f"rank {rank}: {m}")
        torch.testing.assert_close(res["text"], ref_text, atol=TOL, rtol=TOL, msg=lambda m: f"rank {rank}: {m}")
    gathered = results[0][name]["state"]
    assert gathered["text.token_embedding.weight"].shape[0] == 512
    back = to_source(gathered, cfg)
    fresh = type(reference)(reference.config) if hasattr(reference, "config") else None
    return reference, back, fresh, images, tokens, ref_image, ref_text


def test_open_clip_at_tp2(converted):
    from conversion.openclip_format import clip_to_openclip_state_dict, openclip_config_from_clip
    from tests.unit.test_convert_open_clip import build_openclip, openclip_embeddings

    reference, back, _, images, tokens, ref_image, ref_text = _check(converted, "open_clip",
                                                                     clip_to_openclip_state_dict)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cfg = converted[1]["open_clip"][0]
        fresh = build_openclip(openclip_config_from_clip(cfg), tmp, seed=3)
    fresh.load_state_dict(back, strict=True)
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    for a, b in zip(openclip_embeddings(fresh, images, tokens), (ref_image, ref_text)):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)


def test_hf_at_tp2(converted):
    from conversion.hf_clip_format import clip_to_hf_state_dict
    from tests.unit.test_convert_hf_clip import hf_embeddings

    reference, back, fresh, images, ids, ref_image, ref_text = _check(converted, "hf", clip_to_hf_state_dict)
    fresh.eval().load_state_dict(back, strict=True)
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    for a, b in zip(hf_embeddings(fresh, images, ids), (ref_image, ref_text)):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)


def test_open_clip_with_padded_ffn_at_tp2(converted):
    from conversion.openclip_format import export_openclip
    from tests.unit.test_convert_open_clip import TINY_ODD_FFN, openclip_embeddings

    def to_source(state, cfg):
        assert (cfg.vision.ffn_hidden_size, cfg.text.ffn_hidden_size) == (130, 162)
        model_cfg, back = export_openclip(state, cfg, target=TINY_ODD_FFN)
        assert model_cfg == TINY_ODD_FFN
        return back

    reference, back, _, images, tokens, ref_image, ref_text = _check(converted, "open_clip_padded", to_source)
    expected = {k: v.clone() for k, v in reference.state_dict().items()}
    reference.load_state_dict(back, strict=True)
    for name, tensor in expected.items():
        torch.testing.assert_close(reference.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    for a, b in zip(openclip_embeddings(reference, images, tokens), (ref_image, ref_text)):
        torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)
