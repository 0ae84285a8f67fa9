"""Learning with a reference model: distillation losses, the frozen teacher, init from the teacher.

The modes follow vibalcam/clip_with_reference (`src/fast_clip/loss.py`, `FastCLIPDistillLoss` and
`DistillClipLoss.dist_loss`; no code is taken from it). With student features s, teacher features
t (both L2-normalised, from the same images and captions) and logits l = scale * a @ b.T:

- feature: |t_img - s_img|^2 + |t_txt - s_txt|^2, each a mean over the batch (the best model of the
  seed: "FD + init from teacher");
- cross_entropy: -sum softmax(l_teacher) * log_softmax(l_student), per row, mean over rows,
  averaged over the image->text and text->image logits (open_clip's DistillClipLoss);
- kl: KL(softmax(l_teacher) || softmax(l_student)), per row ("batchmean"), averaged the same way;
- interactive: the contrastive loss between student images and teacher captions and between
  teacher images and student captions, with the student's scale.

Logit modes see the DP global batch the way the contrastive loss does (`local_loss`,
`gather_with_grad`); the feature mode is per sample, so the engine's DP average makes it the
global mean. Total loss: (1 - weight) * contrastive + weight * distillation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import VocabParallelEmbedding

from parallel.collectives import all_gather_keep_local_grad, all_gather_with_grad

DISTILL_MODES = ("feature", "cross_entropy", "kl", "interactive")


@dataclass
class DistillConfig:
    """The reference-model section (`model.distill.*`, to be wired by the engine).

    `teacher` names the frozen reference model: an engine checkpoint (a step directory or a
    checkpoint root, any TP/PP layout; its architecture is the one saved in it), an open_clip state
    dict file or `local-dir` directory, or a Hugging Face CLIPModel directory (`teacher_format`).
    For open_clip, `teacher_config` is the open_clip model name (`ViT-B-32`) or model config JSON;
    without it the directory's config, or one inferred from the weights, is used. The teacher runs
    at the student's tensor-parallel size and reads the student's images and tokens: it must take
    the same image size and share the tokenizer.
    """

    mode: str | None = None  # None (no teacher) | feature | cross_entropy | kl | interactive
    weight: float = 0.5  # loss = (1 - weight) * contrastive + weight * distillation
    init_from_teacher: bool = False  # copy every student parameter whose name and shape match
    teacher: str | None = None
    teacher_format: str = "engine"  # engine | open_clip | hf
    teacher_config: str | None = None


def validate_distill(cfg: DistillConfig, need_teacher: bool = True) -> None:
    if cfg.mode is not None and cfg.mode not in DISTILL_MODES:
        raise ValueError(f"model.distill.mode={cfg.mode!r}: use one of {', '.join(DISTILL_MODES)} or null")
    if not 0.0 <= cfg.weight <= 1.0:
        raise ValueError(f"model.distill.weight={cfg.weight}: need 0 <= weight <= 1")
    if need_teacher and (cfg.mode is not None or cfg.init_from_teacher) and not cfg.teacher:
        raise ValueError("model.distill.mode / init_from_teacher need model.distill.teacher (the reference model)")


# ---- losses -------------------------------------------------------------------------------------

def feature_distillation(image, text, teacher_image, teacher_text) -> torch.Tensor:
    """Squared L2 distance between normalised student and teacher embeddings, image plus text."""
    return ((teacher_image - image).square().sum(-1).mean()
            + (teacher_text - text).square().sum(-1).mean())


def soft_cross_entropy(teacher_logits, student_logits) -> torch.Tensor:
    return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean()


def kl_divergence(teacher_logits, student_logits) -> torch.Tensor:
    return F.kl_div(student_logits.log_softmax(dim=1), teacher_logits.softmax(dim=1), reduction="batchmean")


class DistillationLoss(torch.nn.Module):
    """(1 - weight) * base + weight * distillation, around any contrastive loss.

    Call: `loss_fn(image_features, text_features, logit_scale, teacher_image_features,
    teacher_text_features, teacher_logit_scale, **base_inputs)`; `base_inputs` go to the base loss
    (FastCLIP's `sample_index` and `epoch`). output_dict=True returns the two weighted parts,
    {"contrastive_loss", "distill_loss"}, whose sum is the loss (open_clip's convention).
    """

    needs_teacher = True

    def __init__(self, base: torch.nn.Module, mode: str, weight: float = 0.5, local_loss: bool = False,
                 gather_with_grad: bool = True, group=None):
        super().__init__()
        if mode not in DISTILL_MODES:
            raise ValueError(f"distillation mode {mode!r}: use one of {', '.join(DISTILL_MODES)}")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"distillation weight {weight}: need 0 <= weight <= 1")
        self.base, self.mode, self.weight = base, mode, weight
        self.local_loss, self.gather_with_grad, self.group = local_loss, gather_with_grad, group
        self.needs_sample_index = getattr(base, "needs_sample_index", False)

    @property
    def sample_state(self):
        return getattr(self.base, "sample_state", None)

    def _world(self) -> tuple[int, int]:
        if self.group is None or not dist.is_initialized():
            return 1, 0
        return dist.get_world_size(self.group), dist.get_rank(self.group)

    def _gather(self, tensor, with_grad: bool):
        world, _ = self._world()
        if world == 1:
            return tensor
        if not with_grad:
            return all_gather_keep_local_grad(tensor.detach(), self.group)
        gather = all_gather_with_grad if self.gather_with_grad else all_gather_keep_local_grad
        return gather(tensor, self.group)

    def _logits(self, rows_a, rows_b, all_a, all_b, scale):
        """(a -> b logits, b -> a logits): local rows against all columns, or all against all."""
        if self.local_loss:
            return scale * rows_a @ all_b.T, scale * rows_b @ all_a.T
        per_a = scale * all_a @ all_b.T
        return per_a, per_a.T

    def distillation(self, image, text, teacher_image, teacher_text, logit_scale, teacher_logit_scale):
        if self.mode == "feature":
            return feature_distillation(image, text, teacher_image, teacher_text)
        all_image, all_text = self._gather(image, True), self._gather(text, True)
        all_t_image, all_t_text = self._gather(teacher_image, False), self._gather(teacher_text, False)
        if self.mode == "interactive":
            rank = self._world()[1]
            image_vs_teacher_text, _ = self._logits(image, teacher_text, all_image, all_t_text, logit_scale)
            _, text_vs_teacher_image = self._logits(teacher_image, text, all_t_image, all_text, logit_scale)
            rows = image_vs_teacher_text.shape[0]
            labels = torch.arange(rows, device=image.device) + (rank * rows if self.local_loss else 0)
            return (F.cross_entropy(image_vs_teacher_text, labels) + F.cross_entropy(text_vs_teacher_image, labels)) / 2
        student = self._logits(image, text, all_image, all_text, logit_scale)
        teacher = self._logits(teacher_image, teacher_text, all_t_image, all_t_text, teacher_logit_scale)
        fn = soft_cross_entropy if self.mode == "cross_entropy" else kl_divergence
        return (fn(teacher[0], student[0]) + fn(teacher[1], student[1])) / 2

    def forward(self, image_features, text_features, logit_scale, teacher_image_features, teacher_text_features,
                teacher_logit_scale, output_dict: bool = False, **base_inputs):
        contrastive = self.base(image_features, text_features, logit_scale, **base_inputs)
        distill = self.distillation(image_features, text_features, teacher_image_features.detach(),
                                    teacher_text_features.detach(), logit_scale,
                                    torch.as_tensor(teacher_logit_scale).detach())
        parts = {"contrastive_loss": (1 - self.weight) * contrastive, "distill_loss": self.weight * distill}
        return parts if output_dict else parts["contrastive_loss"] + parts["distill_loss"]


# ---- the frozen teacher -------------------------------------------------------------------------

def freeze_teacher_(teacher: torch.nn.Module) -> torch.nn.Module:
    """Evaluation mode, no gradients: the reference model is never trained."""
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


@torch.no_grad()
def teacher_outputs(teacher: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> dict:
    """The teacher's normalised features and scale, as the distillation loss takes them.

    The teacher is any CLIPModel this project builds, at the student's TP (its features are
    replicated over TP like the student's); it must read the same images and tokens.
    """
    image, text, scale = teacher(images, tokens)
    return {"teacher_image_features": image, "teacher_text_features": text, "teacher_logit_scale": scale}


# ---- init from the teacher ----------------------------------------------------------------------

@dataclass
class InitReport:
    copied: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # name, student, teacher
    missing_in_teacher: list[str] = field(default_factory=list)
    unused_teacher: list[str] = field(default_factory=list)

    def summary(self) -> str:
        total = len(self.copied) + len(self.shape_mismatch) + len(self.missing_in_teacher)
        lines = [f"init from teacher: copied {len(self.copied)} of {total} parameters"]
        for name, student, teacher in self.shape_mismatch:
            lines.append(f"  left out {name}: student {tuple(student)}, teacher {tuple(teacher)}")
        for name in self.missing_in_teacher:
            lines.append(f"  left out {name}: not in the teacher")
        if self.unused_teacher:
            lines.append(f"  teacher parameters with no student counterpart: {', '.join(self.unused_teacher)}")
        return "\n".join(lines)


def _full_shape(param: torch.nn.Parameter, tp_size: int) -> tuple:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return tuple(shape)


@torch.no_grad()
def init_from_teacher(student: torch.nn.Module, teacher_state: dict, tp_rank: int = 0, tp_size: int = 1,
                      name_map=None) -> InitReport:
    """Copy every student parameter whose name and full (TP=1) shape match the teacher's.

    `teacher_state` is the teacher's full state dict (TP=1 layout: a converter's output or
    `gather_full_state_dict` of a teacher); the student may be TP-sharded: shapes are compared at
    TP=1 and the teacher tensor is cut into this rank's shard along the parameter's partition dim.
    A vocab-parallel embedding whose rows differ only by TP padding is trimmed or zero-padded.
    `name_map(student_name) -> teacher key` handles other layouts (a pipeline stage's local layer
    numbers, say). Nothing is copied where shapes differ (patch embedding and positions when the
    patch size or resolution differ); the report lists what was left out.
    """
    name_map = name_map or (lambda name: name)
    vocab_params = {id(m.weight) for m in student.modules() if isinstance(m, VocabParallelEmbedding)}
    report = InitReport()
    used = set()
    for name, param in student.named_parameters():
        key = name_map(name)
        if key not in teacher_state:
            report.missing_in_teacher.append(name)
            continue
        used.add(key)
        source = teacher_state[key]
        full = _full_shape(param, tp_size)
        tensor_parallel = getattr(param, "tensor_model_parallel", False)
        if tuple(source.shape) != full and tensor_parallel and id(param) in vocab_params:
            dim = param.partition_dim
            same_elsewhere = all(a == b for i, (a, b) in enumerate(zip(source.shape, full)) if i != dim)
            if same_elsewhere and source.dim() == len(full):
                source = _resize(source, dim, full[dim])
        if tuple(source.shape) != full:
            report.shape_mismatch.append((name, full, tuple(source.shape)))
            continue
        if tensor_parallel and tp_size > 1:
            source = source.chunk(tp_size, dim=param.partition_dim)[tp_rank]
        param.copy_(source.to(dtype=param.dtype, device=param.device))
        report.copied.append(name)
    report.unused_teacher = sorted(k for k in teacher_state if k not in used and isinstance(teacher_state[k], torch.Tensor))
    return report


def _resize(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if tensor.shape[dim] >= size:
        return tensor.narrow(dim, 0, size)
    pad = list(tensor.shape)
    pad[dim] = size - tensor.shape[dim]
    return torch.cat([tensor, tensor.new_zeros(pad)], dim=dim)
