"""The DiT's size at every shipped config (counted on the meta device against a formula written out
here), adaLN-zero, stage splits and config checks."""
import glob
import os

import pytest
import torch

from engine.checkpoint.tools import single_process_parallel_state
from engine.config import load_config
from engine.schema import BARE_KEYS
from models.dit.config import DiTConfig, DiTExperimentConfig, model_problems

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "dit", "*.yaml")))


def expected_parameters(m: DiTConfig) -> int:
    """Every weight and bias, by hand."""
    h, f, dc, out, w, a = m.hidden_size, m.ffn_hidden_size, m.condition_dim, m.output_dim, m.clip_width, \
        m.adapter_hidden_size
    layer = (h * 3 * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h) + (h * 6 * h + 6 * h)  # qkv, proj, mlp, adaLN
    first = ((2 * dc if m.condition_norm else 0) + (dc * h + h) + (out * h + h) + h  # norm, cond and noisy proj, null
             + (m.timestep_frequency_dim * h + h) + (h * h + h))  # timestep MLP
    last = (2 * h + (h * 2 * h + 2 * h)  # final norm, final modulation
            + h + (3 * h * h + 3 * h) + (h * h + h) + 2 * h  # pooling: query, in/out projections, norm
            + (h * a + a) + (a * w + w) + w * out)  # adapter MLP, CLIP projection
    return first + m.num_layers * layer + last


def _meta_model(model_cfg, **kwargs):
    from models.dit.model import GlobalDiT

    with single_process_parallel_state(), torch.device("meta"):
        return GlobalDiT(model_cfg, use_cpu_initialization=True, **kwargs)


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_parameter_count_of_every_config(path):
    cfg = load_config(DiTExperimentConfig, path, [], BARE_KEYS)
    model = _meta_model(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(cfg.model)


def test_seed_defaults_and_the_size_range():
    m = DiTConfig()
    assert (m.hidden_size, m.num_layers, m.num_attention_heads, m.adapter_hidden_size, m.output_dim) == (768, 12, 12, 2048, 768)
    assert (m.condition_dim, m.num_patches, m.clip_width) == (4096, 256, 1024)
    assert (m.flow.sigma_min, m.flow.sigma_max, m.flow.prediction_type, m.flow.contrastive_weight) == \
        (1e-4, 1.0, "v_prediction", 0.1)
    widths = {load_config(DiTExperimentConfig, p, [], BARE_KEYS).model.hidden_size for p in CONFIGS}
    assert {768, 4096} <= widths
    assert expected_parameters(DiTConfig()) == 140_081_152  # 127.5M in the 12 layers, 4.5M embedding, 8.0M head


def test_pipeline_stages_hold_the_parts_and_the_layers_once():
    cfg = DiTConfig(condition_dim=16, condition_grid=[2, 2], num_layers=4, hidden_size=32, ffn_hidden_size=64,
                    num_attention_heads=4, adapter_hidden_size=24, clip_width=16, output_dim=8)
    whole = _meta_model(cfg, pre_process=True, post_process=True)
    first = _meta_model(cfg, pre_process=True, post_process=False, pipeline_model_parallel_size=1)
    assert hasattr(first, "timestep") and not hasattr(first, "pool") and first.block.final_layernorm is None
    count = sum(p.numel() for p in whole.parameters())
    assert count == expected_parameters(cfg)


def test_adaln_zero_layers_start_as_the_identity():
    from models.dit.model import GlobalDiT

    cfg = DiTConfig(condition_dim=16, condition_grid=[2, 3], num_layers=2, hidden_size=32, ffn_hidden_size=64,
                    num_attention_heads=4, adapter_hidden_size=24, clip_width=16, output_dim=8)
    with single_process_parallel_state():
        model = GlobalDiT(cfg)
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randn(6, 3, 32, generator=gen)
        c = torch.randn(3, 32, generator=gen)
        out = tokens
        for layer in model.block.layers:
            out, _ = layer(hidden_states=out, attention_mask=None, context=c,
                           rotary_pos_emb=model.rotary_pos_emb(tokens.device))
        torch.testing.assert_close(out, tokens)  # zero gates: every residual branch is off
        assert torch.isfinite(model(torch.randn(3, 6, 16), torch.randn(3, 8), torch.rand(3))).all()


def test_config_problems_name_the_keys():
    bad = DiTConfig(hidden_size=100, num_attention_heads=12)
    assert any("model.hidden_size=100" in p for p in model_problems(bad))
    assert any("model.rope_sections" in p for p in model_problems(DiTConfig(rope_sections=[8, 8, 8])))
    assert any("model.condition_grid" in p for p in model_problems(DiTConfig(condition_grid=[16])))
    assert any("sigma_min" in p for p in model_problems(DiTConfig(flow=type(DiTConfig().flow)(sigma_min=2.0))))


def test_te_backend_is_refused_with_the_reason():
    from models.dit.layer import adaln_layer_spec

    with pytest.raises(ValueError, match="adaLN"):
        adaln_layer_spec("te")
