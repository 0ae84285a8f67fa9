"""The CLIP family's recipe pieces in one process: config keys, FastCLIP's checkpoint entries and
clock, early stopping, the validation loss, the linear probe, the micro-batch finder's wiring, the
LoRA exports (adapters alone, merged) and the teacher built from open_clip weights.

Tolerances: fp32 forwards 1e-5; the probe's optimality condition 1e-6 (float64).
"""
from __future__ import annotations

import math
import os
import types

import pytest
import torch

from engine.config import ConfigError, load_config
from engine.schema import BARE_KEYS
from models.clip.config import CLIPExperimentConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "clip", "tiny.yaml")
TOL = 1e-5


def _load(*overrides, path=TINY):
    return load_config(CLIPExperimentConfig, path, list(overrides), BARE_KEYS)


# ---- config -----------------------------------------------------------------------------------

def test_recipe_keys_load_and_are_checked():
    cfg = _load("model.loss.name=fastclip", "model.loss.version=v3", "model.loss.gamma=0.9", "model.loss.rho=11.0",
                "model.loss.lr_tau=7.8125e-5", "model.loss.lr_tau_scheduler=step_thresh", "model.loss.data_size=1400",
                "model.distill.mode=feature", "model.distill.weight=0.5", "model.finetune.scenario=lora_text",
                "data.augmentation=advanced", "eval.early_stopping.monitor=val_loss", "optim.sched.name=onecycle",
                "batch_finder.enabled=true", "batch_finder.memory_budget_gb=2")
    assert cfg.model.loss.name == "fastclip" and cfg.model.loss.rho == 11.0
    assert cfg.model.finetune.scenario == "lora_text" and cfg.model.finetune.lora.rank == 16
    assert _load().model.finetune.scenario is None  # pre-training: nothing frozen, no LoRA
    with pytest.raises(ConfigError) as info:
        _load("model.loss.name=fastclp", "model.loss.version=v4", "model.distill.mode=features",
              "model.finetune.scenario=lora", "data.augmentation=heavy", "model.distill.weight=1.5")
    for part in ("model.loss.name='fastclp'", "model.loss.version='v4'", "model.distill.mode='features'",
                 "model.finetune.scenario='lora'", "data.augmentation='heavy'", "model.distill.weight=1.5"):
        assert part in str(info.value)


@pytest.mark.parametrize("scenario", ["zero_shot", "linear_probe", "lora_dual", "lora_vision", "lora_text", "full"])
def test_finetune_configs_name_their_scenario(scenario):
    cfg = _load(path=os.path.join(REPO, "configs", "clip", "finetune", f"{scenario}.yaml"))
    assert cfg.model.finetune.scenario == scenario
    assert cfg.checkpoint.init_from == "runs/clip_tiny/checkpoints"
    assert cfg.model == _load(f"model.finetune.scenario={scenario}").model  # the demo's architecture


# ---- FastCLIP state, clock, early stopping ----------------------------------------------------

def test_sample_state_entries_are_boxes_of_the_live_block():
    from engine.checkpoint import Boxes
    from models.clip.run_state import SampleStateEntries
    from models.clip.sample_state import ShardedSampleState

    state = ShardedSampleState({"log_u_image": -math.inf, "log_u_text": 0.0}, data_size=10)
    entries = SampleStateEntries(state).state_dict()
    box = entries["log_u_image"]
    assert isinstance(box, Boxes) and tuple(box.global_shape) == (10,)
    (offset, tensor), = box.boxes
    assert offset == (0,) and tensor.data_ptr() == state.tensors["log_u_image"].data_ptr()  # loads write in place
    assert entries["data_size"] == 10 and entries["names"] == ["log_u_image", "log_u_text"]
    with pytest.raises(ConfigError, match="data_size=12"):
        SampleStateEntries(state).load_state_dict({"data_size": 12, "names": entries["names"]})
    with pytest.raises(ConfigError, match="model.loss.version"):
        SampleStateEntries(state).load_state_dict({"data_size": 10, "names": ["log_u_image"]})


