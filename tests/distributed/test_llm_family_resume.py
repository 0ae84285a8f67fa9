"""The LLM family through the engine's one run at TP=2 x PP=2 x DP=2 (8 gloo ranks, CPU fp32), with
the labels read on the last pipeline stage.

Exact resume: 4 steps straight (saving at step 2 on the way) against a new process group that
resumes from that step-2 checkpoint and trains steps 3-4: every logged loss and every final weight
bit-identical. Both pipeline stages read data, so a last stage whose stream position was not
restored would pair the tokens with other labels and the losses would differ. The run's final
validation loss (forward-only through the pipeline, DP ranks splitting the eval batches) is the same
number on all 8 ranks and equals one process's loss of the saved weights on the same eval set
within 1e-5.
"""
import os

import torch

from tests.distributed.harness import run_ranks

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = 1e-5
SMALL_MODEL = ["model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_attention_heads=4",
               "model.num_query_groups=2", "model.seq_length=16", "model.share_embeddings_and_output_weights=false",
               "model.vocab_size=24"]


def _common(corpus: str) -> list[str]:
    return ["--config", os.path.join(REPO, "configs", "llm", "tiny.yaml"), *SMALL_MODEL,
            "tensor_model_parallel_size=2", "pipeline_model_parallel_size=2", "device=cpu",
            f"data.synthetic.out_dir={corpus}", "data.synthetic.num_words=20", "data.synthetic.branching=3",
            "data.synthetic.num_train=80", "data.synthetic.num_eval=12", "data.synthetic.docs_per_shard=20",
            "data.shuffle_buffer=8", "trainer.micro_batch_size=1", "trainer.global_batch_size=4",
            "trainer.log_every_n_steps=1", "trainer.val_check_interval=0", "optim.lr=1e-2",
            "optim.sched.warmup_steps=1", "checkpoint.keep_last=0", "eval.batch_size=2", "eval.num_batches=5",
            "trainer.max_steps=4"]


def _run(argv: list[str]):
    from engine.run import run

    return run("llm", argv)


def _reference_val_loss(ckpt: str, corpus: str) -> float:
    """One process, TP=1/PP=1: the checkpoint's weights on the first 5 eval batches of 2."""
    import torch.nn.functional as F

    from data.text import build_text_dataloader
    from data.tokenizers import build_tokenizer
    from engine.checkpoint.tools import read_model_checkpoint, single_process_parallel_state
    from engine.family import get_family

    cfg, state = read_model_checkpoint(ckpt)
    with single_process_parallel_state():
        model = get_family("llm").reference_model(cfg.model).eval()
        model.load_state_dict(state, strict=True)
        tokenizer = build_tokenizer("huggingface", os.path.join(corpus, "tokenizer.json"))
        loader = build_text_dataloader(os.path.join(corpus, "eval-*.tar"), dp_rank=0, dp_size=1, batch_size=2,
                                       tokenizer=tokenizer, seq_length=16, shuffle_buffer=0, infinite=False)
        total = count = 0.0
        with torch.no_grad():
            for _, batch in zip(range(5), loader):
                losses = F.cross_entropy(model(batch["tokens"]).transpose(1, 2), batch["labels"], reduction="none")
                total += (losses.double() * batch["loss_mask"]).sum().item()
                count += batch["loss_mask"].sum().item()
    return total / count


def test_llm_resume_is_bit_identical_at_tp2_pp2_dp2(tmp_path):
    from engine.checkpoint.reader import CheckpointReader
    from engine.checkpoint.tools import read_model_checkpoint

    corpus, straight, split = str(tmp_path / "markov"), tmp_path / "straight", tmp_path / "split"
    common = _common(corpus)
    first = run_ranks(8, _run, common + [f"trainer.output_dir={straight}", "checkpoint.save_interval=2"], timeout=900)
    halfway = straight / "checkpoints" / "step_000000002"
    second = run_ranks(8, _run, common + [f"trainer.output_dir={split}", f"checkpoint.resume={halfway}"], timeout=900)

    meta_a = CheckpointReader(str(straight / "checkpoints" / "step_000000004")).meta
    meta_b = CheckpointReader(str(split / "checkpoints" / "step_000000004")).meta
    assert meta_a["family"] == "llm" and meta_a["layout"]["tensor_model_parallel_size"] == 2
    history_a, history_b = meta_a["trainer"]["history"], meta_b["trainer"]["history"]
    assert [h[0] for h in history_a] == [1, 2, 3, 4]
    assert history_a == history_b  # steps 3 and 4 recomputed after the resume: the same losses, bit for bit
    _, state_a = read_model_checkpoint(str(straight / "checkpoints" / "step_000000004"))
    _, state_b = read_model_checkpoint(str(split / "checkpoints" / "step_000000004"))
    assert state_a.keys() == state_b.keys() and "decoder.layers.1.mlp.linear_fc1.weight" in state_a
    for key, tensor in state_a.items():
        if torch.is_tensor(tensor):
            assert torch.equal(tensor, state_b[key]), key
    _, state_half = read_model_checkpoint(str(halfway))
    assert not torch.equal(state_half["output_layer.weight"], state_a["output_layer.weight"])  # it did train

    # The pipelined validation loss: one number on every rank, that of one process on these weights.
    assert all(r == first[0] for r in first + second), (first, second)
    reference = _reference_val_loss(str(straight / "checkpoints" / "step_000000004"), corpus)
    print(f"val_loss at TP2xPP2xDP2 {first[0]['val_loss']:.7f}, one process {reference:.7f}")
    assert abs(first[0]["val_loss"] - reference) < TOL
    assert first[0]["entropy_floor"] > 0 and "gap" in first[0]
