"""The LLM family's pieces in one process: preflight (every problem named, `error:` + exit 2 from the
entry point before any process group), layout checks through the engine, the FLOP formula against
the model's own weights, and build(): loaders on the reading stage, validation loss equal to torch's
cross entropy over the whole eval set, and the synthetic corpus's floor beside it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from engine.config import load_config
from engine.family import get_family
from engine.schema import BARE_KEYS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "llm", "tiny.yaml")
SMALL = ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64", "model.seq_length=24",
         "data.synthetic.num_train=60", "data.synthetic.num_eval=30", "data.synthetic.docs_per_shard=20",
         "data.synthetic.num_words=20", "data.synthetic.branching=3", "model.vocab_size=24",
         "trainer.micro_batch_size=2", "trainer.global_batch_size=2", "eval.batch_size=4"]


def _config(*overrides):
    return load_config(get_family("llm").config_cls, TINY, list(overrides), BARE_KEYS)


def test_preflight_names_every_problem(tmp_path):
    llm = get_family("llm")
    cfg = _config(f"data.train_shards={tmp_path}/none-*.tar", f"data.eval_shards={tmp_path}/val.jsonl",
                  f"data.tokenizer.path={tmp_path}/tokenizer.json")
    problems = "\n".join(llm.preflight(cfg))
    assert "data.train_shards" in problems and "data.eval_shards" in problems
    assert f"data.tokenizer.path={tmp_path}/tokenizer.json: no such file" in problems
    assert "data.tokenizer.path is required" in "\n".join(llm.preflight(_config(f"data.train_shards={tmp_path}")))

    # A tokenizer larger than the embedding: the key and the value to set.
    from data.text_synthetic import write_word_tokenizer

    write_word_tokenizer([f"w{i}" for i in range(100)], str(tmp_path))
    (tmp_path / "docs.jsonl").write_text('{"text": "w1 w2"}\n')
    cfg = _config(f"data.train_shards={tmp_path}/docs.jsonl", f"data.tokenizer.path={tmp_path}/tokenizer.json")
    assert llm.preflight(cfg) == ["model.vocab_size=36 is smaller than the tokenizer's 104 tokens "
                                  f"({tmp_path}/tokenizer.json): set model.vocab_size=104 (or use the model's own "
                                  "tokenizer)"]
    assert llm.preflight(_config(f"data.train_shards={tmp_path}/docs.jsonl", "model.vocab_size=104",
                                 f"data.tokenizer.path={tmp_path}/tokenizer.json")) == []

    # The synthetic corpus: its own tokenizer, a vocabulary that must fit, branching within the words.
    problems = "\n".join(llm.preflight(_config("data.tokenizer.path=x.model", "data.tokenizer.type=sentencepiece",
                                               "data.synthetic.num_words=100", "data.synthetic.branching=200")))
    for part in ("data.tokenizer.path=x.model is set without data.train_shards", "data.tokenizer.type=sentencepiece",
                 "data.synthetic.branching=200 exceeds", "set model.vocab_size=104"):
        assert part in problems
    assert llm.preflight(_config()) == []


def test_entry_point_stops_with_error_and_exit_2_before_any_process_group(tmp_path):
    out = subprocess.run([sys.executable, "examples/pretrain_llm.py", "--config", TINY,
                          f"data.train_shards={tmp_path}/missing-{{000..003}}.tar", "trainer.max_steps=1",
                          f"trainer.output_dir={tmp_path}/run"], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 2, out.stderr
    error = out.stderr[out.stderr.index("error: "):]  # torch may warn before it (no CUDA runtime)
    assert "data.train_shards" in error and "data.tokenizer.path is required" in error
    assert not (tmp_path / "run").exists()  # stopped before the run wrote anything


def test_layout_problems_name_their_keys():
    from engine.layout import validate_layout
    from parallel.dims import ParallelLayoutError

    llm = get_family("llm")
    with pytest.raises(ParallelLayoutError) as info:
        validate_layout(_config("tensor_model_parallel_size=3", "pipeline_model_parallel_size=3"), 9, llm, [])
    message = str(info.value)
    for part in ("model.num_attention_heads=4 is not divisible by tensor_model_parallel_size=3",
                 "model.num_query_groups=2 is not divisible by tensor_model_parallel_size=3",
                 "model.num_layers=4 is not divisible by pipeline_model_parallel_size=3",
                 "model.share_embeddings_and_output_weights=true with pipeline_model_parallel_size=3"):
        assert part in message
    validate_layout(_config("tensor_model_parallel_size=2", "pipeline_model_parallel_size=2",
                            "model.share_embeddings_and_output_weights=false", "trainer.global_batch_size=64"), 8, llm, [])


@pytest.mark.parametrize("tied", [True, False])
def test_flops_per_sample_counts_the_models_matmul_weights(tied):
    """The family's FLOPs per sequence (engine.flops' decoder formula) against the built model: 6 x
    every 2-d weight but the embedding lookup (the logit projection once, over the true vocabulary)
    x S, plus 12 L S^2 heads head_dim."""
    from engine.checkpoint.tools import single_process_parallel_state
    from models.llm.config import llm_preset
    from models.llm.family import llm_flops_per_sequence

    cfg = llm_preset("tiny", share_embeddings_and_output_weights=tied, vocab_size=500)
    with single_process_parallel_state(), torch.device("meta"):
        model = get_family("llm").reference_model(cfg)
    matmul = cfg.vocab_size * cfg.hidden_size  # the logit projection (the tied matrix's second use)
    for name, param in model.named_parameters():
        if param.ndim == 2 and name not in ("embedding.word_embeddings.weight", "output_layer.weight"):
            matmul += param.numel()
    s = cfg.seq_length
    attention = 12 * cfg.num_layers * cfg.num_attention_heads * cfg.head_dim * s * s
    assert llm_flops_per_sequence(cfg) == pytest.approx(6 * matmul * s + attention, rel=1e-12)


def test_build_reads_on_the_stage_and_evaluates_the_whole_eval_set(single_rank, tmp_path):
    """build() on one rank: a loader (first and last stage are the same here), FLOPs per sample,
    and the validation loss equal to torch's cross entropy over every predicted eval token
    (token-weighted across batches, the padded tail masked), with the synthetic floor beside it."""
    import torch.nn.functional as F

    from data.text import build_text_dataloader
    from engine.precision import plan_precision

    llm = get_family("llm")
    cfg = _config(*SMALL, f"data.synthetic.out_dir={tmp_path}/markov", f"trainer.output_dir={tmp_path}/run")
    assert llm.preflight(cfg) == []
    parts = llm.build(cfg, single_rank, plan_precision("fp32", False, torch.device("cpu")))
    assert parts.reads_data and parts.flops_per_sample > 0
    batch = next(iter(parts.train_loader))
    assert batch["tokens"].shape == (2, 24)
    metrics = parts.eval_fn(0)

    model = parts.model.eval()
    loader = build_text_dataloader(f"{tmp_path}/markov/eval-*.tar", dp_rank=0, dp_size=1, batch_size=7,
                                   tokenizer=parts.train_loader.tokenizer, seq_length=24, shuffle_buffer=0,
                                   infinite=False)
    total, count = 0.0, 0.0
    with torch.no_grad():
        for b in loader:
            losses = F.cross_entropy(model(b["tokens"]).transpose(1, 2), b["labels"], reduction="none")
            total += (losses.double() * b["loss_mask"]).sum().item()
            count += b["loss_mask"].sum().item()
    assert metrics["val_tokens"] == count
    assert metrics["val_loss"] == pytest.approx(total / count, abs=1e-5)
    # An untrained model is far above the floor; the source itself scores near it on these windows.
    assert metrics["gap"] == pytest.approx(metrics["val_loss"] - metrics["entropy_floor"])
    assert metrics["gap"] > 1.0
    assert abs(metrics["source_nll"] - metrics["entropy_floor"]) < 0.15 * metrics["entropy_floor"]
    summary = parts.summary()
    assert summary["data_sequences_read"] == 2 and summary["data_tokens_read"] == 48


def test_init_from_a_checkpoint_with_another_model_section_is_named(single_rank, tmp_path, caplog):
    """Weights load by name and shape, so a run whose model section differs from the checkpoint's in
    anything else (here the norm epsilon and the RoPE base) hears which keys."""
    from engine.checkpoint.tools import write_model_checkpoint
    from models.llm.family import warn_model_differs_from_init

    llm = get_family("llm")
    saved = _config(*SMALL)
    with torch.device("meta"):
        state = llm.reference_model(saved.model).state_dict()
    write_model_checkpoint(str(tmp_path / "ckpt"), saved, {k: torch.zeros(v.shape) if torch.is_tensor(v) else v
                                                           for k, v in state.items()})
    caplog.set_level("WARNING", logger="engine")
    caplog.clear()
    warn_model_differs_from_init(_config(*SMALL, f"checkpoint.init_from={tmp_path}/ckpt", "model.hidden_dropout=0.1"))
    assert not [r for r in caplog.records if r.name == "engine"]  # dropout is a training choice, not the model
    warn_model_differs_from_init(_config(*SMALL, f"checkpoint.init_from={tmp_path}/ckpt", "model.layernorm_epsilon=1e-6",
                                         "model.rotary_base=500000"))
    message = [r for r in caplog.records if r.name == "engine"][-1].getMessage()
    assert "model.layernorm_epsilon: 1e-05 in the checkpoint, 1e-06 here" in message
    assert "model.rotary_base: 10000.0 in the checkpoint, 500000.0 here" in message


def test_checkpoint_layout_treats_the_untied_output_layer_as_vocab_padded():
    """The output layer's rows are the padded vocabulary, so a checkpoint saved at one TP (rows padded
    to 64 x TP here) reloads at another, as the embedding does."""
    from engine.checkpoint.layout import tensor_specs
    from engine.checkpoint.tools import single_process_parallel_state
    from models.llm.config import llm_preset

    with single_process_parallel_state(), torch.device("meta"):
        model = get_family("llm").reference_model(llm_preset("tiny", share_embeddings_and_output_weights=False))
    specs = tensor_specs(model, 0, 1)
    assert specs["output_layer.weight"].padded and specs["embedding.word_embeddings.weight"].padded
    assert not specs["decoder.layers.0.mlp.linear_fc1.weight"].padded