def test_clock_counts_epochs_of_the_global_batch():
    from models.clip.run_state import TrainClock

    clock = TrainClock(global_batch_size=32, samples_per_epoch=100)
    epochs = []
    for step in range(8):
        epochs.append(clock.epoch)
        clock.step = step + 1
    assert epochs == [0, 0, 0, 0, 1, 1, 1, 2]  # 32 x 4 = 128 >= 100, 32 x 7 = 224 >= 200
    other = TrainClock(32, 100)
    other.load_state_dict(clock.state_dict())
    assert other.epoch == clock.epoch == 2


def test_early_stopping_monitor_stops_after_patience():
    from models.clip.config import EarlyStoppingConfig
    from models.clip.run_state import EarlyStopMonitor

    monitor = EarlyStopMonitor(EarlyStoppingConfig(monitor="val_loss", patience=2, min_delta=0.001, mode="min"))
    # improves, improves by < min_delta (a bad one), improves, then two that do not
    for step, value in enumerate([2.0, 1.9995, 1.5, 1.4999, 1.6], start=1):
        assert monitor.stop_requested() is None, step
        monitor.observe(step, {"val_loss": value})
    assert monitor.stop_requested().startswith("early stopping: val_loss did not improve by more than 0.001")
    with pytest.raises(ConfigError, match="reports val_loss"):
        EarlyStopMonitor(EarlyStoppingConfig(monitor="val_acc")).observe(1, {"val_loss": 1.0})


# ---- evaluation pieces -------------------------------------------------------------------------

def test_validation_loss_is_the_contrastive_loss_per_eval_batch():
    from models.clip.family import validation_loss
    from models.clip.loss import ContrastiveLoss

    gen = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(10, 8, generator=gen), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(10, 8, generator=gen), dim=-1)
    loss = ContrastiveLoss()
    scale = torch.tensor(14.0)
    want = (float(loss(images[:4], texts[:4], scale)) * 4 + float(loss(images[4:8], texts[4:8], scale)) * 4
            + float(loss(images[8:], texts[8:], scale)) * 2) / 10
    assert validation_loss(images, texts, 14.0, batch_size=4) == pytest.approx(want, rel=1e-6)


def test_linear_probe_separates_separable_classes_and_fits_the_optimum():
    from models.clip.linear_probe import fit_logistic_regression, linear_probe_accuracy

    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 6, generator=gen) * 4
    labels = torch.arange(90) % 3
    feats = centers[labels] + 0.3 * torch.randn(90, 6, generator=gen)
    out = linear_probe_accuracy(feats[:60], labels[:60], feats[60:], labels[60:])
    assert out["linear_probe_top1"] == 1.0
    # random labels: nothing to learn, the test accuracy stays near chance
    noise = torch.randn(300, 6, generator=gen)
    rand = torch.randint(0, 3, (300,), generator=gen)
    assert linear_probe_accuracy(noise[:200], rand[:200], noise[200:], rand[200:])["linear_probe_top1"] < 0.5
    # the fit is the optimum of mean cross-entropy + l2/2 |W|^2: its gradient vanishes
    w = fit_logistic_regression(feats, labels, 3, l2=1e-2).requires_grad_()
    x = torch.cat([feats.double(), torch.ones(90, 1, dtype=torch.float64)], dim=1)
    objective = torch.nn.functional.cross_entropy(x @ w, labels) + 0.5e-2 * w[:-1].square().sum()
    (grad,) = torch.autograd.grad(objective, w)
    assert grad.abs().max() < 1e-6


# ---- micro-batch finder --------------------------------------------------------------------------

def _ctx(single_rank):
    dims = types.SimpleNamespace(tp=1, pp=1, dp=1)
    return types.SimpleNamespace(dims=dims, tp_rank=0, pp_rank=0, dp_rank=0, device=torch.device("cpu"),
                                 dp_group=None, rank=0, is_logging_rank=True)


