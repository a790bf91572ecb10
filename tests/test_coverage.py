"""The coverage census at its small size, and the census's own references against independent definitions.

The census (bench/bench_coverage.py) runs each model in a subprocess, in fp64: aot_eager for most, Inductor for one.
"""

import copy
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytestmark = pytest.mark.census

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.append(BENCH)  # bench/ names all start with bench_: none shadows a package

import bench_torchvision_cpu as torchvision_cpu  # noqa: E402

torchvision_cpu.ensure_importable()
for _family in ("torchvision", "timm", "transformers"):
    pytest.importorskip(_family, reason="the census needs its environment: pip install -r requirements/census.txt -e .")

import bench_coverage as coverage  # noqa: E402
import bench_coverage_models as coverage_models  # noqa: E402
import bench_coverage_reference as ref  # noqa: E402

INDUCTOR = ["hf_gpt2"]  # also through Inductor's codegen: learned positions, the ExpandView case

# The models issue 8 names as must-split.
MUST_SPLIT = ["resnet18", "squeezenet1_1", "mobilenet_v3_small", "tv_vit_tiny", "timm_resnet18",
              "timm_convnext_atto", "timm_vit_tiny_patch16_224", "hf_bert_padded", "hf_llama_labels"]


@pytest.fixture(scope="module")
def census(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("inductor-cache"))
    small = [s.name for s in coverage_models.select("small", None)]
    records = coverage.census(small, "aot_eager", 4, timeout=600, max_params=150_000_000, cache_dir=cache)
    records += coverage.census(INDUCTOR, "inductor", 4, timeout=600, max_params=150_000_000, cache_dir=cache)
    return records


def test_census_small_has_no_wrong_model_and_no_crash(census):
    assert {"resnet18", "hf_bert_padded", "timm_vit_tiny_patch16_224"} <= {r["model"] for r in census}
    bad = [coverage.row(r) for r in census if r["status"] not in ("split", "refused")]
    assert not bad, "\n".join(bad)
    for r in census:
        assert r["status"] in ("split", "error") or r["reasons"], f"{r['model']} refused without a reason"
        if r["status"] == "split":
            assert r["stats_err"]["cosine"] <= coverage.STATS_TOL and r["missing"] == []


def test_census_must_split_models_are_fully_split(census):
    status = {(r["model"], r.get("compiler")): r["status"] for r in census}
    not_split = [k for k, v in status.items() if k[0] in MUST_SPLIT and v != "split"]
    assert not not_split, not_split


def test_census_reports_a_wrong_statistic(monkeypatch):
    """The census can fail: a statistic 1% off is classified 'wrong' (in-process run of one tiny model)."""
    import simigrad_compile

    real = simigrad_compile.gradient_stats

    def off_by_one_percent(model, reset=False, per_parameter=False):
        s = real(model, reset=reset, per_parameter=per_parameter)
        return simigrad_compile.SplitStats(s.dot * 1.01, s.sq_norm_1, s.sq_norm_2, s.mode, None, s.missing,
                                           s.unsplit)

    spec = coverage_models.Spec("mlp", "test", lambda b: (_PerSample(), _batch(b), _loss))
    monkeypatch.setattr(simigrad_compile, "gradient_stats", off_by_one_percent)
    rec = coverage.run_one(spec, "aot_eager", 4, 10**9)
    assert rec["status"] == "wrong" and any(p.startswith("dot off") for p in rec["problems"]), rec
    monkeypatch.setattr(simigrad_compile, "gradient_stats", real)
    assert coverage.run_one(spec, "aot_eager", 4, 10**9)["status"] == "split"


class _PerSample(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


class _WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x)), inplace=True).mean((2, 3)))


def _batch(b):
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(b, 3, 6, 6, generator=g), "y": torch.randint(0, 10, (b,), generator=g)}


def _loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"])


def _cat(grads, names):
    return torch.cat([grads[n].flatten() for n in names])


@pytest.mark.parametrize("b", [4, 6])
def test_contributions_equal_half_batch_passes_for_a_per_sample_model(b):
    torch.manual_seed(0)
    model64, batch64 = ref.double_copy(_PerSample(), _batch(b))
    names = [n for n, _ in model64.named_parameters()]
    want = ref.half_batch_reference(copy.deepcopy(model64), _loss, batch64, b)
    got = ref.contributions_reference(model64, _loss, batch64, b)
    for w, g in zip(want, got):
        torch.testing.assert_close(_cat(g, names), _cat(w, names), rtol=1e-10, atol=1e-12)


def test_contributions_match_the_definition_with_batchnorm():
    """g_h = d(full-batch loss)/d(copy of the parameters used only by half h's rows), written out functionally."""
    torch.manual_seed(1)
    b, model = 6, _WithBatchNorm()
    model64, batch64 = ref.double_copy(model, _batch(b))
    names = [n for n, _ in model64.named_parameters()]
    g1, g2, full = ref.contributions_reference(copy.deepcopy(model64), _loss, batch64, b)
    copies = [{n: p.detach().clone().requires_grad_() for n, p in model64.named_parameters()} for _ in range(2)]
    rows = (slice(0, b // 2), slice(b // 2, b))
    x = batch64["x"]
    y = torch.cat([F.conv2d(x[r], p["conv.weight"], p["conv.bias"]) for r, p in zip(rows, copies)])
    z = F.batch_norm(y, None, None, training=True, eps=model.bn.eps)
    z = torch.cat([z[r] * p["bn.weight"].view(1, -1, 1, 1) + p["bn.bias"].view(1, -1, 1, 1)
                   for r, p in zip(rows, copies)])
    h = F.relu(z).mean((2, 3))
    out = torch.cat([F.linear(h[r], p["fc.weight"], p["fc.bias"]) for r, p in zip(rows, copies)])
    F.cross_entropy(out, batch64["y"]).backward()
    for got, p in zip((g1, g2), copies):
        torch.testing.assert_close(_cat(got, names), torch.cat([p[n].grad.flatten() for n in names]),
                                   rtol=1e-10, atol=1e-12)
    model64.zero_grad()
    _loss(model64, batch64).backward()
    torch.testing.assert_close(_cat(full, names), torch.cat([p.grad.flatten() for p in model64.parameters()]))


def test_torchvision_models_import_and_build():
    import timm
    import torchvision

    assert "resnet18" in torchvision.models.list_models(module=torchvision.models)
    x = torch.randn(2, 3, 32, 32)
    assert torchvision.models.resnet18(num_classes=3)(x).shape == (2, 3)
    assert timm.create_model("resnet10t", pretrained=False, num_classes=3)(x).shape == (2, 3)


def test_the_determinism_probe_tells_dropout_from_last_bit_noise():
    torch.manual_seed(0)
    x = torch.randn(4, 16, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.1)).double().train()
    with torch.no_grad():
        o1, o2 = model(x), model(x)
    bound = coverage.FORWARD_JITTER_ULPS * torch.finfo(torch.float64).eps
    assert coverage._relative_jitter(o1, o2) > bound  # dropout: O(1)
    last_bits = o1 * (1 + 4 * torch.finfo(torch.float64).eps * torch.randn_like(o1).sign())
    assert 0 < coverage._relative_jitter(o1, last_bits) <= bound  # a BLAS that splits a product differently
