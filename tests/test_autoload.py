"""``SIMIGRAD=1`` in scripts that never import simigrad_compile (subprocesses), and the auto loop's arithmetic."""

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import simigrad_compile as sc
from simigrad_compile.integrations import auto_loop
from simigrad_compile.config import SimigradConfig

REPO = Path(__file__).resolve().parents[1]

# A tiny training loop that never imports simigrad_compile; prints the bits of its loss and parameters.
LOOP = """
import hashlib, json, logging, sys
import torch
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s", stream=sys.stderr)
torch.manual_seed(0)
X = torch.randn(96, 8)
Y = X @ torch.randn(8, 1) + 0.3 * torch.randn(96, 1)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=16)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
if COMPILE:
    model = torch.compile(model)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
for epoch in range(EPOCHS):
    for x, y in loader:
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
digest = hashlib.sha256()
for p in model.parameters():
    digest.update(p.detach().numpy().tobytes())
print(json.dumps({"loss": loss.item().hex(), "params": digest.hexdigest(), "lr": opt.param_groups[0]["lr"],
                  "default_backend": str(torch.compiler.get_default_backend())}))
"""

STEP_LINE = re.compile(r"simigrad step (\d+): cos (\S+) \((\S+)\) batch (\d+) = (\d+) x (\d+), lr x([\d.]+)")


def run(code: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SIMIGRAD")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True, text=True,
                          timeout=timeout, cwd="/")


def loop(compile: bool, epochs: int, env: dict) -> subprocess.CompletedProcess:
    out = run(LOOP.replace("COMPILE", str(compile)).replace("EPOCHS", str(epochs)), env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_unset_is_plain_torch_compile():
    # TORCH_DEVICE_BACKEND_AUTOLOAD=0 keeps every line of simigrad_compile out of the process: the reference.
    envs = ({"TORCH_DEVICE_BACKEND_AUTOLOAD": "0"}, {}, {"SIMIGRAD": "0"})
    with ThreadPoolExecutor(len(envs)) as pool:  # three independent processes, side by side
        plain, *others = [json.loads(out.stdout) for out in pool.map(lambda env: loop(True, 2, env), envs)]
    assert others == [plain, plain]
    assert plain["default_backend"] == "inductor"


def test_unset_touches_nothing():
    probe = """
    import sys, torch
    from torch.optim.optimizer import _global_optimizer_pre_hooks, _global_optimizer_post_hooks
    from torch.utils.data.dataloader import _BaseDataLoaderIter
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("triton", "simigrad_compile") or m.startswith(
        ("torch._dynamo", "torch._inductor")))
    print(heavy, torch.compile.__module__, getattr(torch.compile, "_simigrad_trampoline", False),
          len(_global_optimizer_pre_hooks), len(_global_optimizer_post_hooks),
          _BaseDataLoaderIter.__next__.__module__)
    """
    out = run(probe, {})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "torch", "False", "0", "0", "torch.utils.data.dataloader"]


@pytest.mark.parametrize("name, value", [
    ("SIMIGRAD_TARGET_SIMILARITY", "high"),
    ("SIMIGRAD_MAX_MICRO_BATCH_SIZE", "0"),
    ("SIMIGRAD_GROUP_MODE", "everything"),
    ("SIMIGRAD_NO_SUCH_FIELD", "1"),
    ("SIMIGRAD", "maybe"),
])
def test_bad_value_names_the_variable(name, value):
    env = {"SIMIGRAD": "1", name: value}
    out = run("import torch", env)
    assert out.returncode != 0
    assert "ConfigError" in out.stderr and name + ("=" if name == "SIMIGRAD" else "") in out.stderr, out.stderr