def test_batch_finder_picks_the_largest_divisor_within_the_budget(single_rank):
    from functools import partial

    from models.clip.batch_finder import find_clip_micro_batch, fixed_state_bytes, synthetic_batch
    from models.clip.family import clip_forward_step
    from models.clip.loss import ContrastiveLoss
    from models.clip.model import CLIPModel
    from models.common.finetune_utils import saved_activation_bytes
    from tests.distributed.clip_fixtures import tiny_clip_config

    torch.manual_seed(0)
    cfg = _load("trainer.global_batch_size=24", "batch_finder.enabled=true")
    cfg.model = tiny_clip_config()
    model = CLIPModel(cfg.model)
    step = partial(clip_forward_step, ContrastiveLoss(), torch.device("cpu"))

    def measure(size):  # the bytes one forward at `size` saves for backward (the finder's CPU measure)
        def trial(b):
            step(model, synthetic_batch(cfg.model, b, 512))[0].backward()
            model.zero_grad(set_to_none=True)
        return saved_activation_bytes(trial)(size)

    fixed = fixed_state_bytes(model)
    sizes = {b: measure(b) for b in (6, 8)}
    assert sizes[6] < sizes[8]
    cfg.batch_finder.memory_budget_gb = (fixed + (sizes[6] + sizes[8]) // 2) / 2**30
    found = find_clip_micro_batch(cfg, _ctx(single_rank), model, lambda loss: partial(clip_forward_step, loss,
                                  torch.device("cpu")), None, None, 512, reads_data=True)
    assert found == 6  # divisors of 24: 1 2 3 4 6 8 12 24; 8 does not fit, 6 does
    cfg.batch_finder.memory_budget_gb = fixed / 2**30 / 2
    with pytest.raises(RuntimeError, match="not even micro-batch 1 fits"):
        find_clip_micro_batch(cfg, _ctx(single_rank), model, lambda loss: partial(clip_forward_step, loss,
                              torch.device("cpu")), None, None, 512, reads_data=True)
    cfg.batch_finder.memory_budget_gb = None
    with pytest.raises(ConfigError, match="memory_budget_gb"):
        find_clip_micro_batch(cfg, _ctx(single_rank), model, None, None, None, 512, reads_data=True)


# ---- LoRA exports -------------------------------------------------------------------------------

def test_adapters_alone_and_merged_export_reproduce_the_lora_model(single_rank, tmp_path):
    import importlib.util

    from engine.checkpoint.tools import write_model_checkpoint
    from models.clip.family import load_adapters, reference_model
    from models.clip.model import CLIPModel
    from tests.distributed.clip_fixtures import tiny_batch, tiny_clip_config

    spec = importlib.util.spec_from_file_location("finetune_clip", os.path.join(REPO, "examples", "finetune_clip.py"))
    finetune_clip = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finetune_clip)

    cfg = _load("model.finetune.scenario=lora_dual", "model.finetune.lora.dropout=0.0")
    cfg.model = tiny_clip_config()
    cfg.model.finetune.scenario, cfg.model.finetune.lora.dropout = "lora_dual", 0.0
    torch.manual_seed(0)
    lora = reference_model(cfg.model).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    images, tokens = tiny_batch(3, seed=2, cfg=cfg.model)
    want_image, want_text, _ = lora(images, tokens)
    run_ckpt = write_model_checkpoint(str(tmp_path / "run"), cfg, dict(lora.state_dict()))

    merged = finetune_clip.export_merged(run_ckpt, str(tmp_path / "merged"))
    from engine.checkpoint.tools import read_model_checkpoint

    plain_cfg, plain_state = read_model_checkpoint(merged)
    assert plain_cfg.model.finetune.scenario is None and not any(".lora." in k for k in plain_state)
    plain = CLIPModel(plain_cfg.model).eval()
    plain.load_state_dict(plain_state)
    image, text, _ = plain(images, tokens)
    torch.testing.assert_close(image, want_image, atol=TOL, rtol=TOL)
    torch.testing.assert_close(text, want_text, atol=TOL, rtol=TOL)

    adapters = finetune_clip.export_adapters(run_ckpt, str(tmp_path / "adapters.safetensors"))
    fresh = reference_model(cfg.model).eval()  # other random A, B = 0
    base = {k: v for k, v in lora.state_dict().items() if ".lora." not in k}
    fresh.load_state_dict(base, strict=False)
    load_adapters(fresh, adapters, _ctx(single_rank))
    image, text, _ = fresh(images, tokens)
    torch.testing.assert_close(image, want_image, atol=TOL, rtol=TOL)
    torch.testing.assert_close(text, want_text, atol=TOL, rtol=TOL)


# ---- the teacher from open_clip weights --------------------------------------------------------

