"""The global DiT family: embedding data, the flow-matching DiT, its loss, sampling and evaluation
from one `DiTExperimentConfig`, registered with the engine as `DIT` (see `engine.family`)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from engine.family import ModelFamily, TrainingParts
from engine.layout import check_divides
from engine.precision import PrecisionPlan
from models.common.attention import announce_attention_backend
from models.dit.config import DiTConfig, DiTExperimentConfig, model_problems
from models.dit.data import EmbeddingLoader, TargetSpec
from models.dit.embeddings import EmbeddingDataError, EmbeddingSet, read_json
from models.dit.evaluation import DiTEvaluator
from models.dit.flops import training_flops_per_sample
from models.dit.flow import (
    FlowPath,
    NoiseSource,
    contrastive_loss,
    cosine,
    draw_flow_batch,
    quality,
    velocity_loss,
)
from models.dit.model import GlobalDiT, count_parameters
from parallel.p2p import StageLink

log = logging.getLogger("engine")
CARRIED = ("x1", "x_t", "t", "u")  # flow quantities the first stage sends along with the hidden states


@dataclass
class DiTData:
    train: EmbeddingSet
    eval: EmbeddingSet | None
    target: TargetSpec


def target_spec(cfg) -> TargetSpec:
    return TargetSpec(cfg.data.target, cfg.data.normalize_target, cfg.data.target_scale)


def _demo_dirs(cfg, ctx) -> tuple[str, str]:
    """Rank 0 prepares the demo data in a child process; the others wait for its READY file."""
    from models.dit import demo

    record = demo.ready(cfg.data.demo)
    if record is None:
        failed = os.path.join(cfg.data.demo.out_dir, "FAILED")
        if ctx.rank == 0 and os.path.exists(failed):
            os.remove(failed)
        dist.barrier()
        if ctx.rank == 0:
            device = "cuda" if ctx.device.type == "cuda" else "cpu"
            demo.prepare_in_subprocess(cfg.data.demo, device)
            record = demo.ready(cfg.data.demo)
            if record is None:
                raise RuntimeError(f"the demo preparation finished without {cfg.data.demo.out_dir}/READY.json")
        else:
            record = demo.wait_for_ready(cfg.data.demo)
    return record["train_dir"], record["eval_dir"]


def prepare_data(cfg, ctx) -> DiTData:
    train_dir, eval_dir = cfg.data.train_dir, cfg.data.eval_dir
    if train_dir is None:
        train_dir, eval_dir = _demo_dirs(cfg, ctx)
        cfg.data.train_dir, cfg.data.eval_dir = train_dir, eval_dir  # the saved config names them
    train = EmbeddingSet(train_dir, verify_checksums=cfg.data.verify_checksums)
    evaluation = EmbeddingSet(eval_dir, verify_checksums=cfg.data.verify_checksums) if eval_dir else None
    problems = data_problems(cfg, train.manifest, "data.train_dir") + (
        data_problems(cfg, evaluation.manifest, "data.eval_dir") if evaluation is not None else [])
    if problems:
        raise EmbeddingDataError("\n".join(problems))
    return DiTData(train, evaluation, target_spec(cfg))


def data_problems(cfg, manifest: dict, key: str) -> list[str]:
    """The model config against what an extraction holds (each problem names the key to change)."""
    model, tensors, problems = cfg.model, manifest["tensors"], []
    cond_shape = tensors["condition"]["shape"]
    if list(manifest["condition_grid"]) != list(model.condition_grid):
        problems.append(f"{key}: conditioning patch grid {manifest['condition_grid']}, model.condition_grid="
                        f"{list(model.condition_grid)}")
    if cond_shape[-1] != model.condition_dim:
        problems.append(f"{key}: conditioning features of width {cond_shape[-1]}, model.condition_dim={model.condition_dim}")
    if tensors["target_embedding"]["shape"][-1] != model.output_dim:
        problems.append(f"{key}: target embeddings of width {tensors['target_embedding']['shape'][-1]}, "
                        f"model.output_dim={model.output_dim}")
    if model.init_projection_from_target and key == "data.train_dir":
        width = tensors["target_patches"]["shape"][-1]
        if width != model.clip_width:
            problems.append(f"{key}: the target tower is {width} wide and model.init_projection_from_target=true needs "
                            f"model.clip_width={width} (got {model.clip_width})")
    return problems


def build_model(cfg, ctx, precision: PrecisionPlan) -> GlobalDiT:
    model = GlobalDiT(cfg.model, use_cpu_initialization=ctx.device.type == "cpu",
                      sequence_parallel=cfg.parallel.sequence_parallel,
                      **precision.transformer_overrides()).to(ctx.device)
    model.to(precision.params_dtype)  # everything outside the megatron block follows the block's dtype
    announce_attention_backend(model.attention_backend, ctx.device)
    if ctx.is_logging_rank:
        log.info("DiT model: %.2fM parameters on this rank (%d layers x %d, %d heads, %d conditioning tokens of "
                 "width %d, output %d)", count_parameters(model) / 1e6, cfg.model.num_layers, cfg.model.hidden_size,
                 cfg.model.num_attention_heads, cfg.model.num_patches, cfg.model.condition_dim, cfg.model.output_dim)
    return model


def init_projection(model: GlobalDiT, data: EmbeddingSet) -> bool:
    """The CLIP projection from the target tower's visual projection (replicated: every rank alike)."""
    weight = data.projection()
    if weight is None or not model.post_process:
        return False
    if tuple(weight.shape) != tuple(model.projection.weight.shape):
        raise EmbeddingDataError(f"{data.directory}: the target projection is {tuple(weight.shape)}, the model's "
                                 f"{tuple(model.projection.weight.shape)} (model.clip_width, model.output_dim)")
    with torch.no_grad():
        model.projection.weight.copy_(weight.to(model.projection.weight))
    return True


