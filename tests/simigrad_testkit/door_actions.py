"""What a user varies at each door, drawn by ``hypothesis``, and the user's loop that runs it (``SIMIGRAD=1``).

Each ``*_runs`` strategy draws one run's settings (a dict); each driver runs the door with them on an fp64
:class:`~loop_reference.Net` and returns a :class:`~door_reference.Trace` for :func:`~door_reference.check_trace`.
The samples of every batch are known by their index (the dataset's third tensor), so the trace records what the
door was really fed. The Hugging Face and Lightning drivers: :mod:`simigrad_testkit.door_trainers`.
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from simigrad_testkit.door_reference import Micro, Trace, check_trace
from simigrad_testkit.loop_reference import Net, Reference, dataset, loss_of, make_optimizer

LR = 0.1
NAMES = ("fc1.weight", "fc1.bias", "fc2.weight")        # fc2.bias always trains: some gradient always exists
DECAY = lambda s: 1.0 / (1 + 0.1 * s)  # noqa: E731


def shared(micro=st.integers(2, 5), n=st.integers(5, 23)):
    """What every door lets a user vary: data, micro-batch, B0, the controller's target, NaN samples, the
    optimizer, a frozen parameter (the first epoch only, or the whole run where the door builds its optimizer)."""
    return dict(n=n, micro=micro, seed=st.integers(0, 3), b0=st.integers(2, 12),
                target=st.sampled_from([-1.0, 0.3, 0.9, 0.999]), max_batch=st.integers(4, 24),
                nan=st.lists(st.integers(0, 22), max_size=2), opt=st.sampled_from(["sgd", "adam"]),
                frozen=st.none() | st.sampled_from(NAMES), epochs=st.integers(1, 3))


def config(s) -> dict:
    return dict(batch_size=s["b0"], group_mode="microsteps", target_similarity=s["target"], min_batch_size=1,
                max_batch_size=max(s["max_batch"], s["b0"]))


def door_data(s):
    """``s["n"]`` samples ``(x, y, index)`` in fp64; the samples ``s["nan"]`` (mod n) have a NaN feature."""
    x, y = dataset(s["n"], seed=s["seed"], dtype=torch.float64).tensors
    for i in s["nan"]:
        x[i % s["n"], 0] = float("nan")
    return x, y, torch.arange(s["n"])


def start_net():
    torch.manual_seed(0)
    return Net().double()


def reference(s, b0=None):
    """The fp64 plain loop from the same start, with the user's optimizer."""
    return Reference(start_net(), s["opt"], lr=LR, b0=b0 or s["b0"], schedule=False)


def freeze(model, names, prefix=""):
    for name, p in model.named_parameters():
        p.requires_grad_(name[len(prefix):] not in names)


# --- SIMIGRAD=1 ---------------------------------------------------------------------------------------------------
@st.composite
def auto_loop_runs(draw):
    """The unmodified loop: its own loader (batch, ``drop_last``, shuffling), its own accumulation (1 or 2 backward
    passes per ``step()``), ``zero_grad`` before or after, its own clipping of each micro-batch (norm types 2, 1,
    inf), its scheduler stepped every iteration, a ``GradScaler`` whose inf/NaN micro-batches never reach
    ``step()``, an inf loss, freezing between epochs, a validation loader run between ``backward`` and ``step``."""
    s = draw(st.fixed_dictionaries(shared()))
    s.update(draw(st.fixed_dictionaries(dict(
        drop_last=st.booleans(), shuffle=st.booleans(), accumulate=st.sampled_from([1, 1, 2]),
        zero=st.sampled_from(["none", "zeros", "model", "after"]), sched=st.booleans(),
        clip=st.none() | st.tuples(st.sampled_from([0.01, 0.3, 100.0]), st.sampled_from([2.0, 1.0, math.inf])),
        scaler=st.booleans(), growth=st.integers(1, 3), inf=st.lists(st.integers(0, 20), max_size=2),
        sized=st.booleans(), validate=st.booleans()))))
    return s


