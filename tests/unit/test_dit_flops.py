"""The DiT's analytic FLOPs (models/dit/flops.py) against torch's FlopCounterMode on the engine's own
GlobalDiT (megatron-core adaLN layers, 3D RoPE, attention pooling), forward and backward of the
training loss (velocity MSE + the contrastive term), as tests/unit/test_flops.py does for CLIP and
the LLM. SDPA is pinned to its math kernel so attention runs as visible matmuls. Tiny DiTs run on
CPU with real tensors; the seed's default size (configs/dit/global_768.yaml) on the meta device.
Tolerance: relative 1e-9 (the formula counts the same matmuls; the tolerance only absorbs float
rounding), so a matmul the formula misses or adds fails the test.
"""
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from engine.config import load_config
from engine.schema import BARE_KEYS
from models.dit.config import DiTExperimentConfig
from models.dit.flops import (
    forward_flops,
    forward_flops_per_sample,
    training_flops_breakdown,
    training_flops_per_sample,
)
from models.dit.flow import FlowPath, contrastive_loss, velocity_loss

REL = 1e-9


def counted_dit_flops(model_cfg, batch: int, device: str) -> tuple[float, float]:
    """(forward, backward) FLOPs FlopCounterMode sees for one DiT training micro-batch on one rank."""
    from models.dit.model import GlobalDiT

    torch.manual_seed(0)
    with torch.device(device):
        model = GlobalDiT(model_cfg, use_cpu_initialization=True, perform_initialization=device != "meta")
        condition = torch.randn(batch, model_cfg.num_patches, model_cfg.condition_dim)
        x1, eps = torch.randn(batch, model_cfg.output_dim), torch.randn(batch, model_cfg.output_dim)
        t = torch.rand(batch)
    model.train()
    model.rotary_pos_emb(torch.device(device))  # the RoPE table is computed once per model and cached
    path, flow = FlowPath(model_cfg.flow.sigma_min), model_cfg.flow
    x_t, u = path.interpolate(x1, eps, t), path.velocity(x1, eps)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as forward:
            v = model(condition, x_t, t)
            loss = velocity_loss(v, u)
            if flow.use_contrastive_loss:
                loss = loss + flow.contrastive_weight * contrastive_loss(
                    path.clean_from_velocity(v, x_t, t), x1, flow.contrastive_temperature)
        with FlopCounterMode(display=False) as backward:
            loss.backward()
    return forward.get_total_flops(), backward.get_total_flops()


def tiny(overrides=()):
    return load_config(DiTExperimentConfig, "configs/dit/tiny.yaml", list(overrides), BARE_KEYS).model


@pytest.mark.parametrize("overrides,batch", [
    ((), 6),
    (("model.token_layout=concat",), 4),  # twice the tokens, the noisy vector's copies as tokens
    (("model.flow.use_contrastive_loss=false", "model.condition_norm=false", "model.attention_pool_heads=2"), 5),
], ids=["tiny", "concat", "no-contrastive"])
def test_formula_matches_flop_counter_on_tiny_dits(single_rank, overrides, batch):
    cfg = tiny(overrides)
    fwd, bwd = counted_dit_flops(cfg, batch, "cpu")
    expected_fwd = forward_flops_per_sample(cfg, contrastive_batch=batch) * batch
    expected_total = training_flops_per_sample(cfg, contrastive_batch=batch) * batch
    print(f"{overrides}: counted forward {fwd:.6e} vs formula {expected_fwd:.6e}; backward {bwd:.6e} vs "
          f"{expected_total - expected_fwd:.6e}")
    assert math.isclose(fwd, expected_fwd, rel_tol=REL)
    assert math.isclose(bwd, expected_total - expected_fwd, rel_tol=REL)


def test_formula_matches_flop_counter_at_the_seed_size_on_meta(single_rank):
    cfg = load_config(DiTExperimentConfig, "configs/dit/global_768.yaml", [], BARE_KEYS).model
    batch = 2
    fwd, bwd = counted_dit_flops(cfg, batch, "meta")
    assert math.isclose(fwd + bwd, training_flops_per_sample(cfg, contrastive_batch=batch) * batch, rel_tol=REL)
    # the 12 layers dominate; the inputs that are data make the backward less than twice the forward
    parts = training_flops_breakdown(cfg, contrastive_batch=batch)
    assert parts["layers"] > 0.9 * parts["total"]
    assert bwd < 2 * fwd


def test_contrastive_term_grows_with_the_contrastive_batch(single_rank):
    """Per sample, the B x B logits cost 2 * B * d forward and one product backward: counted at two batches."""
    cfg = tiny()
    small, large = (sum(counted_dit_flops(cfg, b, "meta")) / b for b in (4, 12))
    assert math.isclose(large - small, 2 * 2 * (12 - 4) * cfg.output_dim, rel_tol=1e-6)
    assert "contrastive" not in forward_flops(cfg)  # no batch given: left out
    assert "contrastive" not in forward_flops(tiny(["model.flow.use_contrastive_loss=false"]), contrastive_batch=8)
