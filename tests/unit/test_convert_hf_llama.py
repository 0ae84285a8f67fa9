"""Hugging Face Llama <-> the project's LLM, against transformers' own `LlamaForCausalLM` (fp32,
CPU): logits of the imported model within 1e-5 (GQA, untied and tied, Llama-3 RoPE scaling),
export loads back with strict=True and gives the same logits, sharded directories, errors naming
what does not fit. Greedy generation equals transformers' `generate` token for token (left-padded
batch, stop on end-of-sequence); with the KV cache equals without; sampling filters match
transformers' warpers."""
import json
import os

import pytest
import torch



def _transformers():
    try:
        import transformers
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("CI"):
            raise
        pytest.skip(f"transformers does not import here ({type(exc).__name__}: {exc}); pip install -e '.[test]'",
                    allow_module_level=True)
    transformers.logging.set_verbosity_error()
    return transformers


transformers = _transformers()

from conversion.clip_layout import CheckpointMismatchError, UnsupportedArchitectureError
from conversion.hf_llama import (
    engine_to_hf_state_dict,
    export_hf_llama,
    hf_llama_config_to_llm_config,
    hf_to_engine_state_dict,
    import_hf_llama,
)
from models.llm.generate import filter_logits, generate, left_pad
from models.llm.model import LLMModel

TOL = 1e-5
VOCAB = 300


def hf_llama(tmp_path, tied=False, rope_scaling=None, initializer_range=0.02, **kwargs):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      rope_theta=10000.0, tie_word_embeddings=tied, rope_scaling=rope_scaling,
                                      initializer_range=initializer_range, **kwargs)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # RMSNorm gains start at 1: make them count
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    directory = os.path.join(tmp_path, "hf")
    model.save_pretrained(directory)
    return model, directory


def tokens(rows=2, length=40, seed=1):
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def imported(directory, **kwargs):
    cfg, state = import_hf_llama(directory, **kwargs)
    model = LLMModel(cfg).eval()
    model.load_state_dict(state, strict=True)
    return cfg, state, model


@pytest.mark.parametrize("tied", [False, True])
def test_imported_logits_match_transformers(single_rank, tmp_path, tied):
    hf, directory = hf_llama(tmp_path, tied=tied)
    cfg, _, ours = imported(directory)
    assert cfg.share_embeddings_and_output_weights == tied and cfg.num_query_groups == 2
    x = tokens()
    with torch.no_grad():
        expected, got = hf(x).logits, ours(x)
    diff = (got - expected).abs().max().item()
    print(f"HF Llama import (tied={tied}): max |logits diff| {diff:.2e}")
    torch.testing.assert_close(got, expected, atol=TOL, rtol=TOL)


def test_llama3_rope_scaling_matches_transformers(single_rank, tmp_path):
    # original context 64 < the 120 test positions, so the scaled band matters.
    scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    hf, directory = hf_llama(tmp_path, rope_scaling=scaling)
    cfg, state, ours = imported(directory)
    assert cfg.rope_scaling.type == "llama3" and cfg.rope_scaling.original_max_position_embeddings == 64
    x = tokens(length=120)
    with torch.no_grad():
        expected = hf(x).logits
        torch.testing.assert_close(ours(x), expected, atol=TOL, rtol=TOL)
        cfg.rope_scaling.type = "none"  # the same weights without scaling give other logits
        unscaled = LLMModel(cfg).eval()
        unscaled.load_state_dict(state)
        assert (unscaled(x) - expected).abs().max() > 1e-3


def test_export_loads_strict_and_matches(single_rank, tmp_path):
    hf, directory = hf_llama(tmp_path)
    cfg, state, _ = imported(directory)
    out = os.path.join(tmp_path, "exported")
    export_hf_llama(state, cfg, out, max_shard_bytes=200_000)  # forces several shards + index
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    fresh = transformers.LlamaForCausalLM(reloaded.config).eval()
    fresh.load_state_dict(engine_to_hf_state_dict(state, cfg), strict=True)
    x = tokens()
    with torch.no_grad():
        expected = hf(x).logits
        torch.testing.assert_close(reloaded(x).logits, expected, atol=TOL, rtol=TOL)
        torch.testing.assert_close(fresh(x).logits, expected, atol=TOL, rtol=TOL)
    with open(os.path.join(out, "config.json")) as fh:
        config = json.load(fh)
    assert config["num_key_value_heads"] == 2 and config["vocab_size"] == VOCAB  # vocabulary padding trimmed
    # The sharded export imports back to the same state dict.
    cfg2, state2 = import_hf_llama(out)
    assert cfg2 == cfg
    for name, tensor in state.items():
        if torch.is_tensor(tensor):
            torch.testing.assert_close(state2[name], tensor, atol=0, rtol=0)


