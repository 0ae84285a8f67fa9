"""VLM generation (models/vlm/generate.py): images encoded once, then the LLM's loop from the spliced
embeddings. Compared token for token: KV cache against no cache (greedy and top-p sampling), each
prompt alone against the left-padded batch, TP=2 against TP=1 with the same weights; and stopping
on the template's end-of-turn token."""
import pytest
import torch

from tests.distributed.harness import run_ranks
from tests.distributed.vlm_fixtures import IMG, tiny_vlm_config


def _prompts():
    gen = torch.Generator().manual_seed(3)
    img = lambda: torch.randn(3, IMG, IMG, generator=gen)
    return [{"images": [img()], "turns": [("<image> what shape is it", None)]},
            {"images": [], "turns": [("what colour is the shape", "red"), ("how many shapes are there", None)]},
            {"images": [img(), img()], "turns": [("<image> what colour is the shape", "blue"),
                                                 ("<image> where is the shape", None)]}]


def _run(tp, tokenizer_dir, full_state, stop_word=None):
    from data.tokenizers import build_tokenizer
    from models.vlm.config import TemplateConfig
    from models.vlm.generate import answer
    from models.vlm.model import VLMModel
    from parallel.context import initialize_parallel
    from parallel.tp_sharding import gather_full_state_dict, shard_full_state_dict

    ctx = initialize_parallel(tp, 1, device="cpu", seed=2)
    tokenizer = build_tokenizer("huggingface", tokenizer_dir)
    torch.manual_seed(0)
    cfg = tiny_vlm_config("mlp", llm_layers=2)
    cfg.llm.init_method_std = 0.2  # sharp logits: no near-ties for the argmax to flip on
    model = VLMModel(cfg)
    if full_state is not None:
        model.load_state_dict(shard_full_state_dict(full_state, model, ctx.tp_rank, tp), strict=True)
    template = TemplateConfig(stop_token=stop_word)
    prompts = _prompts()
    ids = lambda answers: [a.token_ids for a in answers]
    out = {"state": gather_full_state_dict(model, ctx.tp_group)}
    out["greedy"] = ids(answer(model, prompts, tokenizer, template, max_new_tokens=6))
    out["greedy_no_cache"] = ids(answer(model, prompts, tokenizer, template, max_new_tokens=6, use_cache=False))
    out["alone"] = [ids(answer(model, [p], tokenizer, template, max_new_tokens=6))[0] for p in prompts]
    sample = {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "seed": 7, "max_new_tokens": 6}
    out["sampled"] = ids(answer(model, prompts, tokenizer, template, **sample))
    out["sampled_no_cache"] = ids(answer(model, prompts, tokenizer, template, use_cache=False, **sample))
    out["finished"] = [a.finished for a in answer(model, prompts, tokenizer, template, max_new_tokens=6)]
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from data.vlm_synthetic import write_tokenizer

    return write_tokenizer(str(tmp_path_factory.mktemp("vlm_gen_tok")))


@pytest.fixture(scope="module")
def reference(tokenizer_dir):
    return run_ranks(1, _run, 1, tokenizer_dir, None)[0]


def test_cache_padding_and_sampling_agree(reference):
    assert reference["greedy"] == reference["greedy_no_cache"]
    assert reference["greedy"] == reference["alone"]  # left padding does not change a row's answer
    assert reference["sampled"] == reference["sampled_no_cache"]
    assert reference["sampled"] != reference["greedy"]  # sampling at temperature 0.8 really samples
    # a row stops early only on the stop token (here the tokenizer's end-of-text)
    assert all(len(ids) == 6 or done for ids, done in zip(reference["greedy"], reference["finished"]))


def test_stops_on_the_end_of_turn_token(reference, tokenizer_dir):
    from tokenizers import Tokenizer

    word = Tokenizer.from_file(tokenizer_dir).id_to_token(reference["greedy"][0][2])
    out = run_ranks(1, _run, 1, tokenizer_dir, reference["state"], word)[0]
    assert out["finished"][0]
    assert out["greedy"][0] == reference["greedy"][0][: reference["greedy"][0].index(reference["greedy"][0][2])]


def test_tp2_generates_the_same_tokens(reference, tokenizer_dir):
    for result in run_ranks(2, _run, 2, tokenizer_dir, reference["state"]):
        for key in ("greedy", "greedy_no_cache", "alone", "sampled"):
            assert result[key] == reference[key], key
