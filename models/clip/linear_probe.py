"""Linear-probe accuracy: multinomial logistic regression on frozen image features (CLIP's linear
probe, with torch's L-BFGS instead of scikit-learn's).

The L2 strength is chosen from a small grid on a held-out fifth of the probe's training features
(CLIP sweeps scikit-learn's C the same way), then the probe is refit on all of them. Full batch,
float64, deterministic.
"""
from __future__ import annotations

import torch

L2_GRID = (1e-6, 1e-4, 1e-2)


def fit_logistic_regression(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float,
                            max_iter: int = 200) -> torch.Tensor:
    """Weights [d + 1, classes] (the last row a bias) minimising mean cross-entropy + l2 |W|^2 / 2."""
    x = torch.cat([features.double(), torch.ones(features.shape[0], 1, dtype=torch.float64)], dim=1)
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w, labels) + 0.5 * l2 * w[:-1].square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def predict(weights: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    x = torch.cat([features.double(), torch.ones(features.shape[0], 1, dtype=torch.float64)], dim=1)
    return (x @ weights).argmax(dim=1)


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, grid=L2_GRID) -> dict:
    """{"linear_probe_top1", "linear_probe_l2"}: accuracy on the test features of the probe fit on
    the training ones, with the L2 strength that did best on a held-out fifth of the training set."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    n = train_x.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    held = order[: max(1, n // 5)]
    fit = order[max(1, n // 5):]
    best, best_acc = grid[0], -1.0
    if fit.numel() > 0 and len(grid) > 1:
        for l2 in grid:
            w = fit_logistic_regression(train_x[fit], train_y[fit], num_classes, l2)
            acc = (predict(w, train_x[held]) == train_y[held]).double().mean().item()
            if acc > best_acc:
                best, best_acc = l2, acc
    w = fit_logistic_regression(train_x, train_y, num_classes, best)
    return {"linear_probe_top1": (predict(w, test_x) == test_y).double().mean().item(), "linear_probe_l2": best}