def test_enabled_routes_default_backend_to_simigrad():
    script = """
    import json, torch
    import torch._dynamo.backends.registry as registry
    real = registry.lookup_backend("simigrad")      # the installed entry point
    calls = []
    def spy(gm, example_inputs, **kw):
        calls.append(len(example_inputs))
        return real(gm, example_inputs, **kw)
    registry._COMPILER_FNS["simigrad"] = spy
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(16, 8)
    torch.compile(m)(x).sum().backward()
    routed = len(calls)
    torch.compile(m, backend="eager")(x)
    print(json.dumps({"routed": routed, "after_explicit": len(calls),
                      "default": torch.compiler.get_default_backend()}))
    """
    out = run(script, {"SIMIGRAD": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result == {"routed": 1, "after_explicit": 1, "default": "simigrad"}


def test_unmodified_loop_grows_batch_under_simigrad():
    out = loop(False, 6, {"SIMIGRAD": "1", "SIMIGRAD_TARGET_SIMILARITY": "0.99", "SIMIGRAD_BATCH_SIZE": "32"})
    steps = [STEP_LINE.search(line).groups() for line in out.stderr.splitlines() if STEP_LINE.search(line)]
    assert steps, out.stderr
    assert all(int(s[3]) == int(s[4]) * int(s[5]) and int(s[5]) == 16 for s in steps)
    for s in steps:
        assert float(s[6]) == pytest.approx(math.sqrt(int(s[3]) / 32), abs=1e-4)
    # An epoch (96 samples) ends inside a window: that step is cut short and, when its planned first half is not
    # complete, has no statistics (the controller holds). Every other step is split and grows the batch.
    full = [s for s in steps if s[2] == "microsteps"]
    assert all(math.isfinite(float(s[1])) for s in full) and len(full) >= len(steps) // 2
    assert all(s[2] == "none" and int(s[4]) <= 2 for s in steps if s not in full)
    batches = [int(s[3]) for s in full]
    assert batches[0] == 32 and batches[-1] > 32 and batches == sorted(batches)
    assert sum(int(s[3]) for s in steps) == 6 * 96                 # every sample once per epoch
    assert json.loads(out.stdout)["lr"] == 0.05          # the user's LR, untouched between steps


def test_compiled_loop_uses_backend_statistics_at_accumulation_one():
    """SIMIGRAD=1, plain torch.compile(model), B0 = loader batch: step 1 reads the backend's ``batch`` statistics,
    whose cosine is that of the two half-batch gradients (fp64 eager reference on the same first batch)."""
    reference = """
    import torch
    torch.manual_seed(0)
    X = torch.randn(96, 8)
    Y = X @ torch.randn(8, 1) + 0.3 * torch.randn(96, 1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).double()
    halves = []
    for sl in (slice(0, 8), slice(8, 16)):
        model.zero_grad()
        torch.nn.functional.mse_loss(model(X[sl].double()), Y[sl].double(), reduction="sum").backward()
        halves.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    print(torch.nn.functional.cosine_similarity(*halves, dim=0).item())
    """
    ref = run(reference, {})
    assert ref.returncode == 0, ref.stderr
    out = loop(True, 1, {"SIMIGRAD": "1", "SIMIGRAD_TARGET_SIMILARITY": "-1"})
    steps = [STEP_LINE.search(line).groups() for line in out.stderr.splitlines() if STEP_LINE.search(line)]
    assert steps and steps[0][2] == "batch" and steps[0][4] == "1", out.stderr[-3000:]
    assert float(steps[0][1]) == pytest.approx(float(ref.stdout), abs=1e-4)
    assert all(s[4] == "1" and s[2] == "batch" for s in steps)      # target -1: never grows


def test_a_short_last_batch_does_not_stop_the_split():
    """SIMIGRAD=1 marks the loader's batch dim static: an epoch's short last batch (10 of 16) gets a graph of its
    own instead of making Dynamo's batch dim dynamic, so the next epoch's steps are split again."""
    code = LOOP.replace("COMPILE", "True").replace("EPOCHS", "2").replace("randn(96,", "randn(90,")
    out = run(code, {"SIMIGRAD": "1", "SIMIGRAD_TARGET_SIMILARITY": "-1"})
    assert out.returncode == 0, out.stderr[-3000:]
    steps = [STEP_LINE.search(line).groups() for line in out.stderr.splitlines() if STEP_LINE.search(line)]
    assert [s[3] for s in steps] == ["16"] * 5 + ["10"] + ["16"] * 5 + ["10"], out.stderr[-3000:]
    assert all(s[2] == "batch" for s in steps), out.stderr[-3000:]


def test_accumulation_one_reads_and_resets_backend_sinks(hooks):
    from simigrad_compile.stats.gradient_stats import Sink

    model, other = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mine = Sink("batch", [[("weight", model.weight)], [("bias", model.bias)]])
    foreign = Sink("batch", [[("weight", other.weight)]])
    mine.add(torch.tensor([[1.0, 1.0, 4.0], [1.0, 0.0, 0.0]]))
    foreign.add(torch.tensor([[5.0, 5.0, 5.0]]))
    hooks()
    for xb, yb in torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 3), torch.ones(4, 1)),
                                              batch_size=4):
        model(xb).sum().backward()
        opt.step()
    (record,) = auto_loop.history(opt)
    # d = 2, a = 1, b = 4: cosine 2 / (1 * 2) = 1
    assert (record["statistics"], record["accumulation"], record["cosine"]) == ("batch", 1, pytest.approx(1.0))
    assert mine.count == 0 and foreign.count == 1


