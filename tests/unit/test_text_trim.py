"""model.text.trim_to_longest: the text tower runs on each batch's tokens up to its last end of text.

The claim is exactness: a causal tower pooled at the end of text never lets a pooled position see
the padding after it, so features, loss and every gradient are those of the full context. Checked
on the tiny config (context 32) with the same weights and batch both ways; fp32, tolerance 1e-5
absolute on features and loss, and on each gradient 1e-5 of its largest element (the shorter run
only sums the same terms in another order: 2e-6 of it seen). Each check also asserts the tower
really ran shorter, so a switch that silently did nothing would fail.
"""
import pytest
import torch

from engine.config import load_config
from models.clip.config import CLIPExperimentConfig as ExperimentConfig
from models.clip.loss import ContrastiveLoss
from models.clip.model import CLIPModel
from models.clip.towers import TRIM_MULTIPLE


def tiny_cfg(*overrides):
    return load_config(ExperimentConfig, "configs/clip/tiny.yaml", list(overrides)).model


def batch_with_ends(cfg, ends, seed=0):
    """Images and tokens whose row i ends (largest id, or cfg.text.eot_token_id) at ends[i]; None: no end."""
    gen = torch.Generator().manual_seed(seed)
    v, t = cfg.vision, cfg.text
    images = torch.randn(len(ends), v.num_channels, v.img_h, v.img_w, generator=gen)
    tokens = torch.randint(1, t.vocab_size - 2, (len(ends), t.encoder_seq_length), generator=gen)
    eot = t.vocab_size - 1 if t.eot_token_id < 0 else t.eot_token_id
    for row, end in enumerate(ends):
        if end is not None:
            tokens[row, end] = eot
            tokens[row, end + 1:] = 0  # padding after the end, as the tokenizer writes it
    return images, tokens


def text_lengths_seen(model):
    seen = []
    model.text.transformer.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(args[0].shape[0]) if args
                                                     else seen.append(kwargs["hidden_states"].shape[0]),
                                                     with_kwargs=True)
    return seen


def loss_and_grads(model, images, tokens, trim: bool):
    model.cfg.text.trim_to_longest = trim
    model.zero_grad(set_to_none=True)
    image, text, scale = model(images, tokens)
    loss = ContrastiveLoss()(image, text, scale)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return image.detach(), text.detach(), loss.detach(), grads


@pytest.mark.parametrize("eot_token_id,ends", [(-1, [5, 11, 2, 9]), (3, [5, None, 2, 20])])
def test_trimmed_tower_gives_the_full_context_results(single_rank, eot_token_id, ends):
    """eot_token_id -1 pools at the largest id; a set id pools at its first position (a row without
    it pools at 0, as the full-length tower does)."""
    cfg = tiny_cfg(f"model.text.eot_token_id={eot_token_id}")
    torch.manual_seed(0)
    model = CLIPModel(cfg, use_cpu_initialization=True)
    images, tokens = batch_with_ends(cfg, ends)
    seen = text_lengths_seen(model)
    full = loss_and_grads(model, images, tokens, trim=False)
    trimmed = loss_and_grads(model, images, tokens, trim=True)
    longest = max(e for e in ends if e is not None) + 1
    assert seen == [cfg.text.encoder_seq_length, -(-longest // TRIM_MULTIPLE) * TRIM_MULTIPLE]
    for a, b in zip(full[:3], trimmed[:3]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert full[3].keys() == trimmed[3].keys()
    for name in full[3]:
        scale = full[3][name].abs().max().item()
        torch.testing.assert_close(trimmed[3][name], full[3][name], rtol=0, atol=1e-5 * scale + 1e-9, msg=name)


def test_trimming_before_the_end_would_change_the_features(single_rank):
    """The comparison above can fail: cutting one token short of a row's end of text moves its features."""
    cfg = tiny_cfg()
    model = CLIPModel(cfg, use_cpu_initialization=True)
    _, tokens = batch_with_ends(cfg, [12, 4])
    model.cfg.text.trim_to_longest = False
    full = model.encode_text(tokens)
    cut = model.encode_text(torch.cat([tokens[:, :12], tokens[:, 13:14]], dim=1))  # row 0's end replaced
    assert not torch.allclose(full[0], cut[0], atol=1e-3)


@pytest.mark.parametrize("ends,expected", [([0], 8), ([7], 8), ([8], 16), ([3, 30], 32), ([31], 32)])
def test_trimmed_length_rounds_up_to_a_multiple_of_8_within_the_context(single_rank, ends, expected):
    cfg = tiny_cfg()
    model = CLIPModel(cfg, use_cpu_initialization=True)
    _, tokens = batch_with_ends(cfg, ends)
    assert model.trim_text(tokens).shape[1] == expected == model.text.trimmed_length(tokens)


def test_an_empty_batch_keeps_its_shape(single_rank):
    model = CLIPModel(tiny_cfg(), use_cpu_initialization=True)
    assert model.trim_text(torch.zeros(0, 32, dtype=torch.long)).shape == (0, 32)


def test_no_trimming_when_off_or_on_a_pipeline_stage(single_rank):
    cfg = tiny_cfg()
    _, tokens = batch_with_ends(cfg, [3, 4])
    first_stage = CLIPModel(cfg, pre_process=True, post_process=False, use_cpu_initialization=True)
    assert first_stage.trim_text(tokens).shape[1] == cfg.text.encoder_seq_length  # messages keep one shape
    off = CLIPModel(tiny_cfg("model.text.trim_to_longest=false"), use_cpu_initialization=True)
    assert off.trim_text(tokens).shape[1] == cfg.text.encoder_seq_length


def test_forward_step_counts_the_tokens_and_flops_that_ran(single_rank):
    """The progress line's tokens/s and TFLOP/s follow the trimmed length, not the context."""
    from engine.flops import BatchLayout, clip_flops_per_sample
    from models.clip.family import StepInputs, clip_forward_step

    cfg = tiny_cfg()
    model = CLIPModel(cfg, use_cpu_initialization=True)
    images, tokens = batch_with_ends(cfg, [5, 9, 2])
    extras = StepInputs(flops_per_sample=lambda n: clip_flops_per_sample(cfg, BatchLayout(3), text_seq_length=n))
    loss, info = clip_forward_step(ContrastiveLoss(), torch.device("cpu"), model,
                                   {"images": images, "tokens": tokens}, extras=extras)
    assert loss.ndim == 0 and info["samples"] == 3
    assert info["tokens"] == 3 * (cfg.vision.seq_length + 16)
    assert info["flops"] == 3 * clip_flops_per_sample(cfg, BatchLayout(3), text_seq_length=16)
    assert info["flops"] < 3 * clip_flops_per_sample(cfg, BatchLayout(3))
