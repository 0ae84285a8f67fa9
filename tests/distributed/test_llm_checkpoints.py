"""An LLM's checkpoints through the tools a user runs, against transformers' own LlamaForCausalLM.

A small random Hugging Face Llama (GQA: 4 query heads, 2 key/value heads; untied), saved with
save_pretrained:
- `convert_checkpoint.py import-hf-llama` writes an engine checkpoint sharded for TP=2 and the
  experiment config to train it with; `export-hf-llama` of it loads with
  `LlamaForCausalLM.from_pretrained` and gives the original's logits within 1e-5.
- The engine trains one step from it at TP=2 (`checkpoint.init_from`); the exported trained model's
  loss on the run's eval windows (transformers' forward) equals the run's validation loss within 1e-5.
- `inspect`, `reshard` (TP=2 -> TP=1 -> TP=2) and `read_model_checkpoint` on that checkpoint: the
  same tensors after the round trip; one more step resumed from the TP=1 copy at TP=1 and from the
  TP=2 copy at TP=2 logs the same loss and validation loss within 1e-5.
- `examples/generate_llm.py` at TP=2 continues prompts token for token as transformers' greedy
  `generate`; pipeline parallelism is refused with generate's own message.
"""
import importlib.util
import json
import os

import pytest
import torch

from tests.distributed.harness import run_ranks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = 1e-5
VOCAB, SEQ = 40, 16
RUN = ["trainer.micro_batch_size=2", "trainer.global_batch_size=4", "trainer.log_every_n_steps=1",
       "trainer.val_check_interval=0", "optim.lr=1e-3", "optim.sched.warmup_steps=0", "checkpoint.keep_last=0",
       "eval.batch_size=4", "eval.num_batches=3", "device=cpu"]


def _load(script: str):
    spec = importlib.util.spec_from_file_location(os.path.basename(script)[:-3], os.path.join(REPO, "examples", script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train(argv):
    from engine.run import run

    return run("llm", argv)


def _generate(argv):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = _load("generate_llm.py").main(argv)
    return code, out.getvalue()


def _hf_loss(model, corpus: str) -> float:
    """transformers' forward on the run's eval windows (first 3 batches of 4), token-weighted."""
    import torch.nn.functional as F

    from data.text import build_text_dataloader
    from data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer("huggingface", os.path.join(corpus, "tokenizer.json"))
    loader = build_text_dataloader(os.path.join(corpus, "eval-*.tar"), dp_rank=0, dp_size=1, batch_size=4,
                                   tokenizer=tokenizer, seq_length=SEQ, shuffle_buffer=0, infinite=False)
    total = count = 0.0
    with torch.no_grad():
        for _, batch in zip(range(3), loader):
            logits = model(batch["tokens"]).logits
            losses = F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
            total += (losses.double() * batch["loss_mask"]).sum().item()
            count += batch["loss_mask"].sum().item()
    return total / count


@pytest.fixture(scope="module")
def transformers():
    try:
        import transformers
    except Exception as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"transformers does not import here ({type(exc).__name__}: {exc})")
    transformers.logging.set_verbosity_error()
    return transformers


@pytest.fixture(scope="module")
def trained(transformers, tmp_path_factory):
    """(the HF model, its directory, the import, the run config, the corpus, the trained checkpoint, the
    run's final metrics)."""
    tmp = tmp_path_factory.mktemp("llm_ckpts")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=False, initializer_range=0.1)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    hf.save_pretrained(str(tmp / "hf"))
    corpus, imported, run_yaml = str(tmp / "markov"), str(tmp / "imported"), str(tmp / "run.yaml")
    cli = _load("convert_checkpoint.py")
    assert cli.main(["import-hf-llama", str(tmp / "hf"), "--out", imported, "--tensor-model-parallel-size", "2",
                     "--save-config", run_yaml, f"model.seq_length={SEQ}", f"data.synthetic.out_dir={corpus}",
                     "data.synthetic.num_words=32", "data.synthetic.branching=4", "data.synthetic.num_train=40",
                     "data.synthetic.num_eval=20", "data.synthetic.docs_per_shard=20"]) == 0
    run_dir = tmp / "run"
    final = run_ranks(2, _train, ["--config", run_yaml, "tensor_model_parallel_size=2", f"checkpoint.init_from={imported}",
                                  "trainer.max_steps=1", f"trainer.output_dir={run_dir}", *RUN])
    assert final[0] == final[1]
    return {"hf": hf, "hf_dir": str(tmp / "hf"), "imported": imported, "run_yaml": run_yaml, "corpus": corpus,
            "ckpt": str(run_dir / "checkpoints" / "step_000000001"), "final": final[0], "tmp": tmp, "cli": cli}