def test_both_install_modes_register_the_hook(tmp_path):
    # Read the venv's own metadata: a stale simigrad_compile.egg-info in the current directory would shadow it.
    hook = "[torch.backends]\nsimigrad = _simigrad_compile_autoload:torch_autoload"
    (editable,) = Path(sysconfig.get_paths()["purelib"]).glob("simigrad_compile-*.dist-info")
    assert hook in (editable / "entry_points.txt").read_text()
    source, target = tmp_path / "src", tmp_path / "site"     # a copy: building writes egg-info and build/
    shutil.copytree(REPO / "simigrad_compile", source / "simigrad_compile",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "_simigrad_compile_autoload.py"):
        shutil.copy(REPO / name, source / name)
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(source)], capture_output=True, text=True, timeout=180)
    assert pip.returncode == 0, pip.stderr
    (dist,) = target.glob("simigrad_compile-*.dist-info")
    assert hook in (dist / "entry_points.txt").read_text()
    probe = "import torch, simigrad_compile; print(simigrad_compile.__file__, torch.compile._simigrad_trampoline)"
    out = run(probe, {"SIMIGRAD": "1", "PYTHONPATH": str(target)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(target / "simigrad_compile" / "__init__.py"), "True"]


# ---- the door's arithmetic, in process, against a hand-written fp64 plain loop ---------------------------

def _data(n: int):
    torch.manual_seed(1)
    x = torch.randn(n, 5)
    return x, x @ torch.randn(5, 2) + 0.5 * torch.randn(n, 2)


def _net():
    torch.manual_seed(2)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))


def _mean_grad(model, x, y):
    """The plain loop's gradient: one backward of the mean loss over the step's samples, in fp64."""
    model.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x.double()), y.double())
    loss.backward()
    return [p.grad.detach().clone() for p in model.parameters()], loss.item()


@pytest.fixture
def hooks():
    yield lambda **kw: auto_loop.install(SimigradConfig(**kw))
    auto_loop.uninstall()


def _plain_loop(model, opt, loader, validation=None, zero_first=True):
    """The user's unmodified loop; ``validation``: a loader run between ``backward`` and ``step``."""
    for i, (xb, yb) in enumerate(loader):
        if zero_first:
            opt.zero_grad(set_to_none=i % 2 == 0)
        torch.nn.functional.mse_loss(model(xb), yb).backward()
        if validation is not None:
            with torch.no_grad():
                for xv, _ in validation:
                    model(xv)
        opt.step()
        if not zero_first:
            model.zero_grad()


