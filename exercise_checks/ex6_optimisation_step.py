"""Exercise 6 (train.py): optimisation_step: zero, backpropagate, clip the total norm, step, through
the GradScaler."""
import types

import torch

from .common import CheckFailed, close, expect, largest_difference, load


def fake_run(models, scaler, lr, grad_clip):
    """Just what optimisation_step reads from a training run."""
    return types.SimpleNamespace(
        optimizers=[torch.optim.SGD(model.parameters(), lr=lr) for model in models], scaler=scaler,
        trainable_parameters=[p for model in models for p in model.parameters()],
        args=types.SimpleNamespace(grad_clip=grad_clip))


def clip_by_total_norm(grads, max_norm):
    """What clip_grad_norm_ does: scale every gradient by max_norm / (total norm), if that is below 1."""
    total = sum(float((g.double() ** 2).sum()) for g in grads) ** 0.5
    return [g * min(1.0, max_norm / (total + 1e-6)) for g in grads]


def sgd_update(params, grads, lr):
    return [p.detach() - lr * g for p, g in zip(params, grads)]


class ScalingScaler:
    """Behaves like a float16 GradScaler at scale 1024: the loss is scaled, the gradients must be
    unscaled before clipping, steps and update go through it. Records what it is asked to do."""

    factor = 1024.0

    def __init__(self):
        self.events, self.unscaled = [], set()

    def scale(self, loss):
        self.events.append("scale")
        return loss * self.factor

    def _unscale(self, optimizer):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(self.factor)
        self.unscaled.add(id(optimizer))

    def unscale_(self, optimizer):
        self.events.append("unscale_")
        expect(id(optimizer) not in self.unscaled, "run.scaler.unscale_ was called twice for one optimiser")
        self._unscale(optimizer)

    def step(self, optimizer):
        self.events.append("step")
        if id(optimizer) not in self.unscaled:  # like GradScaler.step, which unscales if you did not
            self._unscale(optimizer)
        optimizer.step()

    def update(self):
        self.events.append("update")
        self.unscaled.clear()


def two_linear_models():
    return torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)


def expect_clipped_update(train):
    """Large gradients, stale ones left in .grad: the step must zero, backpropagate, clip the total norm, step both."""
    a, b = two_linear_models()
    x = torch.randn(5, 3)  # (examples, inputs)
    loss_fn = lambda: ((a(x) - 10) ** 2).mean() + ((b(x) + 10) ** 2).mean()  # gradient norm far above 1
    params = [p for model in (a, b) for p in model.parameters()]
    grads = torch.autograd.grad(loss_fn(), params)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, 100.0)  # stale gradients from an earlier batch
    run = fake_run((a, b), torch.amp.GradScaler("cpu", enabled=False), lr=0.1, grad_clip=1.0)
    train.optimisation_step(run, loss_fn())

    after = [p.detach() for p in params]
    changed = [not torch.equal(x, y) for x, y in zip(before, after)]
    expect(any(changed), "no parameter changed: step every optimiser in run.optimizers")
    expect(all(changed[2:]), "the parameters of run.optimizers[1] did not change: step every optimiser")
    expect(all(changed[:2]), "the parameters of run.optimizers[0] did not change: step every optimiser")

    def moved_like(step_grads):
        return all(close(p, q, 1e-5) for p, q in zip(after, sgd_update(before, step_grads, 0.1)))

    if moved_like(clip_by_total_norm(grads, 1.0)):
        return
    stale = [g + 100.0 for g in grads]
    expect(not moved_like(grads), "the update used unclipped gradients: clip them to run.args.grad_clip = 1.0 "
                                  "(clip_grad_norm_ over run.trainable_parameters) before stepping")
    expect(not moved_like(clip_by_total_norm(stale, 1.0)), "old gradients were added to the new ones: "
                                                           "zero every optimiser's gradients before backward")
    expect(not moved_like(clip_by_total_norm(grads[:2], 1.0) + clip_by_total_norm(grads[2:], 1.0)),
           "clip once over all of run.trainable_parameters (one total norm), not per optimiser")
    wanted = sgd_update(before, clip_by_total_norm(grads, 1.0), 0.1)
    raise CheckFailed(f"the update differs from -lr x the clipped gradient (largest difference "
                      f"{max(largest_difference(p, q) for p, q in zip(after, wanted)):.3g})")


def expect_scaler_used(train):
    """With a scaling GradScaler: scale the loss, unscale before clipping, step and update through it."""
    a, b = two_linear_models()
    x, y = torch.randn(5, 3), torch.randn(5, 1)  # (examples, inputs), (examples, 1)
    loss_fn = lambda: 0.01 * (((a(x) - y) ** 2).mean() + ((b(x) - y) ** 2).mean())  # gradient norm below the clip
    params = [p for model in (a, b) for p in model.parameters()]
    grads = torch.autograd.grad(loss_fn(), params)
    before = [p.detach().clone() for p in params]
    scaler = ScalingScaler()
    run = fake_run((a, b), scaler, lr=0.1, grad_clip=1.0)
    train.optimisation_step(run, loss_fn())

    events = scaler.events
    expect("scale" in events, "the loss was not scaled: backpropagate run.scaler.scale(loss) (mixed precision)")
    expect(events.count("step") == 2, "step each optimiser through run.scaler.step(optimizer), "
                                      "which skips steps with inf/NaN gradients")
    expect(events.count("update") == 1 and events[-1] == "update",
           "call run.scaler.update() once, after the optimiser steps")
    expect(events.count("unscale_") == 2, "call run.scaler.unscale_(optimizer) for every optimiser before "
                                          "clipping, so the clip sees the true gradients")
    wanted = sgd_update(before, grads, 0.1)  # norm below the clip: the true gradient, unclipped
    expect(all(close(p.detach(), q, 1e-5) for p, q in zip(params, wanted)),
           "with a scaling GradScaler the update is wrong: unscale_ every optimiser before clip_grad_norm_")


def check(folder):
    train = load(folder, "train")
    expect_clipped_update(train)
    expect_scaler_used(train)

    model = torch.nn.Linear(4, 1)
    x = torch.randn(32, 4)  # (examples, inputs)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])  # (examples, 1): a linear target the model can fit
    run = fake_run([model], torch.amp.GradScaler("cpu", enabled=False), lr=0.1, grad_clip=5.0)
    losses = []
    for _ in range(40):
        loss = ((model(x) - y) ** 2).mean()
        train.optimisation_step(run, loss)
        losses.append(float(loss))
    expect(losses[-1] < 0.25 * losses[0],
           f"a tiny training run with optimisation_step did not lower the loss ({losses[0]:.3f} -> {losses[-1]:.3f})")
