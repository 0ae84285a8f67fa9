"""Distillation losses and init from the teacher, one process.

Identities checked (fp32, 1e-6): cross-entropy = entropy(teacher) + KL; with student = teacher,
feature and KL are 0, cross-entropy is the teacher's entropy with zero gradient, interactive is
the plain contrastive loss; the total is (1 - w) L + w D.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from models.clip.distill import (
    DistillationLoss,
    DistillConfig,
    feature_distillation,
    freeze_teacher_,
    init_from_teacher,
    teacher_outputs,
    validate_distill,
)
from models.clip.loss import ContrastiveLoss
from models.clip.loss_factory import LossConfig, create_loss

TOL = 1e-6


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def entropy_rows(logits):
    p = logits.softmax(1)
    return -(p * p.log()).sum(1).mean()


def test_modes_against_their_definitions():
    img, txt = unit(6, 8, seed=1).requires_grad_(), unit(6, 8, seed=2).requires_grad_()
    t_img, t_txt = unit(6, 8, seed=3), unit(6, 8, seed=4)
    scale, t_scale = torch.tensor(10.0), torch.tensor(20.0)
    fns = {m: DistillationLoss(ContrastiveLoss(), m, weight=1.0) for m in ("feature", "cross_entropy", "kl", "interactive")}
    d = {m: fn.distillation(img, txt, t_img, t_txt, scale, t_scale) for m, fn in fns.items()}
    want_feature = sum(((t_img[i] - img[i]) ** 2).sum() + ((t_txt[i] - txt[i]) ** 2).sum() for i in range(6)) / 6
    torch.testing.assert_close(d["feature"], want_feature, atol=TOL, rtol=TOL)
    s_logits, t_logits = scale * img @ txt.T, t_scale * t_img @ t_txt.T
    entropy = (entropy_rows(t_logits) + entropy_rows(t_logits.T)) / 2
    torch.testing.assert_close(d["cross_entropy"] - d["kl"], entropy, atol=TOL, rtol=TOL)
    kl_rows = [(t_logits.softmax(1) * (t_logits.log_softmax(1) - s_logits.log_softmax(1))).sum(1).mean()
               for t_logits, s_logits in ((t_logits, s_logits), (t_logits.T, s_logits.T))]
    torch.testing.assert_close(d["kl"], sum(kl_rows) / 2, atol=TOL, rtol=TOL)
    labels = torch.arange(6)
    want_inter = (F.cross_entropy(scale * img @ t_txt.T, labels) + F.cross_entropy(scale * txt @ t_img.T, labels)) / 2
    torch.testing.assert_close(d["interactive"], want_inter, atol=TOL, rtol=TOL)


def test_same_student_and_teacher():
    img, txt = unit(6, 8, seed=1).requires_grad_(), unit(6, 8, seed=2).requires_grad_()
    scale = torch.tensor(14.0)
    for mode in ("feature", "kl", "cross_entropy", "interactive"):
        fn = DistillationLoss(ContrastiveLoss(), mode, weight=1.0)
        loss = fn(img, txt, scale, img.detach(), txt.detach(), scale)
        value = float(loss.detach())
        if mode in ("feature", "kl"):
            assert abs(value) < 1e-6, mode
        elif mode == "cross_entropy":
            logits = scale * img @ txt.T
            torch.testing.assert_close(loss, (entropy_rows(logits) + entropy_rows(logits.T)) / 2, atol=TOL, rtol=TOL)
        else:
            torch.testing.assert_close(loss, ContrastiveLoss()(img, txt, scale), atol=TOL, rtol=TOL)
        if mode != "interactive":
            grads = torch.autograd.grad(loss, (img, txt))
            assert max(float(g.abs().max()) for g in grads) < 1e-5, mode


def test_weighted_total_and_parts():
    img, txt, t_img, t_txt = (unit(4, 8, seed=s) for s in range(4))
    scale = torch.tensor(5.0)
    fn = DistillationLoss(ContrastiveLoss(), "feature", weight=0.25)
    parts = fn(img, txt, scale, t_img, t_txt, scale, output_dict=True)
    contrastive = ContrastiveLoss()(img, txt, scale)
    distill = feature_distillation(img, txt, t_img, t_txt)
    torch.testing.assert_close(parts["contrastive_loss"], 0.75 * contrastive)
    torch.testing.assert_close(parts["distill_loss"], 0.25 * distill)
    torch.testing.assert_close(fn(img, txt, scale, t_img, t_txt, scale), 0.75 * contrastive + 0.25 * distill)


def test_factory_and_config_errors():
    fastclip = create_loss(LossConfig(name="fastclip", version="v3", data_size=10),
                           distill=DistillConfig(mode="feature", weight=0.5))
    assert isinstance(fastclip, DistillationLoss) and fastclip.needs_sample_index and fastclip.needs_teacher
    assert fastclip.sample_state is fastclip.base.sample_state
    assert isinstance(create_loss(LossConfig()), ContrastiveLoss)
    with pytest.raises(ValueError, match="model.loss.name='siglip'"):
        create_loss(LossConfig(name="siglip"))
    with pytest.raises(ValueError, match="mode='l2'"):
        validate_distill(DistillConfig(mode="l2", teacher="t"))
    with pytest.raises(ValueError, match="needs? model.distill.teacher"):
        validate_distill(DistillConfig(mode="feature"))
    with pytest.raises(ValueError, match="weight=1.5"):
        validate_distill(DistillConfig(mode="kl", weight=1.5, teacher="t"))


# ---- with CLIP models ---------------------------------------------------------------------------

def _tiny(**vision):
    from tests.distributed.clip_fixtures import tiny_clip_config

    cfg = tiny_clip_config()
    for key, value in vision.items():
        setattr(cfg.vision, key, value)
    return cfg


def test_same_weights_give_zero_distillation(single_rank):
    from models.clip.model import CLIPModel
    from tests.distributed.clip_fixtures import tiny_batch

    torch.manual_seed(0)
    student = CLIPModel(_tiny())
    teacher = freeze_teacher_(CLIPModel(_tiny()))
    teacher.load_state_dict(copy.deepcopy(student.state_dict()))
    images, tokens = tiny_batch(4, seed=1, cfg=student.cfg)
    out = teacher_outputs(teacher, images, tokens)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    image, text, scale = student(images, tokens)
    for mode in ("feature", "kl"):
        fn = DistillationLoss(ContrastiveLoss(), mode, weight=1.0)
        assert float(fn(image, text, scale, **out).detach()) == pytest.approx(0.0, abs=1e-6), mode


def test_init_from_teacher_copies_exactly_the_matching_parameters(single_rank):
    from models.clip.model import CLIPModel

    torch.manual_seed(0)
    teacher = CLIPModel(_tiny(patch_dim=8))  # 16 patches + class token
    torch.manual_seed(1)
    student = CLIPModel(_tiny(patch_dim=16))  # 4 patches + class token
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    teacher_state = dict(teacher.state_dict())
    teacher_state["extra.weight"] = torch.zeros(3)
    report = init_from_teacher(student, teacher_state)
    left_out = {name for name, _, _ in report.shape_mismatch}
    assert left_out == {"visual.conv1.weight", "visual.positional_embedding"}
    assert not report.missing_in_teacher and report.unused_teacher == ["extra.weight"]
    for name, param in student.named_parameters():
        if name in left_out:
            assert torch.equal(param, before[name]), name
        else:
            assert name in report.copied and torch.equal(param, teacher_state[name]), name
    assert "left out visual.conv1.weight: student (64, 3, 16, 16), teacher (64, 3, 8, 8)" in report.summary()
