"""The user's plain loop, by hand, in fp64: the reference every rule of the loop is checked against.

One step of the plain loop over a step's samples: the mean loss over all of them, one backward (so the gradient
is the mean gradient of the samples, with no accumulation arithmetic), then, by hand, the skip, the clipping
(``torch.nn.utils.clip_grad_norm_``'s formula: ``min(1, max_norm / (norm + 1e-6))``) and the LR multiplier,
then the optimizer's own ``step()``.
"""

import copy
import math

import torch
import torch.nn.functional as F


class Net(torch.nn.Module):
    def __init__(self, d=5, h=8):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(d, h), torch.nn.Linear(h, 1)
        self.shift = None

    def forward(self, x):
        out = self.fc2(torch.tanh(self.fc1(x))).squeeze(-1)
        return out if self.shift is None else out + self.shift


def dataset(n=64, d=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x.sum(1).sin() + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x.to(dtype), y.to(dtype))


def loss_of(model, x, y):
    return F.mse_loss(model(x), y)


def flat(model):
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def total_norm(grads, norm_type=2.0) -> float:
    """``clip_grad_norm_``'s total norm of ``grads`` (norm types p and inf), by hand."""
    flat_g = torch.cat([g.flatten() for g in grads])
    if math.isinf(norm_type):
        return float(flat_g.abs().max())
    return float(flat_g.abs().pow(norm_type).sum() ** (1 / norm_type))


def clip_(grads, clip) -> None:
    """``clip = (max_norm, norm_type)``: ``clip_grad_norm_``'s formula ``min(1, max_norm / (norm + 1e-6))``; with
    ``norm_type="value"``, ``clip_grad_value_`` (every element into ``[-max_norm, max_norm]``)."""
    max_norm, norm_type = clip
    if norm_type == "value":
        for g in grads:
            g.clamp_(-max_norm, max_norm)
        return
    coef = min(1.0, max_norm / (total_norm(grads, norm_type) + 1e-6))
    for g in grads:
        g.mul_(coef)


def plain_sgd_steps(model, x, y, spans, lr, b0):
    """The plain loop's steps of momentum-free SGD on ``model`` (fp64), one per sample span ``(a, b)`` of ``x, y``,
    each at LR x ``sqrt((b - a) / b0)``."""
    for a, b in spans:
        model.zero_grad()
        loss_of(model, x[a:b].double(), y[a:b].double()).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * math.sqrt((b - a) / b0) * p.grad


def backward_and_step(run, loss, scaler=None, clip=None):
    """One micro-batch of the user's loop after the forward: backward (scaled under AMP), the clip request, the
    optimizer step (through the scaler under AMP), ``zero_grad``. Returns the clip's norm (None without)."""
    (scaler.scale(loss) if scaler else loss).backward()
    norm = run.clip_grad_norm_(*clip) if clip else None
    if scaler:
        scaler.step(run.optimizer)
        scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad()
    return norm


def make_optimizer(params, kind="sgd", lr=0.1):
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=0.01)


class Reference:
    """The plain fp64 loop on a copy of ``model``."""

    def __init__(self, model, kind="sgd", lr=0.1, b0=8, scaling="sqrt", schedule=True):
        self.model = copy.deepcopy(model).double()
        self.opt = make_optimizer(self.model.parameters(), kind, lr)
        self.b0, self.scaling = b0, scaling
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0 / (1 + 0.1 * s) if schedule else 1.0)

    def lr_scale(self, batch):
        r = batch / self.b0
        return math.sqrt(r) if self.scaling == "sqrt" else (r if self.scaling == "linear" else 1.0)

    def mean_grad(self, x, y):
        """The mean gradient over the samples (x, y), per parameter (None for a frozen one)."""
        self.model.zero_grad(set_to_none=True)
        loss_of(self.model, x.double(), y.double()).backward()
        return [None if p.grad is None else p.grad.clone() for p in self.model.parameters()]

    def grad_norm(self, x, y, norm_type=2.0):
        return total_norm([g for g in self.mean_grad(x, y) if g is not None], norm_type)

    def cosine(self, halves):
        """fp64 cosine of the mean gradients of two sample sets."""
        g = [torch.cat([t.flatten() for t in self.mean_grad(x, y) if t is not None]) for x, y in halves]
        self.model.zero_grad(set_to_none=True)
        return float(F.cosine_similarity(g[0], g[1], dim=0))

    def step(self, x, y, skip=False, clip=None):
        """One optimizer step of the plain loop over the step's samples ``x``, ``y``."""
        if skip:
            self.model.zero_grad(set_to_none=True)
            return
        self.mean_grad(x, y)
        self.apply([p.grad for p in self.model.parameters()], len(x), clip)
        self.sched.step()

    def apply(self, grads, batch, clip=None, factor=1.0):
        """The optimizer step on the gradients ``grads`` (one per parameter, None for none) of a step of ``batch``
        samples: clipped by hand (:func:`clip_`), the LR times ``factor`` (a schedule the caller computes) and
        :meth:`lr_scale`, the gradients dropped after."""
        for p, g in zip(self.model.parameters(), grads):
            p.grad = g
        if clip is not None:
            clip_([g for g in grads if g is not None], clip)
        scale = self.lr_scale(batch) * factor
        lrs = [group["lr"] for group in self.opt.param_groups]
        for group in self.opt.param_groups:
            group["lr"] = group["lr"] * scale
        self.opt.step()
        for group, lr in zip(self.opt.param_groups, lrs):
            group["lr"] = lr
        self.model.zero_grad(set_to_none=True)


def first_half(sizes):
    """The micro-steps of the microsteps split's first half: the most nearly equal split of ``sizes`` (ties to the
    fewer)."""
    n, cum, best = sum(sizes), 0, None
    for h in range(1, len(sizes)):
        cum += sizes[h - 1]
        if best is None or abs(2 * cum - n) < best[0]:
            best = (abs(2 * cum - n), h)
    return best[1]


def midpoint_halves(batches):
    """The two sample sets of the microsteps split: the first h micro-batches, h the most nearly equal split."""
    h = first_half([len(b[0]) for b in batches])
    cat = lambda bs: (torch.cat([b[0] for b in bs]), torch.cat([b[1] for b in bs]))  # noqa: E731
    return cat(batches[:h]), cat(batches[h:])


def train_to_budget(run, model, data, budget: int) -> int:
    """The user's loop that ends on a sample budget: ``limit_next_step`` shortens the step that would pass it.
    Returns the samples trained."""
    seen = 0
    for x, y in run.dataloader(data):
        loss_of(model, x, y).backward()
        run.optimizer.step()
        run.optimizer.zero_grad()
        if run.sync_gradients:
            seen = run.history[-1]["samples"]
            if seen >= budget:
                break
            if budget - seen < run.batch_size:
                run.limit_next_step(budget - seen)
    return seen
