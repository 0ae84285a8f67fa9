"""A Hugging Face Llama (GQA: 2 key/value heads for 4 query heads; untied) imported and run at
TP=2: logits equal transformers' within 1e-5 (fp32), greedy generation equals transformers'
`generate` token for token with and without the KV cache, sampled generation at TP=2 equals TP=1
token for token, and the TP=2 weights gathered back export to the same HF state dict."""
import os

import pytest
import torch

from tests.distributed.harness import run_ranks

TOL = 1e-5
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [40]]
NEW_TOKENS = 10
SAMPLING = dict(do_sample=True, temperature=0.9, top_k=40, top_p=0.95, seed=7)


def _run(tp: int, directory: str):
    from conversion.hf_llama import engine_to_hf_state_dict, import_hf_llama
    from models.llm.generate import generate
    from models.llm.model import LLMModel
    from parallel.context import initialize_parallel
    from parallel.tp_sharding import gather_full_state_dict, shard_full_state_dict

    ctx = initialize_parallel(tp, 1, device="cpu", seed=0)
    cfg, full = import_hf_llama(directory)
    model = LLMModel(cfg).eval()
    model.load_state_dict(shard_full_state_dict(full, model, ctx.tp_rank, tp), strict=True)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(tokens)
    exported = engine_to_hf_state_dict(gather_full_state_dict(model, ctx.tp_group), cfg)
    return {"tokens": tokens, "logits": logits, "exported": exported,
            "greedy": generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, pad_token_id=0).sequences,
            "greedy_no_cache": generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, pad_token_id=0,
                                        use_cache=False).sequences,
            "sampled": generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, pad_token_id=0, **SAMPLING).sequences}


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    try:
        import transformers
    except Exception as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"transformers does not import here ({type(exc).__name__}: {exc})")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False, initializer_range=0.1)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    directory = str(tmp_path_factory.mktemp("hf_llama"))
    model.save_pretrained(directory)
    return model, directory


def test_hf_llama_at_tp2_matches_transformers_and_tp1(hf_model):
    from models.llm.generate import left_pad

    hf, directory = hf_model
    single = run_ranks(1, _run, 1, directory)[0]
    results = run_ranks(2, _run, 2, directory)
    ids, mask = left_pad(PROMPTS, pad_token_id=0)
    with torch.no_grad():
        expected_logits = hf(single["tokens"]).logits
        expected_greedy = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                      pad_token_id=0, eos_token_id=None)
    hf_state = hf.state_dict()
    for r in [single, *results]:
        diff = (r["logits"] - expected_logits).abs().max().item()
        print(f"logits vs transformers: max abs diff {diff:.2e}")
        torch.testing.assert_close(r["logits"], expected_logits, atol=TOL, rtol=TOL)
        assert torch.equal(r["greedy"], expected_greedy)
        assert torch.equal(r["greedy_no_cache"], expected_greedy)
        assert torch.equal(r["sampled"], single["sampled"])
        assert r["exported"].keys() == hf_state.keys()
        for name, tensor in hf_state.items():
            torch.testing.assert_close(r["exported"][name], tensor, atol=0, rtol=0)