@pytest.mark.parametrize("n, b0, steps", [
    (40, 48, [(0, 40)]),                # micro-batches 16, 16, 8 in one window of 3; halves 16 | 24 samples
    (32, 40, [(0, 32)]),                # target 40 rounds to 2 x 16 (ties to fewer micro-steps): lr x sqrt(32/40)
    (56, 48, [(0, 48), (48, 56)]),      # the epoch ends after 8 samples of the second window: a step of 8
])
def test_each_step_is_the_plain_loops_step_on_its_samples(hooks, n, b0, steps):
    x, y = _data(n)
    model = _net()
    ref = copy.deepcopy(model).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks(batch_size=b0, group_mode="microsteps")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    _plain_loop(model, opt, loader, zero_first=n != 56)
    records = auto_loop.history(opt)
    assert [r["batch_size"] for r in records] == [b - a for a, b in steps]
    assert opt.param_groups[0]["lr"] == 0.1
    if n == 56:  # the door took the epoch's last step itself, and left p.grad as the loop's zero_grad would
        assert all(p.grad is None for p in model.parameters())
    for record, (a, b) in zip(records, steps):
        grads, loss = _mean_grad(ref, x[a:b], y[a:b])
        scale = math.sqrt((b - a) / b0)
        assert record["lr_scale"] == pytest.approx(scale) and record["loss"] == pytest.approx(loss, rel=1e-5)
        with torch.no_grad():
            for p, g in zip(ref.parameters(), grads):
                p -= 0.1 * scale * g
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach().double(), q.detach(), atol=1e-6, rtol=1e-5)
    if n == 40:  # the cosine of the microsteps halves (first micro-batch | the rest), fp64 reference
        start = _net().double()
        first, rest = _mean_grad(start, x[:16], y[:16])[0], _mean_grad(start, x[16:], y[16:])[0]
        flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
        cosine = torch.nn.functional.cosine_similarity(flat(first), flat(rest), dim=0).item()
        assert records[0]["cosine"] == pytest.approx(cosine, abs=1e-5)


def test_a_validation_loader_does_not_size_the_step(hooks):
    """A validation loop before the first step and between every backward and step (batch 50, no backward) leaves
    every parameter bit-identical to the same loop without it."""
    x, y = _data(96)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:60], y[:60]), batch_size=50)
    models, records = [], []
    for validation in (None, val):
        model = _net()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        hooks(batch_size=32, target_similarity=0.9)
        if validation is not None:
            with torch.no_grad():
                for xv, _ in validation:
                    model(xv)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
        for _ in range(2):
            _plain_loop(model, opt, loader, validation)
        models.append(model)
        records.append(auto_loop.history(opt))
        auto_loop.uninstall()
    assert json.dumps(records[0]) == json.dumps(records[1])        # (NaN-safe)
    assert {r["micro_batch_size"] for r in records[1]} == {16}
    assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()))


def test_grad_scaler_overflow_leaves_its_micro_batch_out(hooks):
    """The standard GradScaler recipe under SIMIGRAD=1: ``scaler.step`` unscales each micro-batch's fresh gradient;
    a micro-batch with an inf loss never reaches ``optimizer.step()`` and is left out of the step; the history's
    loss is the unscaled one."""
    x, y = _data(24)
    model = _net()
    ref = copy.deepcopy(model).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    hooks(batch_size=8, group_mode="microsteps")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    for i, (xb, yb) in enumerate(loader):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(xb), yb) * (float("inf") if i == 2 else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    records = auto_loop.history(opt)
    steps = [(0, 8), (12, 20), (20, 24)]            # samples 8..11 overflowed; the epoch ends one micro-batch in
    assert [r["batch_size"] for r in records] == [8, 8, 4] and scaler.get_scale() == 512.0
    for record, (a, b) in zip(records, steps):
        grads, loss = _mean_grad(ref, x[a:b], y[a:b])
        assert record["loss"] == pytest.approx(loss, rel=1e-5)
        with torch.no_grad():
            for p, g in zip(ref.parameters(), grads):
                p -= 0.1 * math.sqrt((b - a) / 8) * g
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach().double(), q.detach(), atol=1e-6, rtol=1e-5)


