"""Analytic FLOPs (engine/flops.py) against torch's FlopCounterMode on the real models.

FlopCounterMode counts every matmul, convolution and attention kernel the forward and the
backward run. SDPA is pinned to its math kernel so attention runs as visible matmuls (the CPU
flash kernel has no FlopCounterMode formula, and a flash backward would add its score recompute).
The CLIP towers are the engine's own (megatron-core blocks): tiny on CPU with real data, B/32 and
L/14 at full size on the meta device (shapes only). The LLM formula is checked on Hugging Face's
Llama (grouped-query attention, SwiGLU, untied output layer). Tolerance: relative 1e-9 (the
formulas count the same matmuls, so they agree exactly; the tolerance only absorbs float rounding).
"""
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from engine.config import load_config
from engine.flops import (
    BatchLayout,
    clip_flops_breakdown,
    clip_flops_per_sample,
    clip_forward_flops,
    gpt_flops_per_token,
    peak_tflops,
)
from models.clip.config import CLIPExperimentConfig as ExperimentConfig
from engine.throughput import ThroughputMeter, describe

REL = 1e-9


def counted_clip_flops(cfg, batch: int, device: str, overrides=(), eot: int = -1):
    """(forward, backward) FLOPs FlopCounterMode sees for one CLIP training micro-batch whose
    longest caption ends at position `eot` (default the last: the whole context)."""
    from models.clip.loss import ContrastiveLoss
    from models.clip.model import CLIPModel

    with torch.device(device):
        model = CLIPModel(cfg.model, use_cpu_initialization=True, perform_initialization=device != "meta")
        v, t = cfg.model.vision, cfg.model.text
        images = torch.randn(batch, v.num_channels, v.img_h, v.img_w)
        tokens = torch.randint(0, t.vocab_size - 1, (batch, t.encoder_seq_length))
        ends = [eot % t.encoder_seq_length] + [eot % t.encoder_seq_length // 2] * (batch - 1)
        tokens[torch.arange(batch), torch.tensor(ends)] = t.vocab_size - 1  # end of text: the largest id
    model.train()
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as forward:
            image, text, scale = model(images, tokens)
            loss = ContrastiveLoss()(image, text, scale)
        with FlopCounterMode(display=False) as backward:
            loss.backward()
    return forward.get_total_flops(), backward.get_total_flops()


@pytest.mark.parametrize("size,device,batch", [("tiny", "cpu", 6), ("b32", "meta", 8), ("l14", "meta", 4)])
def test_clip_formula_matches_flop_counter(single_rank, size, device, batch):
    cfg = load_config(ExperimentConfig, f"configs/clip/{size}.yaml")
    fwd, bwd = counted_clip_flops(cfg, batch, device)
    expected_fwd = sum(clip_forward_flops(cfg.model, batch).values()) * batch
    expected_total = clip_flops_per_sample(cfg.model, BatchLayout(batch)) * batch
    print(f"{size}: counted forward {fwd:.6e} vs formula {expected_fwd:.6e}; forward+backward {fwd + bwd:.6e} "
          f"vs {expected_total:.6e}")
    assert math.isclose(fwd, expected_fwd, rel_tol=REL)
    assert math.isclose(bwd, expected_total - expected_fwd, rel_tol=REL)


@pytest.mark.parametrize("eot,text_length", [(9, 16), (16, 24), (30, 32)])
def test_trimmed_text_tower_is_counted_at_its_length(single_rank, eot, text_length):
    """model.text.trim_to_longest runs the text tower up to the longest caption rounded up to 8 (at
    most the context, 32 in tiny); the formula at that length counts what actually ran."""
    cfg = load_config(ExperimentConfig, "configs/clip/tiny.yaml")
    batch = 4
    fwd, bwd = counted_clip_flops(cfg, batch, "cpu", eot=eot)
    expected = clip_flops_per_sample(cfg.model, BatchLayout(batch), text_seq_length=text_length) * batch
    assert math.isclose(fwd + bwd, expected, rel_tol=REL)
    full = clip_flops_per_sample(cfg.model, BatchLayout(batch)) * batch
    assert (fwd + bwd < full) == (text_length < cfg.model.text.encoder_seq_length)


def test_similarity_term_grows_with_the_contrastive_batch(single_rank):
    """Per sample, the B x B logits cost 3 * 2 * B * d: counted at two batch sizes."""
    cfg = load_config(ExperimentConfig, "configs/clip/tiny.yaml")
    small, large = (sum(counted_clip_flops(cfg, b, "meta")) / b for b in (4, 12))
    d = cfg.model.output_dim
    assert math.isclose(large - small, 3 * 2 * (12 - 4) * d, rel_tol=REL)
    assert math.isclose(clip_flops_per_sample(cfg.model, BatchLayout(2, data_parallel_size=6)),
                        clip_flops_per_sample(cfg.model, BatchLayout(12)), rel_tol=REL)


@pytest.mark.parametrize("method,num_layers", [("uniform", 1), ("block", 2)])
def test_recompute_adds_the_recomputed_forward(single_rank, method, num_layers):
    """megatron-core's full recompute reruns the checkpointed layers' forward inside backward."""
    overrides = [f"model.{tower}.activations_checkpoint_{key}={value}" for tower in ("vision", "text")
                 for key, value in (("granularity", "full"), ("method", method), ("num_layers", num_layers))]
    cfg = load_config(ExperimentConfig, "configs/clip/tiny.yaml", overrides)
    batch = 4
    fwd, bwd = counted_clip_flops(cfg, batch, "meta")
    parts = clip_flops_breakdown(cfg.model, batch, with_recompute=True)
    assert parts["recompute"] > 0
    assert math.isclose(fwd + bwd, parts["total"] * batch, rel_tol=REL)
    # model FLOPs (MFU) leave the recompute out
    assert math.isclose(clip_flops_per_sample(cfg.model, BatchLayout(batch)) * batch, fwd + bwd - parts["recompute"] * batch,
                        rel_tol=REL)


def test_llm_formula_matches_flop_counter_on_hf_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=64,
                                      tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    batch, seq = 2, 32
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    expected = gpt_flops_per_token(num_layers=2, hidden=64, ffn=160, num_heads=4, num_query_groups=2, seq_len=seq,
                                   vocab_size=config.vocab_size) * batch * seq
    assert math.isclose(counter.get_total_flops(), expected, rel_tol=REL)


def test_llm_formula_is_six_n_plus_attention():
    """The closed form people quote: 6 * (matrix parameters) + 12 * L * s * h per token."""
    L, h, f, s, V = 4, 256, 688, 128, 1000
    n_matrix = L * (4 * h * h + 3 * h * f) + h * V
    assert gpt_flops_per_token(num_layers=L, hidden=h, ffn=f, num_heads=8, seq_len=s, vocab_size=V) == \
        6 * n_matrix + 12 * L * s * h


@pytest.mark.parametrize("name,expected", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA GH200 480GB", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0),
    ("NVIDIA GeForce RTX 4090", None), ("cpu", None)])
