"""An independent FastCLIP reference (float64, linear domain, whole global batch at once) and a tiny
feature model, shared by the FastCLIP unit and distributed tests.

The reference is written from the formulas (issue 14 and the FastCLIP paper), not from the code
under test: u is kept as u (not log u), the batch is one [N, N] matrix, and the two terms of the
surrogate are the two gradient paths of g: anchors (and positives) live with the other samples
constant, and the other samples live with the anchors constant.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

D_IN, D_OUT = 12, 8


class TinyFeatures(torch.nn.Module):
    """Two linear encoders and a global logit scale: enough to give the loss real gradients."""

    def __init__(self, seed: int = 0, temperature: float = 0.07, dtype=torch.float32):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.image = torch.nn.Parameter((torch.randn(D_IN, D_OUT, generator=gen) / math.sqrt(D_IN)).to(dtype))
        self.text = torch.nn.Parameter((torch.randn(D_IN, D_OUT, generator=gen) / math.sqrt(D_IN)).to(dtype))
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / temperature), dtype=dtype))

    def forward(self, x_image, x_text):
        return (F.normalize(x_image @ self.image, dim=-1), F.normalize(x_text @ self.text, dim=-1),
                self.logit_scale.exp())


def dataset(data_size: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(data_size, D_IN, generator=gen), torch.randn(data_size, D_IN, generator=gen)


def schedule(data_size: int, global_batch: int, steps: int, seed: int = 2, duplicate: bool = False):
    """(global indices, epoch) per step; batches overlap across steps so samples are revisited."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        idx = torch.randperm(data_size, generator=gen)[:global_batch]
        if duplicate and step == steps - 1:
            idx[-1] = idx[0]  # one index twice in one global batch
        out.append((idx, step))
    return out


def gamma_ref(epoch: int, gamma: float, decay_epochs: int, cosine: bool) -> float:
    if epoch == 0:
        return 1.0
    if not cosine or epoch >= decay_epochs:
        return gamma
    return gamma + (1 - gamma) * (1 + math.cos(math.pi * epoch / decay_epochs)) / 2


class ReferenceFastCLIP:
    """Whole-batch FastCLIP in float64 with the state as full [data_size] arrays."""

    def __init__(self, version: str, data_size: int, cfg):
        self.version, self.cfg = version, cfg
        self.individual = version in ("v2", "isogclr")
        self.multiply_tau = version == "v3"
        self.cosine = version not in ("sogclr", "isogclr")
        zeros = lambda: torch.zeros(data_size, dtype=torch.float64)
        self.u = {"image": zeros(), "text": zeros()}
        self.tau = {"image": zeros() + cfg.temperature, "text": zeros() + cfg.temperature}
        self.m = {"image": zeros(), "text": zeros()}
        self.v = {"image": zeros(), "text": zeros()}

    def step(self, model: TinyFeatures, x_image, x_text, idx, epoch, lr_tau: float = 0.0):
        """Loss value and the gradients of `model` (float64 copy) for one global batch."""
        cfg = self.cfg
        gamma = gamma_ref(epoch, cfg.gamma, cfg.gamma_decay_epochs, self.cosine)
        img, txt, s = model(x_image[idx].double(), x_text[idx].double())
        n = len(idx)
        off = ~torch.eye(n, dtype=torch.bool)
        img_c, txt_c = img.detach(), txt.detach()
        # sims[side][path]: rows are anchors, columns the other modality; path A = anchors live,
        # path C = columns live. Positive similarity: live in A, constant in C.
        sims = {"image": {"A": img @ txt_c.T, "C": img_c @ txt.T},
                "text": {"A": txt @ img_c.T, "C": txt_c @ img.T}}
        pos = {"A": (img * txt).sum(1, keepdim=True), "C": (img_c * txt_c).sum(1, keepdim=True)}

        def g_of(sim, positive, scale):
            return (torch.exp((sim - positive) * scale) * off).sum(1) / (n - 1)

        scale_old = {}
        for side in ("image", "text"):
            scale_old[side] = (1 / self.tau[side][idx])[:, None] if self.individual else s
        u_new, g_val = {}, {}
        for side in ("image", "text"):
            with torch.no_grad():
                g = g_of(sims[side]["A"], pos["A"], scale_old[side])
            u_old = self.u[side][idx]
            bad = (u_old == 0) | torch.isinf(u_old) | torch.isnan(u_old)
            u_new[side] = torch.where(bad, g, (1 - gamma) * u_old + gamma * g)
            g_val[side] = g

        tau_new, m_new, v_new = {}, {}, {}
        if self.individual:
            for side in ("image", "text"):
                with torch.no_grad():
                    d = (sims[side]["A"] - pos["A"]) * scale_old[side]
                    den = u_new[side] + cfg.fastclip_eps
                    grad = (torch.log(den) + cfg.rho
                            - (torch.exp(d) * d * off).sum(1) / (n - 1) / den).clamp(-cfg.tau_grad_clamp,
                                                                                    cfg.tau_grad_clamp)
                    b1, b2 = (0.0, 0.0) if epoch == 0 else (cfg.tau_beta1, cfg.tau_beta2)
                    m = b1 * self.m[side][idx] + (1 - b1) * grad
                    v = b2 * self.v[side][idx] + (1 - b2) * grad ** 2
                    step = (m / (1 - b1 ** (epoch + 1))) / (v / (1 - b2 ** (epoch + 1)) + cfg.tau_eps)
                    tau_new[side] = (self.tau[side][idx] - lr_tau * step).clamp(cfg.tau_min, cfg.tau_max)
                    m_new[side], v_new[side] = m, v

        scale_c = {}
        for side in ("image", "text"):
            if self.individual:
                tau = tau_new[side] if cfg.reference_parity else self.tau[side][idx]
                scale_c[side] = (1 / tau)[:, None]
            else:
                scale_c[side] = s if cfg.reference_parity else s.detach()
        ratio = {"A": 0, "C": 0}
        for path, scales in (("A", scale_old), ("C", scale_c)):
            for side in ("image", "text"):
                g = g_of(sims[side][path], pos[path], scales[side])
                ratio[path] = ratio[path] + g / (u_new[side] + cfg.fastclip_eps)
        value = (ratio["A"].mean() + ratio["C"].mean()) / 2
        if self.multiply_tau:
            value = value / s.detach() + cfg.rho / s + (torch.log(u_new["image"]) + torch.log(u_new["text"])).mean() / 2 / s
        model.zero_grad(set_to_none=True)
        value.backward()
        grads = {name: p.grad.clone() if p.grad is not None else None for name, p in model.named_parameters()}
        # The state: the last occurrence of a repeated index wins.
        for k in range(n):
            i = int(idx[k])
            for side in ("image", "text"):
                self.u[side][i] = u_new[side][k]
                if self.individual:
                    self.tau[side][i] = tau_new[side][k]
                    self.m[side][i] = m_new[side][k]
                    self.v[side][i] = v_new[side][k]
        return value.detach(), grads

    def state(self) -> dict:
        out = {"log_u_image": torch.log(self.u["image"]), "log_u_text": torch.log(self.u["text"])}
        if self.individual:
            for side in ("image", "text"):
                out[f"tau_{side}"] = self.tau[side].clone()
                out[f"m_{side}"] = self.m[side].clone()
                out[f"v_{side}"] = self.v[side].clone()
        return out


def double_copy(model: TinyFeatures) -> TinyFeatures:
    ref = TinyFeatures(dtype=torch.float64)
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    return ref
