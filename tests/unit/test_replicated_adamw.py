"""The replicated AdamW (engine/optim.py) runs torch's fused kernel: the same updates as torch's
per-tensor AdamW (tolerance 1e-6: the fused kernel orders the same float operations differently),
and checkpoint step counters where the fused kernel wants them."""
import torch

from engine.optim import ReplicatedAdamW
from engine.schema import OptimConfig


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))


def test_fused_updates_match_torch_per_tensor_adamw(single_rank):
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    model, reference = _model(), _model()
    opt = ReplicatedAdamW(model, cfg, dp_group=None, max_grad_norm=0.0)
    assert opt.optimizer.defaults["fused"] is True
    ref_opt = torch.optim.AdamW([
        {"params": [p for p in reference.parameters() if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in reference.parameters() if p.ndim < 2], "weight_decay": 0.0}],
        lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=False)
    for step in range(3):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        ref_opt.zero_grad()
        model(x).square().mean().backward()
        reference(x).square().mean().backward()
        opt.step()
        ref_opt.step()
    for got, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert opt.checkpoint_step == 3


def test_checkpoint_step_counters_suit_the_fused_kernel(single_rank):
    model = _model()
    opt = ReplicatedAdamW(model, OptimConfig(), dp_group=None, max_grad_norm=1.0)
    for p, _, _views in opt.checkpoint_slices():  # state created before the first step (to load into)
        step = opt.optimizer.state[p]["step"]
        assert step.dtype == torch.float32 and step.device == p.device
    opt.checkpoint_step = 7
    model(torch.randn(2, 16)).sum().backward()
    opt.step()  # the fused kernel accepts the restored counters
    assert opt.checkpoint_step == 8
