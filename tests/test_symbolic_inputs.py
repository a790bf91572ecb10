"""``symbolic_batch`` on a model whose inputs keep batch symbols of their own: Hugging Face's BERT reads its padding
mask through ``mask[arange(B)]``, so Dynamo never relates the mask's batch dim to the tokens'. The split pass reads
both as the batch (the statistics equal two separate fp64 half-batch passes, at two batch sizes on one graph), and
a call whose inputs disagree on the batch size is refused by name."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

import simigrad_compile as sc  # noqa: E402
from simigrad_compile.runtime.data import mark_batch  # noqa: E402
from simigrad_testkit.hf_dist_worker import tiny_bert  # noqa: E402


def padded(b: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 30, (b, 10), generator=g)
    mask = torch.ones(b, 10, dtype=torch.long)
    for i in range(b):
        mask[i, 4 + i % 6:] = 0  # every row its own padding
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, 2, (b,), generator=g)}


def reference_cosine(model, batch) -> float:
    """Two separate fp64 backward passes, over rows ``[0, B//2)`` and ``[B//2, B)``."""
    ref, grads, b = copy.deepcopy(model).double(), [], len(batch["labels"])
    for rows in (slice(0, b // 2), slice(b // 2, b)):
        ref.zero_grad()
        ref(**{k: v[rows] for k, v in batch.items()}).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in ref.parameters() if p.grad is not None]))
    g1, g2 = grads
    return float(g1 @ g2 / (g1.norm() * g2.norm()))


def test_a_mask_with_its_own_batch_symbol_is_split_and_checked_at_every_call():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = tiny_bert()
    model.config.problem_type = "single_label_classification"  # what its first call sets (a guard would see it)
    compiled = torch.compile(model, backend="simigrad", options={"compiler": "aot_eager", "group_mode": "batch"})
    mark = mark_batch(0, None, symbolic=True)  # what run.dataloader() does with symbolic_batch=True
    graphs = []
    for b, seed in ((4, 0), (6, 1), (7, 2)):
        batch = {k: mark(v) for k, v in padded(b, seed).items()}
        model.zero_grad(set_to_none=True)
        compiled(**batch).loss.backward()
        stats = sc.gradient_stats(model, reset=True)
        graphs.append(counters["stats"]["unique_graphs"])
        assert stats.mode == "batch" and not stats.unsplit and not stats.missing, (b, stats.unsplit)
        assert stats.cosine == pytest.approx(reference_cosine(model, batch), abs=1e-5), b
    assert graphs[1:] == graphs[:1] * 2  # 6 and 7 samples run on the graph of 4

    bad = {k: mark(v) for k, v in padded(6, 3).items()}
    bad["attention_mask"] = mark(padded(8, 3)["attention_mask"])
    with pytest.raises(ValueError, match=r"disagree on the batch size: .*'attention_mask'.* 8 along dim 0, .*'input_ids'.* 6 along dim 0"):
        compiled(**bad)