def dit_forward_step(flow, path: FlowPath, noise: NoiseSource | None, dp_group, device, model, batch, inputs=None):
    """One micro-batch through this pipeline stage (see `engine.schedules`): the loss on the last
    stage, the message for the next stage elsewhere. The first stage draws t, the noise and the
    condition dropout (`noise`), and sends x1, x_t, t and the target velocity with its hidden states."""
    info = {"samples": 0, "tokens": 0}
    if model.pre_process:
        condition, x1 = batch["condition"].to(device, non_blocking=True), batch["target"].to(device, non_blocking=True)
        fb = draw_flow_batch(x1, path, noise.generator(), timestep_sampling=flow.timestep_sampling,
                             logit_normal_mean=flow.logit_normal_mean, logit_normal_std=flow.logit_normal_std,
                             condition_dropout=flow.condition_dropout)
        keep = fb.keep_condition if flow.condition_dropout > 0 else None
        out = model.stage_forward(condition=condition, x_t=fb.x_t, t=fb.t, keep_condition=keep)
        carried = {"x1": fb.x1, "x_t": fb.x_t, "t": fb.t, "u": fb.u}
        info = {"samples": x1.shape[0], "tokens": x1.shape[0] * model.cfg.seq_length}
    else:
        out = model.stage_forward(inputs=inputs)
        carried = {k: inputs[k].detach() for k in CARRIED}
    if not model.post_process:
        return {**out, **carried}, info
    v = out.float()
    mse = velocity_loss(v, carried["u"])
    x1_hat = path.clean_from_velocity(v, carried["x_t"], carried["t"])
    loss = mse
    if flow.use_contrastive_loss and flow.contrastive_weight > 0:
        loss = loss + flow.contrastive_weight * contrastive_loss(x1_hat, carried["x1"], flow.contrastive_temperature,
                                                                 dp_group, flow.gather_with_grad)
    info["metrics"] = {"cosine": cosine(x1_hat.detach(), carried["x1"]), "velocity_mse": mse.detach()}
    return loss, info


def describe_train_metrics(metrics: dict) -> str:
    """The progress line's DiT part: the running cosine of the predicted clean vector to x1 with the
    seed's quality band, and memory per device."""
    from models.dit.memory import memory_per_device

    cos = metrics.get("cosine")
    text = f"cosine {cos:.4f} ({quality(cos)})" if cos is not None else ""
    if "velocity_mse" in metrics:
        text += f" | velocity mse {metrics['velocity_mse']:.4f}"
    return text + f" | {memory_per_device()}"