def test_tied_model_can_be_untied_for_pipeline_parallelism(single_rank, tmp_path):
    hf, directory = hf_llama(tmp_path, tied=True)
    cfg, state, ours = imported(directory, untie_embeddings=True)
    assert not cfg.share_embeddings_and_output_weights
    torch.testing.assert_close(state["output_layer.weight"], state["embedding.word_embeddings.weight"])
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens()), hf(tokens()).logits, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("change, message", [
    (dict(attention_bias=True), "attention_bias=true"),
    (dict(mlp_bias=True), "mlp_bias=true"),
    (dict(sliding_window=4096), "sliding_window=4096"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling type 'yarn'"),
    (dict(model_type="mistral"), "model_type='mistral'"),
])
def test_unsupported_options_are_named(change, message):
    hf_config = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
                 **change}
    with pytest.raises(UnsupportedArchitectureError, match=message):
        hf_llama_config_to_llm_config(hf_config)


def test_mismatched_shapes_are_listed(single_rank, tmp_path):
    hf, directory = hf_llama(tmp_path)
    cfg, _ = import_hf_llama(directory)
    state = dict(hf.state_dict())
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(8, 64)
    del state["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(CheckpointMismatchError) as err:
        hf_to_engine_state_dict(state, cfg)
    text = str(err.value)
    assert "model.layers.0.mlp.up_proj.weight" in text
    assert "model.layers.1.self_attn.k_proj.weight: found (8, 64), expected (32, 64)" in text


# -- generation ------------------------------------------------------------------------------------

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [40]]


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """An imported model with larger weights (initializer_range 0.1), so greedy choices are not
    near-ties that 1e-7 rounding could flip."""
    hf, directory = hf_llama(tmp_path_factory.mktemp("gen"), initializer_range=0.1)
    return hf, directory


def test_greedy_matches_transformers_generate(single_rank, peaked):
    hf, directory = peaked
    _, _, ours = imported(directory)
    ids, mask = left_pad(PROMPTS, pad_token_id=0)
    free = generate(ours, PROMPTS, max_new_tokens=12, pad_token_id=0)
    # Stop on a token the second row produces at its fourth step: that row ends early, padded.
    eos = int(free.tokens[1, 3])
    ours_out = generate(ours, PROMPTS, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    with torch.no_grad():
        for eos_id, out in ((None, free), (eos, ours_out)):
            reference = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                                    eos_token_id=eos_id)
            assert torch.equal(out.sequences, reference), (out.sequences, reference)
    assert bool(ours_out.finished[1]) and (ours_out.tokens[1, 4:] == 0).all()


def test_kv_cache_equals_full_recompute(single_rank, peaked):
    _, directory = peaked
    _, _, ours = imported(directory)
    for kwargs in (dict(), dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=3)):
        cached = generate(ours, PROMPTS, max_new_tokens=10, use_cache=True, **kwargs)
        full = generate(ours, PROMPTS, max_new_tokens=10, use_cache=False, **kwargs)
        assert torch.equal(cached.tokens, full.tokens)


def test_inputs_embeds_equal_token_ids(single_rank, peaked):
    _, directory = peaked
    _, _, ours = imported(directory)
    ids, mask = left_pad(PROMPTS, pad_token_id=0)
    by_ids = generate(ours, ids, attention_mask=mask, max_new_tokens=8)
    with torch.no_grad():
        embeds = ours.embed_tokens(ids)
    for use_cache in (True, False):
        by_embeds = generate(ours, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=8, use_cache=use_cache)
        assert by_embeds.sequences is None and torch.equal(by_embeds.tokens, by_ids.tokens)


def test_sampling_filters_match_transformers_warpers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    reference = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(10)(None, TemperatureLogitsWarper(0.7)(None, logits)))
    ours = filter_logits(logits, temperature=0.7, top_k=10, top_p=0.8)
    assert torch.equal(torch.isinf(ours), torch.isinf(reference))
    torch.testing.assert_close(ours[~torch.isinf(ours)], reference[~torch.isinf(reference)])


def test_generation_refuses_what_it_cannot_do(single_rank, peaked):
    _, directory = peaked
    _, _, ours = imported(directory)
    with pytest.raises(ValueError, match="left-padded"):
        generate(ours, torch.tensor([[1, 2, 0]]), attention_mask=torch.tensor([[1, 1, 0]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="beyond model.max_position_embeddings=256"):
        generate(ours, [[1, 2]], max_new_tokens=300)


def test_generation_needs_the_sdpa_backend(single_rank, peaked, monkeypatch):
    _, directory = peaked
    _, _, ours = imported(directory)
    monkeypatch.setattr(ours, "attention_backend", "flash")
    with pytest.raises(ValueError, match="generation runs on attention_backend=sdpa"):
        generate(ours, [[1, 2]], max_new_tokens=2)
