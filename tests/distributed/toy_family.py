"""A third model family that exists only in the tests: a regression model on one megatron block whose
first pipeline stage reads the inputs and whose last stage reads the targets (as an LLM's labels),
with a piece of extra checkpoint state sharded over data-parallel ranks. It plugs in exactly as a
real family does (one `ModelFamily`, one registry line), so the engine's seam is tested without CLIP.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.checkpoint import Boxes
from engine.family import ModelFamily, TrainingParts
from engine.layout import check_divides
from engine.schema import ExperimentConfig, TrainerConfig

REGISTRY_ENTRY = "tests.distributed.toy_family:TOY"
IN_FEATURES, SEQ = 8, 5


@dataclass
class ToyModelConfig:
    num_layers: int = 4
    hidden_size: int = 32
    ffn_hidden_size: int = 64
    num_attention_heads: int = 4
    megatron_amp_O2: bool = False


@dataclass
class ToyDataConfig:
    seed: int = 7


@dataclass
class ToyEvalConfig:
    enabled: bool = True


@dataclass
class ToyExperimentConfig(ExperimentConfig):
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(output_dir="runs/toy"))
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    data: ToyDataConfig = field(default_factory=ToyDataConfig)
    eval: ToyEvalConfig = field(default_factory=ToyEvalConfig)


class ToyLoader:
    """Deterministic batches per (seed, DP rank, index), resumable at any index."""

    def __init__(self, seed: int, dp_rank: int, batch_size: int):
        self.seed, self.dp_rank, self.batch_size, self.index = seed, dp_rank, batch_size, 0

    def __iter__(self):
        while True:
            gen = torch.Generator().manual_seed(self.seed * 100003 + self.dp_rank * 1009 + self.index)
            self.index += 1
            x = torch.randn(self.batch_size, SEQ, IN_FEATURES, generator=gen)
            yield {"x": x, "y": x.sum(dim=-1) / 3 + 0.1 * torch.randn(self.batch_size, SEQ, generator=gen)}

    def state_dict(self) -> dict:
        return {"index": self.index, "dp_rank": self.dp_rank}

    def load_state_dict(self, state: dict) -> bool:
        self.index = state["index"]
        return state["dp_rank"] == self.dp_rank


class SamplesPerReplica:
    """Extra checkpoint state: how many samples each DP replica's loss saw, one entry per replica
    of a global [DP] tensor (this rank holds its own entry)."""

    def __init__(self, dp_rank: int, dp_size: int):
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.count = torch.zeros(1, dtype=torch.float64)

    def state_dict(self) -> dict:
        return {"count": Boxes((self.dp_size,), [((self.dp_rank,), self.count)]), "dp_size": self.dp_size}

    def load_state_dict(self, state: dict) -> None:
        assert state["dp_size"] == self.dp_size


class Regressor(torch.nn.Module):
    def __init__(self, cfg: ToyModelConfig, tp: int, pp: int, pre_process: bool, post_process: bool):
        super().__init__()
        from models.common.spec import transformer_layer_spec
        from models.common.stage import build_block
        from models.common.transformer_config import make_transformer_config

        config = make_transformer_config(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                                         ffn_hidden_size=cfg.ffn_hidden_size, num_attention_heads=cfg.num_attention_heads,
                                         tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        self.pre_process, self.post_process = pre_process, post_process
        self.embed = torch.nn.Linear(IN_FEATURES, cfg.hidden_size) if pre_process else None
        self.block = build_block(config, transformer_layer_spec("sdpa", causal=True), post_process=post_process)
        self.head = torch.nn.Linear(cfg.hidden_size, 1) if post_process else None


def _stage_flags():
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return True, True
    return parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()


def forward_step(counter, model, batch, inputs):
    x = model.embed(batch["x"]).transpose(0, 1).contiguous() if model.pre_process else inputs["hidden"]
    x = model.block(x, attention_mask=None)
    info = {"samples": batch["x"].shape[0] if model.pre_process else 0, "tokens": 0}
    if not model.post_process:
        return {"hidden": x}, info
    counter.count += batch["y"].shape[0]
    return torch.nn.functional.mse_loss(model.head(x).squeeze(-1).transpose(0, 1), batch["y"]), info


def build(cfg, ctx, precision) -> TrainingParts:
    from functools import partial

    first, last = _stage_flags()
    model = Regressor(cfg.model, ctx.dims.tp, ctx.dims.pp, first, last).to(ctx.device)
    counter = SamplesPerReplica(ctx.dp_rank, ctx.dims.dp)
    loader = ToyLoader(cfg.data.seed, ctx.dp_rank, cfg.trainer.micro_batch_size) if first or last else None

    def evaluate(step: int) -> dict:  # samples counted by all replicas, the same on every rank
        total = torch.tensor([float(counter.count.item()) if last else 0.0], dtype=torch.float64)
        torch.distributed.all_reduce(total)
        return {"samples_counted": total.item() / ctx.dims.tp}

    # Only the last stage counts, so only it holds the state: replicated boxes must be identical.
    return TrainingParts(model=model, forward_step=partial(forward_step, counter), train_loader=loader,
                         eval_fn=evaluate if cfg.eval.enabled else None,
                         extra_state={"samples": counter} if last else {},
                         summary=lambda: {"toy_counter": evaluate(-1)["samples_counted"]})


def check_layout(cfg, tp: int, pp: int) -> list[str]:
    problems = []
    check_divides(problems, "model.num_attention_heads", cfg.model.num_attention_heads, "tensor_model_parallel_size", tp)
    check_divides(problems, "model.ffn_hidden_size", cfg.model.ffn_hidden_size, "tensor_model_parallel_size", tp)
    check_divides(problems, "model.num_layers", cfg.model.num_layers, "pipeline_model_parallel_size", pp)
    return problems


TOY = ModelFamily(
    name="toy",
    config_cls=ToyExperimentConfig,
    build=build,
    check_layout=check_layout,
    reference_model=lambda model_cfg: Regressor(model_cfg, 1, 1, True, True),
    entry_point="tests/distributed/toy_family.py",
    description="a regression model on one megatron block (tests only)",
)


def register() -> None:
    import models.registry

    models.registry.FAMILIES["toy"] = REGISTRY_ENTRY