def test_a_loop_that_accumulates_by_itself_and_an_adaptive_batching_run_beside_it(hooks):
    """Two backward passes (halved losses) per ``step()``: one micro-step of both batches, 32 samples. An
    ``AdaptiveBatching`` run in the same process is left to its own door, and its updates are unchanged."""
    x, y = _data(64)
    model = _net()
    ref = copy.deepcopy(model).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks(batch_size=64, group_mode="microsteps")
    batches = iter(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16))
    for _ in range(2):
        opt.zero_grad()
        for _ in range(2):
            xb, yb = next(batches)
            (torch.nn.functional.mse_loss(model(xb), yb) / 2).backward()
        opt.step()
    (record,) = auto_loop.history(opt)
    assert (record["micro_batch_size"], record["accumulation"], record["batch_size"]) == (32, 2, 64)
    grads, loss = _mean_grad(ref, x, y)
    assert record["loss"] == pytest.approx(loss, rel=1e-5)   # the halved losses of a micro-step sum to its mean
    for p, q, g in zip(model.parameters(), ref.parameters(), grads):
        torch.testing.assert_close(p.detach().double(), q.detach() - 0.1 * g, atol=1e-6, rtol=1e-5)

    runs = []
    for _ in range(2):
        net = _net()
        run = sc.AdaptiveBatching(net, torch.optim.SGD(net.parameters(), lr=0.1), batch_size=32,
                                  group_mode="microsteps", max_micro_batch_size=16)
        for xb, yb in run.dataloader(torch.utils.data.TensorDataset(x, y)):
            torch.nn.functional.mse_loss(net(xb), yb).backward()
            run.optimizer.step()
            run.optimizer.zero_grad()
        runs.append((net, run.history))
        auto_loop.uninstall()
    assert json.dumps(runs[0][1]) == json.dumps(runs[1][1])            # (NaN-safe)
    assert all(torch.equal(p, q) for p, q in zip(runs[0][0].parameters(), runs[1][0].parameters()))


def test_accumulation_one_is_bit_identical(hooks):
    x, y = _data(16)
    models = []
    for hooked in (False, True):
        torch.manual_seed(3)
        model = torch.nn.Linear(5, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=0.01)
        if hooked:
            hooks()
        for xb, yb in torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16):
            torch.nn.functional.mse_loss(model(xb), yb).backward()
            opt.step()
        models.append(model)
    assert auto_loop.history(opt)[0]["accumulation"] == 1
    assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()))


def test_closure_and_excluded_optimizers(hooks):
    hooks(batch_size=4)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(4, 3)).sum()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="closure"):
        opt.step(closure)
    auto_loop.exclude(opt)
    opt.step(closure)
    assert auto_loop.history(opt) == []


def test_auto_loop_false_routes_the_backend_but_leaves_optimizers_alone():
    out = loop(False, 2, {"SIMIGRAD": "1", "SIMIGRAD_AUTO_LOOP": "false"})
    plain = loop(False, 2, {})
    assert json.loads(out.stdout)["params"] == json.loads(plain.stdout)["params"]
    assert not STEP_LINE.search(out.stderr)
    routed = run("import torch; torch.compile(torch.nn.Linear(2, 2)); print(torch.compiler.get_default_backend())",
                 {"SIMIGRAD": "1", "SIMIGRAD_AUTO_LOOP": "false"})
    assert routed.stdout.strip().endswith("simigrad"), routed.stderr[-2000:]