def test_import_export_and_one_trained_step_match_transformers(trained, transformers):
    cli, tmp, hf = trained["cli"], trained["tmp"], trained["hf"]
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    assert cli.main(["export-hf-llama", trained["imported"], "--out", str(tmp / "back")]) == 0
    back = transformers.LlamaForCausalLM.from_pretrained(str(tmp / "back")).eval()
    with torch.no_grad():
        diff = (back(tokens).logits - hf(tokens).logits).abs().max().item()
    print(f"import -> export logits vs the original: max abs diff {diff:.2e}")
    assert diff < TOL
    for name, tensor in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name

    assert cli.main(["export-hf-llama", trained["ckpt"], "--out", str(tmp / "trained_hf")]) == 0
    trained_hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp / "trained_hf")).eval()
    assert not torch.equal(trained_hf.lm_head.weight, hf.lm_head.weight)  # the step changed the weights
    reference = _hf_loss(trained_hf, trained["corpus"])
    print(f"val_loss after one step at TP=2: engine {trained['final']['val_loss']:.7f}, transformers {reference:.7f}")
    assert abs(trained["final"]["val_loss"] - reference) < TOL
    # An export never overwrites without --overwrite, and never writes into an engine checkpoint.
    assert cli.main(["export-hf-llama", trained["ckpt"], "--out", str(tmp / "trained_hf")]) == 2
    assert cli.main(["export-hf-llama", trained["ckpt"], "--out", os.path.join(trained["ckpt"], "hf")]) == 2


def test_inspect_reshard_read_and_resume_at_another_tp(trained):
    from engine.checkpoint.tools import inspect_checkpoint, read_model_checkpoint, reshard_checkpoint

    tmp, ckpt = trained["tmp"], trained["ckpt"]
    summary = inspect_checkpoint(ckpt)
    assert "layout at save: TP=2 PP=1 DP=1" in summary and "decoder.layers.1.mlp.linear_fc1.weight" in summary
    tp1 = reshard_checkpoint(ckpt, str(tmp / "tp1"), 1)
    tp2 = reshard_checkpoint(tp1, str(tmp / "tp2"), 2)
    cfg, original = read_model_checkpoint(ckpt)
    assert cfg.model.num_query_groups == 2 and not cfg.model.share_embeddings_and_output_weights
    for path in (tp1, tp2):
        _, state = read_model_checkpoint(path)
        assert state.keys() == original.keys()
        for key, tensor in original.items():
            if torch.is_tensor(tensor):
                assert torch.equal(state[key], tensor), (path, key)
    common = ["--config", trained["run_yaml"], "trainer.max_steps=2", *RUN]
    at_tp1 = run_ranks(1, _train, common + ["tensor_model_parallel_size=1", f"checkpoint.resume={tp1}",
                                            f"trainer.output_dir={tmp / 'resume_tp1'}"])[0]
    at_tp2 = run_ranks(2, _train, common + ["tensor_model_parallel_size=2", f"checkpoint.resume={tp2}",
                                            f"trainer.output_dir={tmp / 'resume_tp2'}"])[0]
    history = {}
    for name in ("resume_tp1", "resume_tp2"):
        with open(tmp / name / "final_metrics.json") as fh:
            assert json.load(fh)["step"] == 2
        from engine.checkpoint.reader import CheckpointReader

        history[name] = CheckpointReader(str(tmp / name / "checkpoints" / "step_000000002")).meta["trainer"]["history"]
    print(f"step-2 loss resumed at TP=1 {history['resume_tp1'][-1][1]:.7f}, at TP=2 {history['resume_tp2'][-1][1]:.7f}")
    assert [h[0] for h in history["resume_tp1"]] == [1, 2]
    assert abs(history["resume_tp1"][-1][1] - history["resume_tp2"][-1][1]) < TOL
    assert abs(at_tp1["val_loss"] - at_tp2["val_loss"]) < TOL


def test_generate_at_tp2_matches_transformers_greedy(trained):
    from data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer("huggingface", os.path.join(trained["corpus"], "tokenizer.json"))
    words = list(json.load(open(os.path.join(trained["corpus"], "tokenizer.json")))["model"]["vocab"])[4:]
    prompts = [" ".join(words[:5]), " ".join(words[7:9])]
    argv = [trained["imported"], "--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", "8", "--json"]
    results = run_ranks(2, _generate, argv)
    assert results[0][0] == 0, results
    rows = [json.loads(line) for line in results[0][1].splitlines()]
    assert results[1][1] == ""  # rank 0 prints
    for prompt, row in zip(prompts, rows):
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            expected = trained["hf"].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                              do_sample=False, eos_token_id=tokenizer.eot_id,
                                              pad_token_id=tokenizer.pad_id)[0, ids.shape[1]:].tolist()
        if tokenizer.eot_id in expected:
            expected = expected[: expected.index(tokenizer.eot_id) + 1]
        assert row["prompt"] == prompt and row["token_ids"] == expected, (row, expected)
        assert row["text"] == tokenizer.decode(expected)


def test_generate_refuses_pipeline_parallelism_with_generates_message(capsys):
    from models.llm.generate import PIPELINE_REFUSED

    assert _load("generate_llm.py").main(["no/such/checkpoint", "--prompt", "x", "--pipeline-model-parallel-size",
                                          "2"]) == 2
    assert f"error: {PIPELINE_REFUSED}" in capsys.readouterr().err
