"""FlatAdamW's gradient buffer is not zeroed between steps: each parameter's first gradient of a
step is copied into its main_grad, later micro-batches add to it, and a parameter that gets no
gradient in a step counts as zero. Checked against torch's AdamW stepping zeroed (not None)
gradients on a copy of the same model over steps that use both layers, leave one out, and
accumulate two micro-batches (tolerance 1e-6)."""
import copy

import torch

from engine.distributed_optimizer import FlatAdamW


def _losses(model, step):
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(4, 6, generator=gen)
    if step == 1:  # the second layer gets no gradient this step
        return [model[0](x).square().mean()]
    if step == 2:  # two micro-batches accumulate
        return [model[1](model[0](x)).square().mean(), model[1](model[0](x * 2)).abs().mean()]
    return [model[1](model[0](x)).square().mean()]


def test_copied_first_gradient_unused_parameter_and_accumulation(single_rank):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    ref_model = copy.deepcopy(model)
    flat = FlatAdamW(model, None, lr=0.05, weight_decay=0.1, shard=False)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=0.05, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
    for step in range(4):
        flat.zero_grad()
        ref.zero_grad(set_to_none=False)
        for loss in _losses(model, step):
            flat.prepare_backward(last_micro_batch=True)
            loss.backward()
        for loss in _losses(ref_model, step):
            loss.backward()
        flat.step()
        ref.step()
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=lambda m: f"step {step} {name}: {m}")
