"""The read path of the statistics: ``gradient_stats``' per-model plan follows every change of the model and of
the sinks, and the boundary's gradient norm matches ``torch.nn.utils.get_total_norm``.

References are the rows each test adds by hand (fp32 values exact in fp64), so every expected sum is exact.
"""

import gc
import math
import weakref

import pytest
import torch
import torch.nn as nn

from simigrad_compile.runtime.step_rules import _total
from simigrad_compile.stats.gradient_stats import Sink, gradient_stats


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)


def _sums(stats):
    return stats.dot, stats.sq_norm_1, stats.sq_norm_2


def _with_grads(model):
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    return model


def test_only_the_rows_of_the_models_parameters_are_summed():
    a, b = Net(), Net()
    sink = Sink("batch", [[("w", a.fc1.weight)], [("w", b.fc1.weight)], [("b", a.fc2.bias)]])
    sink.add(torch.tensor([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0], [0.5, 0.25, 4.0]]))
    got = gradient_stats(a, per_parameter=True)
    assert _sums(got) == (1.5, 2.25, 7.0) and got.mode == "batch"
    assert got.per_parameter == {"fc1.weight": (1.0, 2.0, 3.0), "fc2.bias": (0.5, 0.25, 4.0)}
    assert _sums(gradient_stats(b, reset=True)) == (10.0, 20.0, 30.0)
    assert sink.count == 0 and _sums(gradient_stats(a)) == (0.0, 0.0, 0.0)


def test_the_plan_follows_changes_of_the_parameters():
    model = _with_grads(Net())
    sink = Sink("batch", [[("w", model.fc1.weight)], [("b", model.fc1.bias)]])
    sink.add(torch.tensor([[1.0, 2.0, 3.0], [4.0, 8.0, 16.0]]))
    first = gradient_stats(model)
    assert _sums(first) == (5.0, 10.0, 19.0) and set(first.missing) == {"fc2.weight", "fc2.bias"}

    model.extra = nn.Parameter(torch.zeros(2))  # a new parameter with a gradient and no statistics
    model.extra.grad = torch.ones(2)
    assert set(gradient_stats(model).missing) == {"fc2.weight", "fc2.bias", "extra"}

    old_bias = model.fc1.bias  # still alive: replaced under the same name, its row no longer belongs to the model
    model.fc1.bias = nn.Parameter(torch.zeros(4))
    model.fc1.bias.grad = torch.ones(4)
    replaced = gradient_stats(model)
    assert _sums(replaced) == (1.0, 2.0, 3.0) and "fc1.bias" in replaced.missing

    model.fc1._parameters["bias"] = old_bias  # written into the registry directly, bypassing setattr
    assert _sums(gradient_stats(model)) == (5.0, 10.0, 19.0)

    del model.extra  # deleted while still referenced elsewhere
    assert set(gradient_stats(model).missing) == {"fc2.weight", "fc2.bias"}

    model.fc1.register_parameter("renamed", model.fc1._parameters.pop("weight"))
    assert set(gradient_stats(model, per_parameter=True).per_parameter) == {"fc1.renamed", "fc1.bias"}

    model.fc2 = nn.Linear(4, 2)  # a new submodule without gradients: nothing missing
    assert gradient_stats(model).missing == ()


def test_the_plan_follows_sinks_made_and_dropped():
    model = _with_grads(Net())
    first = Sink("batch", [[("w", model.fc1.weight)], [("b", model.fc1.bias)]])
    first.add(torch.ones(2, 3))
    assert _sums(gradient_stats(model)) == (2.0, 2.0, 2.0)
    second = Sink("batch", [[("w", model.fc2.weight)], [("b", model.fc2.bias)]])
    second.add(torch.full((2, 3), 2.0))
    both = gradient_stats(model)
    assert _sums(both) == (6.0, 6.0, 6.0) and both.missing == ()
    del first
    gc.collect()
    left = gradient_stats(model)
    assert _sums(left) == (4.0, 4.0, 4.0) and set(left.missing) == {"fc1.weight", "fc1.bias"}
    idle = gradient_stats(model, reset=True)
    assert idle.mode == "batch" and second.count == 0
    none = gradient_stats(model)  # the sink recorded nothing since the reset: its parameters are missing
    assert none.mode == "none" and set(none.missing) == {n for n, _ in model.named_parameters()}


def test_the_plan_keeps_no_model_alive():
    model = _with_grads(Net())
    model.fc1.weight.owner = model  # a parameter that refers back to its model (a cycle gc can collect)
    sink = Sink("batch", [[("w", model.fc1.weight)]])
    sink.add(torch.ones(1, 3))
    assert gradient_stats(model).mode == "batch"
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


def test_a_module_compiled_in_place_after_a_read_is_named():
    inner = Net()
    wrapper = torch.compile(inner, backend="simigrad")
    assert gradient_stats(wrapper).mode == "none"
    inner.compile(backend="simigrad")
    with pytest.raises(RuntimeError, match="compiled more than once"):
        gradient_stats(wrapper)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, math.inf])
def test_the_total_norm_is_get_total_norms(norm_type):
    torch.manual_seed(0)
    grads = [torch.randn(5, 3) * 10 ** k for k in range(-3, 4)] + [torch.zeros(2)]
    norms = [n.item() for n in torch._foreach_norm(grads, norm_type)]
    want = torch.nn.utils.get_total_norm([g.double() for g in grads], norm_type).item()
    assert _total(norms, norm_type) == pytest.approx(want, rel=1e-6)
    assert _total([0.0, 0.0], norm_type) == 0.0 and _total([], norm_type) == 0.0
    for bad in (math.nan, math.inf):
        assert not math.isfinite(_total(norms[:2] + [bad] + norms[2:], norm_type))