def build(cfg, ctx, precision: PrecisionPlan) -> TrainingParts:
    """This rank's share of a DiT run."""
    data = prepare_data(cfg, ctx)
    model = build_model(cfg, ctx, precision)
    if cfg.model.init_projection_from_target and init_projection(model, data.train) and ctx.is_logging_rank:
        log.info("CLIP projection initialised from the target tower's visual projection (%s)", data.train.directory)
    flow = cfg.model.flow
    path = FlowPath(flow.sigma_min, flow.sigma_max)
    noise = NoiseSource(cfg.trainer.seed, ctx.dp_rank) if model.pre_process else None
    train_loader = None
    if model.pre_process:
        train_loader = EmbeddingLoader(data.train, data.target, dp_rank=ctx.dp_rank, dp_size=ctx.dims.dp,
                                       batch_size=cfg.trainer.micro_batch_size, seed=cfg.trainer.seed,
                                       shuffle=cfg.data.shuffle)
    eval_fn = None
    if cfg.eval.enabled and data.eval is not None:
        ev = cfg.eval
        eval_fn = DiTEvaluator(model, data.eval, data.target, path=path, sampler=ev.sampler, num_steps=ev.num_steps,
                               guidance_scale=ev.guidance_scale, seed=ev.seed, batch_size=ev.batch_size,
                               max_samples=ev.max_samples, baselines=ev.baselines, train_set=data.train,
                               baseline_fit_samples=ev.baseline_fit_samples, baseline_ridge=ev.baseline_ridge,
                               dp_rank=ctx.dp_rank, dp_size=ctx.dims.dp, dp_group=ctx.dp_group,
                               link=StageLink(ctx.device) if ctx.dims.pp > 1 else None, device=ctx.device)
    return TrainingParts(model=model, forward_step=partial(dit_forward_step, flow, path, noise, ctx.dp_group, ctx.device),
                         train_loader=train_loader, eval_fn=eval_fn,
                         extra_state={"flow_noise": noise} if noise is not None else {},
                         flops_per_sample=training_flops_per_sample(
                             cfg.model, contrastive_batch=cfg.trainer.micro_batch_size * ctx.dims.dp),
                         train_metrics=("cosine", "velocity_mse"), describe_train_metrics=describe_train_metrics)


def preflight(cfg) -> list[str]:
    """Before any process group: the model keys' consistency, and the extraction directories a
    run with user data names (present, complete, shaped for this model)."""
    problems = model_problems(cfg.model)
    for key in ("train_dir", "eval_dir"):
        directory = getattr(cfg.data, key)
        if directory is None:
            continue
        manifest_path = os.path.join(directory, "manifest.json")
        if not os.path.exists(manifest_path):
            problems.append(f"data.{key}={directory}: no manifest.json (an unfinished extraction? rerun "
                            "examples/extract_embeddings.py with the same arguments)")
            continue
        try:
            problems += data_problems(cfg, read_json(manifest_path, "embedding manifest"), f"data.{key}")
        except (EmbeddingDataError, KeyError) as exc:
            problems.append(f"data.{key}: {exc}")
    if cfg.data.train_dir is None and cfg.data.eval_dir is not None:
        problems.append("data.eval_dir is set without data.train_dir (null runs the demo, which makes both)")
    if cfg.data.train_dir is None:
        from models.dit.demo import expected_shapes

        values = {"model.condition_dim": cfg.model.condition_dim, "model.condition_grid": list(cfg.model.condition_grid),
                  "model.clip_width": cfg.model.clip_width, "model.output_dim": cfg.model.output_dim}
        differ = {k: v for k, v in expected_shapes(cfg.data.demo).items() if values[k] != v}
        if differ:
            problems.append("data.train_dir is null, so the run would train on the demo's embeddings, which need "
                            + ", ".join(f"{k}={v}" for k, v in differ.items()) + " (this config has "
                            + ", ".join(f"{k}={values[k]}" for k in differ) + "); give data.train_dir and "
                            "data.eval_dir (directories written by examples/extract_embeddings.py)")
    return problems


def check_layout(cfg, tp: int, pp: int) -> list[str]:
    model, problems = cfg.model, []
    check_divides(problems, "model.num_attention_heads", model.num_attention_heads, "tensor_model_parallel_size", tp)
    check_divides(problems, "model.ffn_hidden_size", model.ffn_hidden_size, "tensor_model_parallel_size", tp)
    check_divides(problems, "model.num_layers", model.num_layers, "pipeline_model_parallel_size", pp)
    return problems


def reference_model(model_cfg: DiTConfig) -> GlobalDiT:
    return GlobalDiT(model_cfg, use_cpu_initialization=True, tensor_model_parallel_size=1,
                     pipeline_model_parallel_size=1)


DIT = ModelFamily(
    name="dit",
    config_cls=DiTExperimentConfig,
    build=build,
    check_layout=check_layout,
    reference_model=reference_model,
    entry_point="examples/pretrain_dit.py",
    preflight=preflight,
    description="global DiT: flow matching from vision patch features to CLIP global embeddings (BLIP3-o)",
)