def test_teacher_from_open_clip_weights_matches_open_clip(single_rank, tmp_path):
    import json

    from conversion.files import save_tensor_file
    from engine.precision import plan_precision
    from models.clip.distill import DistillConfig
    from models.clip.teacher import build_teacher, read_teacher_source
    from tests.unit.test_convert_open_clip import TINY as OPEN_CLIP_TINY
    from tests.unit.test_convert_open_clip import build_openclip, openclip_embeddings, tiny_inputs

    reference = build_openclip(OPEN_CLIP_TINY, tmp_path)
    weights, config = tmp_path / "teacher.safetensors", tmp_path / "teacher.json"
    save_tensor_file(reference.state_dict(), weights)
    config.write_text(json.dumps(OPEN_CLIP_TINY))
    source = read_teacher_source(DistillConfig(mode="feature", teacher=str(weights), teacher_format="open_clip",
                                               teacher_config=str(config)))
    tokenizer = types.SimpleNamespace(eot_id=-1, vocab_size=300)  # open_clip pools at the highest id
    teacher = build_teacher(source, tokenizer, _ctx(single_rank), plan_precision("fp32", False, torch.device("cpu")),
                            holds=True, sequence_parallel=False)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    images, tokens = tiny_inputs(OPEN_CLIP_TINY)
    want_image, want_text = openclip_embeddings(reference, images, tokens)
    image, text, scale = teacher(images, tokens)
    torch.testing.assert_close(image, want_image, atol=TOL, rtol=TOL)
    torch.testing.assert_close(text, want_text, atol=TOL, rtol=TOL)
    assert float(scale) == pytest.approx(float(reference.logit_scale.detach().exp()), rel=1e-6)


# ---- preflight, the image folder, 8-bit Adam ----------------------------------------------------

def test_recipe_problems_are_named_before_launch(tmp_path):
    from models.clip.family import preflight

    cfg = _load("model.loss.name=fastclip", f"data.train_shards={tmp_path}/missing-{{000..001}}.tar",
                "model.distill.init_from_teacher=true", "checkpoint.init_from=/nonexistent/ckpt",
                "model.finetune.scenario=zero_shot")
    problems = "\n".join(preflight(cfg))
    for part in ("model.loss.data_size", "model.distill.teacher (the reference model)",
                 "both initialise the model", "scenario=zero_shot trains nothing",
                 "checkpoint.init_from=/nonexistent/ckpt: no such checkpoint"):
        assert part in problems, part
    assert preflight(_load("model.loss.name=fastclip")) == []  # the synthetic set: data_size is its rows


def test_image_folder_batches(tmp_path):
    from PIL import Image

    from data.transforms import build_image_transform
    from models.clip.evaluate import image_folder_batches

    for folder, color in (("red_circle", (255, 0, 0)), ("blue_square", (0, 0, 255))):
        (tmp_path / folder).mkdir()
        for i in range(3):
            Image.new("RGB", (20, 16), color).save(tmp_path / folder / f"{i}.png")
    (tmp_path / "blue_square" / "broken.jpg").write_bytes(b"not an image")
    seen = []
    tokenizer = lambda texts, context_length: (seen.extend(texts), torch.zeros(len(texts), context_length))[1]  # noqa: E731
    batches, classes = image_folder_batches(str(tmp_path), build_image_transform(16, train=False), tokenizer, 4, 8,
                                            ["a photo of a {}."])
    out = list(batches())
    assert classes["classnames"] == ["blue square", "red circle"]  # sorted folders, underscores as spaces
    assert [b["images"].shape[0] for b in out] == [4, 2]  # the broken file skipped
    assert torch.cat([b["class_index"] for b in out]).tolist() == [0, 0, 0, 1, 1, 1]
    assert seen[0] == "a photo of a blue square." and out[0]["images"].shape[1:] == (3, 16, 16)


def test_adamw_8bit_is_an_optional_gpu_extra():
    from engine.optim import build_optimizer
    from engine.schema import OptimConfig

    model = torch.nn.Linear(3, 2)
    with pytest.raises(ConfigError, match="needs the parameters on a CUDA device; use optim.name=adamw on CPU"):
        build_optimizer(model, OptimConfig(name="adamw_8bit"))
    with pytest.raises(ConfigError, match="without model.megatron_amp_O2"):
        build_optimizer(model, OptimConfig(name="adamw_8bit"), master_weights=True)