def run_auto_loop(s) -> Trace:
    """The user's plain loop under the ``SIMIGRAD=1`` hooks (installed in this process, then removed)."""
    from simigrad_compile.config import SimigradConfig
    from simigrad_compile.integrations import auto_loop

    x, y, idx = data = door_data(s)
    net = start_net()
    opt = make_optimizer(net.parameters(), s["opt"], LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, DECAY) if s["sched"] else None
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=s["growth"]) if s["scaler"] else None
    options = config(s)
    if not s["sized"]:  # B0 defaults to the loader's batch
        options.pop("batch_size")
    auto_loop.install(SimigradConfig(**options))
    trace, calls, fetched = Trace(), 0, 0
    g = torch.Generator().manual_seed(s["seed"])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data), batch_size=s["micro"],
                                         drop_last=s["drop_last"], shuffle=s["shuffle"], generator=g)
    validation = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data), batch_size=3)
    k = s["accumulate"]
    try:
        for epoch in range(s["epochs"]):
            frozen = frozenset([s["frozen"]] if s["frozen"] and epoch == 0 else [])
            freeze(net, frozen)
            parts, first = [], len(trace.micro)
            for i, (xb, yb, ib) in enumerate(loader):
                if i % k == 0 and s["zero"] != "after":
                    net.zero_grad() if s["zero"] == "model" else opt.zero_grad(set_to_none=s["zero"] == "none")
                weight = (float("inf") if fetched in s["inf"] else 1.0) / k
                loss = loss_of(net, xb, yb) * weight
                fetched += 1
                (scaler.scale(loss) if scaler else loss).backward()
                parts.append((ib, weight))
                if s.get("validate"):  # batches without a backward never size a step
                    with torch.no_grad():
                        for xv, _, _ in validation:
                            net(xv)
                if (i + 1) % k and i + 1 < len(loader):
                    continue
                if s["clip"] is not None:
                    if scaler:
                        scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(net.parameters(), *s["clip"])
                before = len(auto_loop.history(opt))
                factor = DECAY(calls) if sched else 1.0
                if scaler:
                    scale = scaler.get_scale()
                    scaler.step(opt)
                    scaler.update()
                    reached = scaler.get_scale() >= scale      # a backoff: inf/NaN found, step() never ran
                else:
                    opt.step()
                    reached = True
                if reached:
                    trace.micro.append(Micro(parts, clip=s["clip"], frozen=frozen, factor=factor))
                elif len(auto_loop.history(opt)) > before:
                    raise AssertionError("a micro-batch the GradScaler dropped ended a step")
                parts = []
                if sched:
                    sched.step()
                    calls += 1
                if s["zero"] == "after":
                    opt.zero_grad()
                trace.snapshot(auto_loop.history(opt), net)
            trace.snapshot(auto_loop.history(opt), net)  # the epoch's window, cut short and taken by the door
            if len(trace.micro) > first:
                trace.micro[-1].epoch_end = True
        trace.history = auto_loop.history(opt)
    finally:
        auto_loop.uninstall()
    assert sched is None or opt.param_groups[0]["lr"] == LR * DECAY(calls)     # the user's LR, untouched
    return trace


def auto_loop_factor(rec, applied, micros):
    """The loop's scheduler steps every iteration: the LR of the real step is the one at its last ``step()``."""
    return micros[-1].factor


def check_auto_loop(s) -> Trace:
    """Run the loop under ``SIMIGRAD=1`` and check it against the fp64 plain loop."""
    trace = run_auto_loop(s)
    # B0: SIMIGRAD_BATCH_SIZE, else the loader batches (their declared size) of the first step() that ran
    b0 = s["b0"] if s["sized"] or not trace.micro else s["micro"] * len(trace.micro[0].parts)
    x, y, _ = door_data(s)
    check_trace(trace, reference(s, b0), (x, y), auto_loop_factor)
    return trace
