"""FastCLIP: global contrastive losses with per-sample moving averages (Wei et al. 2024).

What it computes (the reference is Optimization-AI/fast_clip, `src/fast_clip/loss.py`
`FastCLIPLoss` / `FastCLIPLossIndividual` and `src/training/train.py`; no code is taken from it).
Per sample i of the global batch (N = DP x B, unit features, s = 1/tau), with images and with texts
as anchors:

    g_i = 1/(N-1) sum_{j != i} exp(s * (<e_i, f_j> - <e_i, f_i>))
    u_i <- (1 - gamma) u_i + gamma g_i                       (detached; 0, inf or NaN takes g_i)
    loss = 1/2 [mean_local(g / (u + eps)) + mean_global(g / (u~ + eps))]

The first term has this rank's anchors against the whole batch (gradient to the anchors and their
positives), the second every anchor of the batch against this rank's samples (gradient to the
negatives); features are gathered over DP without gradient. Averaged over DP ranks (the engine's
gradient averaging) this is the FastCLIP gradient estimator on the global batch.

Versions (`version`), and the reference's flags they stand for:

| version | reference flags | temperature |
|---|---|---|
| v0 | `--temperature_scheme global_learnable` | global, learned through this loss |
| v1 / gcl | `global_constant` | global, constant |
| v2 / rgcl | `individual_learnable` | tau_i per sample and modality, own update rule (below), in [tau_min, tau_max] |
| v3 / rgcl_g | `global_learnable --multiply_tau` | global; loss = L/s + rho/s + mean(log u)/(2s) |
| sogclr | v1 with `--gamma_schedule constant` | |
| isogclr | v2 with `--gamma_schedule constant` | |

Where this goes beyond the reference:
(a) u (and tau_i with its moment estimates) live in `ShardedSampleState`: sharded over DP by sample
    index instead of a full copy on every rank, and meant to be saved in every checkpoint, so a
    mid-epoch resume is exact (the reference saves them at epoch end only, tau_i per rank).
(b) u is kept as log u and every ratio g/(u+eps) is exp(log-sum-exp - log(u+eps)): nothing
    overflows at tau = 0.01 (s = 100, exponents up to 200), where exp in fp32 does (the reference's
    v2 shifts by a running max for the same reason; in the log domain its bounds are not needed).
(c) The reference's second term keeps the graph of the scale, so the gradient of a global tau is
    counted twice (once per term). Here the second term uses the detached scale, so tau gets the
    gradient of one surrogate; `reference_parity=True` restores the reference's gradients (and, for
    v2, its use of the just-updated tau_i in the second term, where the paper's algorithm uses the
    tau_i of this step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.clip.sample_state import ShardedSampleState
from parallel.collectives import all_gather_into

# version -> (temperature scheme, learnable global tau, multiply_tau, default gamma schedule)
_VERSIONS = {
    "v0": ("global", True, False, "cosine"),
    "v1": ("global", False, False, "cosine"),
    "v2": ("individual", False, False, "cosine"),
    "v3": ("global", True, True, "cosine"),
    "sogclr": ("global", False, False, "constant"),
    "isogclr": ("individual", False, False, "constant"),
}
_ALIASES = {"gcl": "v1", "rgcl": "v2", "rgcl_g": "v3", "fastclip_v0": "v0", "fastclip_v1": "v1",
            "fastclip_v2": "v2", "fastclip_v3": "v3"}
GAMMA_SCHEDULES = ("cosine", "constant")
TAU_SCHEDULES = ("cosine", "const", "step_thresh")


@dataclass
class FastCLIPConfig:
    """FastCLIP settings (`model.loss.*`); names follow the reference's flags.

    Defaults are the reference's (`src/training/params.py`); the seed's run uses version=v3,
    gamma=0.9, gamma_decay_epochs=30, rho=11.0, lr_tau=7.8125e-5, lr_tau_scheduler=step_thresh.
    """

    version: str = "v3"  # v0 | v1 (gcl) | v2 (rgcl) | v3 (rgcl_g) | sogclr | isogclr
    data_size: int = -1  # rows of the dataset (sample indices are < data_size); -1: from the data
    gamma: float = 0.8  # final inner learning rate of the moving averages u
    gamma_schedule: str | None = None  # cosine | constant; None: constant for (i)sogclr, else cosine
    gamma_decay_epochs: int = 10  # epochs over which gamma goes from 1 to `gamma` (cosine)
    rho: float = 8.0  # v2/v3 robustness term
    fastclip_eps: float = 1e-14  # u + eps in the ratios
    temperature: float = 0.07  # initial tau (global: logit_scale = log(1/tau); v2: every tau_i)
    tau_min: float = 0.01
    tau_max: float = 1.0
    lr_tau: float = -1.0  # learning rate of tau; < 0: the model's learning rate (as the reference)
    lr_tau_scheduler: str = "cosine"  # cosine | const | step_thresh (global learnable tau)
    tau_step_thresh: float = 0.03  # step_thresh: lr_tau * tau_step_ratio once tau <= this
    tau_step_ratio: float = 1.0 / 3.0
    # v2's per-sample tau update (the reference passes the model optimizer's Adam betas and eps;
    # open_clip's ViT defaults are 0.9, 0.98, 1e-6) and its gradient clamp (5 in the reference).
    tau_beta1: float = 0.9
    tau_beta2: float = 0.98
    tau_eps: float = 1e-6
    tau_grad_clamp: float = 5.0
    reference_parity: bool = False  # reproduce the reference's double-counted tau gradient (see module doc)


@dataclass(frozen=True)
class FastCLIPVersion:
    name: str
    temperature_scheme: str  # global | individual
    learnable_tau: bool  # the model's global logit_scale trains (v0, v3)
    multiply_tau: bool
    gamma_schedule: str


def resolve_version(cfg: FastCLIPConfig) -> FastCLIPVersion:
    name = _ALIASES.get(cfg.version, cfg.version)
    if name not in _VERSIONS:
        choices = sorted(_VERSIONS) + sorted(_ALIASES)
        raise ValueError(f"model.loss.version={cfg.version!r}: choose one of {', '.join(choices)}")
    scheme, learnable, multiply, schedule = _VERSIONS[name]
    if cfg.gamma_schedule is not None:
        if cfg.gamma_schedule not in GAMMA_SCHEDULES:
            raise ValueError(f"model.loss.gamma_schedule={cfg.gamma_schedule!r}: use one of {GAMMA_SCHEDULES}")
        if name in ("sogclr", "isogclr") and cfg.gamma_schedule != "constant":
            raise ValueError(f"model.loss.version={name} means a constant gamma; drop "
                             f"gamma_schedule={cfg.gamma_schedule!r} or use version={'v1' if name == 'sogclr' else 'v2'}")
        schedule = cfg.gamma_schedule
    if schedule == "cosine" and cfg.gamma_decay_epochs <= 0:
        raise ValueError("model.loss.gamma_schedule=cosine needs gamma_decay_epochs >= 1")
    if not 0.0 < cfg.gamma <= 1.0:
        raise ValueError(f"model.loss.gamma={cfg.gamma}: need 0 < gamma <= 1")
    if not 0.0 < cfg.tau_min <= cfg.temperature <= cfg.tau_max:
        raise ValueError(f"model.loss.temperature={cfg.temperature} must lie in [tau_min={cfg.tau_min}, "
                         f"tau_max={cfg.tau_max}] with tau_min > 0")
    if cfg.lr_tau_scheduler not in TAU_SCHEDULES:
        raise ValueError(f"model.loss.lr_tau_scheduler={cfg.lr_tau_scheduler!r}: use one of {TAU_SCHEDULES}")
    return FastCLIPVersion(name, scheme, learnable, multiply, schedule)


# ---- schedules --------------------------------------------------------------------------------

def gamma_at(epoch: int, cfg: FastCLIPConfig) -> float:
    """gamma for `epoch` (0-based), set once per epoch as the reference's `adjust_gamma`.

    1 in the first epoch; then cosine from 1 down to `gamma` over `gamma_decay_epochs` (or `gamma`
    at once with the constant schedule); `gamma` from epoch `gamma_decay_epochs` on.
    """
    schedule = resolve_version(cfg).gamma_schedule
    if epoch <= 0:
        return 1.0
    if schedule == "constant" or epoch >= cfg.gamma_decay_epochs:
        return cfg.gamma
    return 0.5 * (1 + math.cos(math.pi * epoch / cfg.gamma_decay_epochs)) * (1 - cfg.gamma) + cfg.gamma


def epoch_at(samples_seen: int, samples_per_epoch: int) -> int:
    """The epoch a step-based run is in, from the samples consumed so far."""
    if samples_per_epoch <= 0:
        raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
    return samples_seen // samples_per_epoch


def temperature_lr(step: int, cfg: FastCLIPConfig, lr_tau: float, tau: float, warmup_steps: int = 0,
                   total_steps: int = 1) -> float:
    """Learning rate of the global temperature's parameter group at `step` (v0, v3).

    The reference's three schedules (`src/training/scheduler.py`): cosine with the model's linear
    warmup, decaying to 0 at `total_steps`; const; step_thresh, lr_tau * tau_step_ratio once the
    current tau <= tau_step_thresh (no warmup for const and step_thresh, as the reference).
    """
    if cfg.lr_tau_scheduler == "const":
        return lr_tau
    if cfg.lr_tau_scheduler == "step_thresh":
        return lr_tau * cfg.tau_step_ratio if tau <= cfg.tau_step_thresh else lr_tau
    if step < warmup_steps:
        return lr_tau * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / span)) * lr_tau


def resolve_lr_tau(cfg: FastCLIPConfig, model_lr: float) -> float:
    return model_lr if cfg.lr_tau < 0 else cfg.lr_tau


@torch.no_grad()
def clamp_logit_scale_(logit_scale: torch.nn.Parameter, cfg: FastCLIPConfig) -> None:
    """Keep tau = exp(-logit_scale) in [tau_min, tau_max] (after each optimizer step, as the reference)."""
    logit_scale.clamp_(math.log(1.0 / cfg.tau_max), math.log(1.0 / cfg.tau_min))


@torch.no_grad()
def init_logit_scale_(logit_scale: torch.nn.Parameter, cfg: FastCLIPConfig) -> None:
    """Set the global temperature to `temperature`, and freeze it unless the version learns it."""
    logit_scale.fill_(math.log(1.0 / cfg.temperature))
    logit_scale.requires_grad_(resolve_version(cfg).learnable_tau)


# ---- the loss ---------------------------------------------------------------------------------

def _gather_rows(tensor: torch.Tensor, group, world: int) -> torch.Tensor:
    """All ranks' rows, rank order, without gradient."""
    tensor = tensor.detach().contiguous()
    if world == 1:
        return tensor
    out = torch.empty((world * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    all_gather_into(out, tensor, group=group)
    return out


def moving_log_average(log_u: torch.Tensor, log_g: torch.Tensor, gamma: float) -> torch.Tensor:
    """log((1 - gamma) u + gamma g), with g wherever u is 0, inf or NaN (never seen or broken)."""
    if gamma >= 1.0:
        new = log_g.clone()
    else:
        new = torch.logaddexp(log_u + math.log1p(-gamma), log_g + math.log(gamma))
    return torch.where(torch.isfinite(log_u), new, log_g)


class FastCLIPLoss(torch.nn.Module):
    """FastCLIP loss over the DP group, with its per-sample state (`sample_state`).

    Call: `loss_fn(image_features, text_features, logit_scale, sample_index, epoch)`
    - image_features, text_features: [B, d] L2-normalised, this DP rank's micro-batch (equal B on
      every rank);
    - logit_scale: the global scale s = 1/tau (0-dim tensor; ignored by v2, which keeps tau_i);
    - sample_index: [B] int, each sample's dataset row (from its shard key), < data_size;
    - epoch: 0-based, for gamma (and v2's moment schedule);
    - output_dict=True returns {"contrastive_loss": loss}.
    Every call updates the moving averages of the global batch's samples: call it once per
    micro-batch, in training only. `last_metrics` holds gamma (and mean tau_i for v2) of the last call.
    """

    needs_sample_index = True

    def __init__(self, cfg: FastCLIPConfig, data_size: int | None = None, group=None, device=None,
                 lr_tau: float | None = None):
        super().__init__()
        self.cfg = cfg
        self.spec = resolve_version(cfg)
        self.group = group
        data_size = cfg.data_size if data_size is None else data_size
        if data_size is None or data_size < 1:
            raise ValueError("FastCLIP needs model.loss.data_size: the number of dataset rows (sample "
                             f"indices must be below it); got {data_size}")
        self.individual = self.spec.temperature_scheme == "individual"
        init = {"log_u_image": -math.inf, "log_u_text": -math.inf}
        if self.individual:
            lr = cfg.lr_tau if lr_tau is None else lr_tau
            if lr is None or lr <= 0:
                raise ValueError("FastCLIP v2 updates tau_i itself and needs model.loss.lr_tau > 0 "
                                 "(or the model's learning rate passed as lr_tau)")
            self.lr_tau = float(lr)
            init.update(tau_image=cfg.temperature, tau_text=cfg.temperature, m_image=0.0, m_text=0.0,
                        v_image=0.0, v_text=0.0)
        self.sample_state = ShardedSampleState(init, data_size, group=group, device=device)
        self.last_metrics: dict = {}

    def _world(self) -> tuple[int, int]:
        return self.sample_state.world, self.sample_state.rank

    def forward(self, image_features, text_features, logit_scale, sample_index, epoch: int,
                output_dict: bool = False):
        world, rank = self._world()
        local_b = image_features.shape[0]
        n = world * local_b
        if n < 2:
            raise ValueError("FastCLIP needs a global batch of at least 2 samples")
        if sample_index.numel() != local_b:
            raise ValueError(f"sample_index has {sample_index.numel()} entries for a micro-batch of {local_b}")
        if not self.individual:
            if logit_scale is None:
                raise ValueError(f"FastCLIP {self.spec.name} needs the global logit_scale")
            logit_scale = torch.as_tensor(logit_scale, dtype=image_features.dtype, device=image_features.device)
        gamma = gamma_at(epoch, self.cfg)
        global_index = self.sample_state.all_gather_index(sample_index)
        old = {k: v.to(image_features.device) for k, v in self.sample_state.gather(global_index).items()}
        both = _gather_rows(torch.cat([image_features, text_features], dim=1), self.group, world)
        all_image, all_text = both.split(image_features.shape[1], dim=1)
        positives = torch.nn.functional.one_hot(torch.arange(local_b, device=both.device) + rank * local_b, n).bool()

        # Term 1: this rank's anchors against the global batch; it also yields the new state.
        sims = {"image": image_features @ all_text.T, "text": text_features @ all_image.T}  # [B, N]
        diag = (image_features * text_features).sum(-1, keepdim=True)
        mean1, new = self._anchor_term(sims, diag, positives, old, logit_scale, gamma, epoch, n)
        everyone = self._share(global_index, new, old, world)
        # Term 2: every anchor of the batch against this rank's samples (sim of anchor i, sample j).
        sims_t = {"image": sims["text"].T, "text": sims["image"].T}  # [N, B]
        diag_all = (all_image * all_text).sum(-1, keepdim=True)
        mean2 = self._other_term(sims_t, diag_all, positives.T, everyone, logit_scale, local_b, n)

        loss = (mean1 + mean2) / 2
        if self.spec.multiply_tau:
            mean_log_u = (new["log_u_image"] + new["log_u_text"]).mean() / 2
            loss = loss / logit_scale.detach() + self.cfg.rho / logit_scale + mean_log_u / logit_scale
        self.last_metrics = {"gamma": gamma}
        if self.individual:
            self.last_metrics["tau_image_mean"] = new["tau_image"].mean().detach()
            self.last_metrics["tau_text_mean"] = new["tau_text"].mean().detach()
        return {"contrastive_loss": loss} if output_dict else loss

    def _anchor_term(self, sims, diag, positives, old, logit_scale, gamma, epoch, n):
        """mean over local anchors of g/(u+eps) (image + text), and the anchors' new state."""
        new, ratio = {}, 0
        for side in ("image", "text"):
            scale = 1.0 / old[f"tau_{side}"][:, None] if self.individual else logit_scale
            diff = ((sims[side] - diag) * scale).masked_fill(positives, -math.inf)
            log_g = torch.logsumexp(diff.detach(), dim=1) - math.log(n - 1)
            new[f"log_u_{side}"] = moving_log_average(old[f"log_u_{side}"], log_g, gamma)
            den = self._log_denominator(new[f"log_u_{side}"])
            ratio = ratio + torch.exp(diff - den[:, None]).sum(1) / (n - 1)
            if self.individual:
                new.update(self._tau_step(side, diff.detach(), positives, den, old, epoch, n))
        return ratio.mean(), new

    def _share(self, global_index, new, old, world) -> dict:
        """All-gather the new state (and the temperatures the second term uses); owners store it."""
        names = list(new)
        extra = []
        if self.individual and not self.cfg.reference_parity:
            extra = ["tau_image", "tau_text"]  # this step's tau_i, before its update (the paper's)
        rows = torch.stack([new[k] for k in names] + [old[k] for k in extra])
        gathered = _gather_rows(rows.T, self.group, world).T  # [k, N]
        everyone = dict(zip(names, gathered[: len(names)]))
        self.sample_state.update(global_index, everyone)
        for i, name in enumerate(extra):
            everyone[f"term2_{name}"] = gathered[len(names) + i]
        return everyone

    def _other_term(self, sims, diag, positives, everyone, logit_scale, local_b, n):
        """mean over all N anchors of (their g restricted to this rank's samples)/(u+eps)."""
        ratio = 0
        for side in ("image", "text"):
            if self.individual:
                tau = everyone[f"tau_{side}" if self.cfg.reference_parity else f"term2_tau_{side}"]
                scale = 1.0 / tau[:, None]
            else:
                scale = logit_scale if self.cfg.reference_parity else logit_scale.detach()
            diff = ((sims[side] - diag) * scale).masked_fill(positives, -math.inf)
            den = self._log_denominator(everyone[f"log_u_{side}"])
            ratio = ratio + torch.exp(diff - den[:, None]).sum(1)
        # The reference's normaliser B (N - 1) / N: averaged over the DP ranks, this term is the
        # global mean of g / (u + eps), as the first.
        return (ratio / (local_b * (n - 1) / n)).mean()

    def _log_denominator(self, log_u: torch.Tensor) -> torch.Tensor:
        """log(u + eps)."""
        if self.cfg.fastclip_eps <= 0:
            return log_u
        return torch.logaddexp(log_u, torch.full_like(log_u, math.log(self.cfg.fastclip_eps)))

    def _tau_step(self, side: str, diff: torch.Tensor, mask: torch.Tensor, log_den: torch.Tensor, old: dict,
                  epoch: int, n: int) -> dict:
        """v2's update of tau_i (the reference's `FastCLIPLossIndividual.local`), in the log domain.

        d/dtau_i [tau_i log g_i + rho tau_i] with u_i for g_i:
            log(u_i + eps) + rho - 1/(N-1) sum_j exp(diff_ij) diff_ij / (u_i + eps),  diff = (sim - diag)/tau_i
        clamped to +-tau_grad_clamp, then an Adam-like step with the reference's choices: moments
        off (beta 0) in the first epoch, bias correction by the epoch count, and the second moment
        itself (not its square root) in the denominator.
        """
        cfg = self.cfg
        weights = torch.exp(diff - log_den[:, None])
        grad = -(weights * diff.masked_fill(mask, 0.0)).sum(1) / (n - 1) + log_den + cfg.rho
        grad = grad.clamp(-cfg.tau_grad_clamp, cfg.tau_grad_clamp)
        beta1, beta2 = (0.0, 0.0) if epoch <= 0 else (cfg.tau_beta1, cfg.tau_beta2)
        m = beta1 * old[f"m_{side}"] + (1 - beta1) * grad
        v = beta2 * old[f"v_{side}"] + (1 - beta2) * grad.square()
        m_hat = m / (1 - beta1 ** (epoch + 1))
        v_hat = v / (1 - beta2 ** (epoch + 1))
        tau = (old[f"tau_{side}"] - self.lr_tau * m_hat / (v_hat + cfg.tau_eps)).clamp(cfg.tau_min, cfg.tau_max)
        return {f"tau_{side}": tau, f"m_{side}": m, f"v_{side}": v}