def test_peak_table_by_device_name(name, expected):
    assert peak_tflops(name) == expected


def test_throughput_on_cpu_shows_tflops_per_rank_and_no_mfu():
    meter = ThroughputMeter(2e12, world_size=4, device=torch.device("cpu"))
    metrics = meter.metrics(samples_per_s=10.0)
    assert metrics == {"tflops_per_rank": pytest.approx(5.0)}
    assert describe(metrics) == " | 5.0 TFLOP/s/rank"
    assert describe(ThroughputMeter(1e9, 1, torch.device("cpu")).metrics(12.5)) == " | 12.5 GFLOP/s/rank"


def test_peak_override_gives_mfu_anywhere():
    metrics = ThroughputMeter(1e12, world_size=2, device=torch.device("cpu"), peak_override=50.0).metrics(40.0)
    assert metrics["tflops_per_rank"] == pytest.approx(20.0)
    assert metrics["mfu"] == pytest.approx(0.4)
    assert describe(metrics) == " | 20.0 TFLOP/s/rank | MFU 40.0%"


def test_no_flops_no_throughput_metrics():
    assert ThroughputMeter(None, 1, torch.device("cpu")).metrics(100.0) == {}
    assert describe({"loss": 1.0}) == ""


def test_meter_prefers_the_flops_the_family_counted():
    """A family whose work per sample varies (CLIP's trimmed text tower) reports FLOPs per micro-batch:
    their rate replaces flops_per_sample x samples/s."""
    meter = ThroughputMeter(1e12, world_size=2, device=torch.device("cpu"), peak_override=50.0)
    metrics = meter.metrics(40.0, flops_per_s=30e12)
    assert metrics["tflops_per_rank"] == pytest.approx(15.0) and metrics["mfu"] == pytest.approx(0.3)
    assert meter.metrics(40.0, flops_per_s=None)["tflops_per_rank"] == pytest.approx(20.0)


def test_progress_line_carries_tflops_and_mfu(caplog):
    from engine.progress import ProgressLogger

    progress = ProgressLogger(10, None, enabled=True)
    metrics = {"loss": 1.0, "lr": 1e-3, "grad_norm": 0.5, "samples_per_s": 100.0, "tokens_per_s": 5000.0,
               "step_time": 0.2, "tflops_per_gpu": 412.34, "mfu": 0.4169, "peak_memory_gib": 23.14}
    with caplog.at_level("INFO", logger="engine"):
        progress.log_train(3, metrics)
    line = caplog.records[-1].getMessage()
    assert line.startswith("step 3/10 | loss 1.0000")
    assert line.endswith("| 412.3 TFLOP/s/GPU | MFU 41.7% | peak mem 23.1 GiB")
    assert "0.200 s/step" in line  # bench/engine_runner.py parses this field
