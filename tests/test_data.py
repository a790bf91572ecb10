"""The adaptive loader: every sample once per epoch whatever the batch changes, workers, collate, sharding."""

import random
from collections import Counter

import pytest
import torch
from torch.utils.data import DistributedSampler

import simigrad_compile as sc
from simigrad_compile.runtime.data import rank_order
from simigrad_compile.runtime.ladder import Plan


class Indexed(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"idx": i, "x": torch.full((3,), float(i))}


def collate_ids(samples):
    return torch.tensor([s["idx"] for s in samples]), torch.stack([s["x"] for s in samples])


def make_run(**kw):
    model = torch.nn.Linear(3, 1)
    opts = dict(batch_size=8, max_micro_batch_size=16, group_mode="microsteps")
    opts.update(kw)
    return sc.AdaptiveBatching(model, torch.optim.SGD(model.parameters(), lr=0.0), **opts)


def drain(run, loader, rng):
    """One epoch; after every real step a random plan replaces the controller's."""
    seen, sizes = [], []
    for ids, x in loader:
        assert torch.equal(x[:, 0].long(), ids)
        seen += ids.tolist()
        sizes.append(len(ids))
        run.optimizer.step()
        if run.optimizer.stepped:
            run.plan = Plan(rng.choice(run.ladder.rungs), rng.randint(1, 4))
    return seen, sizes


@pytest.mark.parametrize("n, shuffle, workers", [(203, True, 0), (197, False, 0), (150, True, 2)])
def test_every_sample_once_per_epoch(n, shuffle, workers):
    run = make_run()
    rng = random.Random(0)
    loader = run.dataloader(Indexed(n), shuffle=shuffle, num_workers=workers, collate_fn=collate_ids)
    orders = []
    for epoch in range(2):
        seen, sizes = drain(run, loader, rng)
        assert Counter(seen) == Counter(range(n)), f"epoch {epoch}"
        assert all(s in run.ladder.rungs for s in sizes[:-1])
        orders.append(seen)
    assert run.epoch == 2
    assert (orders[0] != orders[1]) == shuffle
    changes = sum(a["batch_size"] != b["batch_size"] for a, b in zip(run.history, run.history[1:]))
    assert changes >= 10


def test_drop_last_drops_only_the_partial_step():
    run = make_run(batch_size=32, max_micro_batch_size=16)
    seen = [i for ids, _ in _steps(run, run.dataloader(Indexed(100), drop_last=True, collate_fn=collate_ids))
            for i in ids.tolist()]
    assert seen == list(range(96))


def _steps(run, loader):
    for batch in loader:
        yield batch
        run.optimizer.step()


def test_static_batch_dim_marked():
    run = make_run()
    ids, x = next(iter(run.dataloader(Indexed(40), collate_fn=collate_ids)))
    assert 0 in getattr(x, "_dynamo_static_indices", set())


def test_rejects_batch_size_kwarg():
    with pytest.raises(TypeError, match="batch_size"):
        make_run().dataloader(Indexed(10), batch_size=4)


def test_one_step_call_per_micro_batch():
    run = make_run(batch_size=8, max_micro_batch_size=4)
    it = iter(run.dataloader(Indexed(40), collate_fn=collate_ids))
    next(it)
    with pytest.raises(RuntimeError, match="once per micro-batch"):
        next(it)


@pytest.mark.parametrize("n, world", [(10, 3), (11, 2), (12, 4)])
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_sharding_matches_distributed_sampler(n, world, shuffle, drop_last):
    for epoch in (0, 1):
        for rank in range(world):
            ref = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=5,
                                     drop_last=drop_last)
            ref.set_epoch(epoch)
            assert rank_order(n, epoch, shuffle, 5, world, rank, drop_last) == list(ref)
