"""The LLM on one process: parameter counts of the published shapes (meta device), the state-dict
layout the converters assume, the masked loss against torch's cross entropy, Llama-3 RoPE
scaling against transformers' own, the weight-decay hook and the refused configurations."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conversion.llm_layout import expected_llm_shapes
from models.llm.config import LLMConfig, RopeScalingConfig, llm_preset
from models.llm.model import LLMModel, count_parameters


def llama_parameter_count(vocab, hidden, layers, heads, kv_heads, ffn, tied) -> int:
    """From the published dimensions: embedding (+ untied head), per layer q/k/v/o, SwiGLU's three
    matrices and two RMSNorm gains, and the final norm."""
    head = hidden // heads
    attention = hidden * heads * head + 2 * hidden * kv_heads * head + heads * head * hidden
    per_layer = attention + 3 * hidden * ffn + 2 * hidden
    return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden


@pytest.mark.parametrize("preset, dims, published_billions", [
    ("llama3.2-1b", dict(vocab=128256, hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192, tied=True), 1.24),
    ("llama3-8b", dict(vocab=128256, hidden=4096, layers=32, heads=32, kv_heads=8, ffn=14336, tied=False), 8.03),
])
def test_published_sizes_on_meta_device(single_rank, preset, dims, published_billions):
    expected = llama_parameter_count(**dims)
    assert round(expected / 1e9, 2) == published_billions
    with torch.device("meta"):
        model = LLMModel(llm_preset(preset), use_cpu_initialization=True, perform_initialization=False)
    assert count_parameters(model) == expected


def _tiny(**overrides) -> LLMConfig:
    return llm_preset("tiny", vocab_size=300, **overrides)


@pytest.mark.parametrize("overrides", [dict(), dict(share_embeddings_and_output_weights=False),
                                       dict(qk_layernorm=True, num_query_groups=4)])
def test_state_dict_layout_matches_the_converters(single_rank, overrides):
    cfg = _tiny(**overrides)
    model = LLMModel(cfg)
    got = {k: (tuple(v.shape) if torch.is_tensor(v) else None) for k, v in model.state_dict().items()}
    assert got == expected_llm_shapes(cfg)


def test_loss_is_masked_mean_cross_entropy(single_rank):
    torch.manual_seed(0)
    model = LLMModel(_tiny(share_embeddings_and_output_weights=False))
    tokens = torch.randint(0, 300, (3, 10))
    labels = torch.randint(0, 300, (3, 10))
    mask = (torch.rand(3, 10) > 0.3).float()
    logits = model(tokens)
    assert logits.shape == (3, 10, 300)  # vocabulary padding (320 rows) dropped
    per_token = F.cross_entropy(logits.reshape(-1, 300), labels.reshape(-1), reduction="none").reshape(3, 10)
    torch.testing.assert_close(model(tokens, labels, mask), (per_token * mask).sum() / mask.sum(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model(tokens, labels), per_token.mean(), atol=1e-6, rtol=1e-6)
    empty = model(tokens, labels, torch.zeros(3, 10))
    empty.backward()
    assert empty.item() == 0.0 and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_llama3_rope_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from models.common.rotary import RotaryEmbedding

    scaling = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf_config = LlamaConfig(hidden_size=2048, num_attention_heads=32, max_position_embeddings=131072,
                            rope_scaling={"rope_type": "llama3", "rope_theta": 500000.0, **scaling})
    reference, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    ours = RotaryEmbedding(64, base=500000.0, scaling=scaling).inv_freq
    assert attention_factor == 1.0
    torch.testing.assert_close(ours, reference.float(), atol=0, rtol=1e-6)
    assert not torch.allclose(ours, RotaryEmbedding(64, base=500000.0).inv_freq)  # scaling changes something


def test_rotary_angles_take_per_row_positions():
    from models.common.rotary import RotaryEmbedding

    rope = RotaryEmbedding(16)
    shared = rope(torch.arange(5))
    rows = rope(torch.stack([torch.arange(5), torch.arange(5) + 3]))
    assert shared.shape == (5, 1, 1, 16) and rows.shape == (5, 2, 1, 16)
    torch.testing.assert_close(rows[:, 0], shared[:, 0])
    torch.testing.assert_close(rows[:2, 1], shared[3:, 0])


def test_weight_decay_hook_spares_norms_only(single_rank):
    model = LLMModel(_tiny(share_embeddings_and_output_weights=False))
    spared = {n for n, p in model.named_parameters() if model.no_weight_decay(n, p)}
    assert spared == {n for n in dict(model.named_parameters()) if "layernorm" in n}
    assert "embedding.word_embeddings.weight" not in spared and "output_layer.weight" not in spared


def test_refused_configurations(single_rank):
    with pytest.raises(ValueError, match="share_embeddings_and_output_weights=true with pipeline_model_parallel_size=2"):
        LLMModel(_tiny(), pipeline_model_parallel_size=2)
    with pytest.raises(ValueError, match="rope_scaling.type='yarn'"):
        LLMModel(_tiny(rope_scaling=RopeScalingConfig(type="yarn")))
    with pytest.raises(ValueError, match="num_query_groups=3"):
        LLMModel(_tiny(num_query_groups=3))
    with pytest.raises(ValueError, match="exceeds model.max_position_embeddings=1024"):
        LLMModel(_tiny())(torch.zeros(1, 1025, dtype=torch.long))
    model = LLMModel(dataclasses.replace(_tiny(), vocab_size=300))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 300\)"):
        model(torch.zeros(1, 4, dtype=torch.long), labels=torch.full((1, 4), -100))


def test_recompute_keys_reach_megatron(single_rank):
    model = LLMModel(_tiny(activations_checkpoint_granularity="full", activations_checkpoint_method="uniform",
                           activations_checkpoint_num_layers=1))
    assert model.config.recompute_granularity == "full" and model.config.recompute_method == "uniform"


@pytest.mark.parametrize("tied", [True, False])
def test_same_keys_and_logits_as_megatron_gpt_model(single_rank, monkeypatch, tied):
    """megatron-core's GPTModel built from the same layer spec holds exactly our state-dict keys and,
    given our weights, computes our logits (RoPE with Llama-3 scaling at megatron's fixed band,
    the tied or separate output layer). Its RotaryEmbedding moves frequencies to
    torch.cuda.current_device(); on CPU that one call is pointed at the CPU for this test."""
    from megatron.core.models.common.embeddings import rotary_pos_embedding
    from megatron.core.models.gpt.gpt_model import GPTModel

    from models.common.spec import transformer_layer_spec
    from parallel.cpu_shims import _TorchOnCpu

    monkeypatch.setattr(rotary_pos_embedding, "torch", _TorchOnCpu())
    cfg = _tiny(share_embeddings_and_output_weights=tied,
                rope_scaling=RopeScalingConfig("llama3", 8.0, 1.0, 4.0, 8192))  # megatron's fixed band
    torch.manual_seed(0)
    ours = LLMModel(cfg).eval()
    spec = transformer_layer_spec("sdpa", causal=True, normalization="RMSNorm")
    reference = GPTModel(ours.config, spec, vocab_size=ours.padded_vocab_size,
                         max_sequence_length=cfg.max_position_embeddings, position_embedding_type="rope",
                         rotary_base=int(cfg.rotary_base), rope_scaling=True, rope_scaling_factor=8.0,
                         share_embeddings_and_output_weights=tied).eval()
    assert reference.state_dict().keys() == ours.state_dict().keys()
    reference.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(x, torch.arange(24)[None].expand(2, -1), None)[..., :300]
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(*batch)
    loss.backward()
    return loss.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


def _batch():
    gen = torch.Generator().manual_seed(5)
    return (torch.randint(0, 300, (2, 20), generator=gen), torch.randint(0, 300, (2, 20), generator=gen),
            (torch.rand(2, 20, generator=gen) > 0.2).float())


@pytest.mark.parametrize("recompute", [dict(activations_checkpoint_granularity="full",
                                            activations_checkpoint_method="uniform",
                                            activations_checkpoint_num_layers=1),
                                       dict(activations_checkpoint_granularity="full",
                                            activations_checkpoint_method="block",
                                            activations_checkpoint_num_layers=2),
                                       dict(activations_checkpoint_granularity="selective")])
def test_recompute_gives_the_same_gradients(single_rank, recompute):
    torch.manual_seed(0)
    plain = LLMModel(_tiny(hidden_dropout=0.1, attention_dropout=0.1))
    torch.manual_seed(0)
    recomputed = LLMModel(_tiny(hidden_dropout=0.1, attention_dropout=0.1, **recompute))
    recomputed.load_state_dict(plain.state_dict())
    # Dropout on: recompute must replay the same masks (megatron's checkpoint saves the RNG state).
    # Both runs start from the same default and model-parallel (attention dropout) RNG states.
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker_states = get_cuda_rng_tracker().get_states()
    torch.manual_seed(1)
    loss, grads = _loss_and_grads(plain, _batch())
    get_cuda_rng_tracker().set_states(tracker_states)
    torch.manual_seed(1)
    loss_r, grads_r = _loss_and_grads(recomputed, _batch())
    torch.testing.assert_close(loss_r, loss, atol=1e-6, rtol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_r[name], grad, atol=1e-6, rtol=1e-6, msg=lambda m: f"{name}: {m}")


def test_bf16_parameters_track_fp32(single_rank):
    """BF16 O2's model side: bf16 parameters and activations, the loss in fp32 (2e-2: 8 mantissa bits)."""
    torch.manual_seed(0)
    fp32 = LLMModel(_tiny())
    bf16 = LLMModel(_tiny(), params_dtype=torch.bfloat16, bf16=True).to(torch.bfloat16)
    bf16.load_state_dict({k: v.to(torch.bfloat16) if torch.is_tensor(v) else v for k, v in fp32.state_dict().items()})
    loss, _ = _loss_and_grads(fp32, _batch())
    loss_bf16, grads_bf16 = _loss_and_grads(bf16, _batch())
    assert loss_bf16.dtype == torch.float32
    torch.testing.assert_close(loss_bf16, loss, atol=2e-2, rtol=2e-2)
    assert all(torch.isfinite(g).all() for g in grads_bf16.values())
    assert all(p.grad.dtype == torch.bfloat16 for p in bf16.parameters())


def test_layout_problems_name_every_key():
    from models.llm.config import llm_layout_problems, llm_vocab_rows

    cfg = llm_preset("llama3-8b")
    assert llm_layout_problems(cfg, 8, 4) == []
    problems = llm_layout_problems(cfg, 16, 3)
    assert problems == ["model.num_query_groups=8 is not divisible by tensor_model_parallel_size=16",
                        "model.num_layers=32 is not divisible by pipeline_model_parallel_size=3"]
    assert llm_layout_problems(cfg, 64, 1)[0] == ("model.num_attention_heads=32 is not divisible by "
                                                  "tensor_model_parallel_size=64")
    assert "share_embeddings_and_output_weights=true" in llm_layout_problems(llm_preset("llama3.2-1b"), 1, 2)[0]
    assert llm_vocab_rows(cfg, 1) == 128256 and llm_vocab_rows(llm_preset("tiny", vocab_size=300), 2) == 384

