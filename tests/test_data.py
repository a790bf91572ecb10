"""The adaptive loader: every sample once per epoch whatever the batch changes, workers, collate, sharding; epoch
tails on the current rung only (no new graph), their mean gradient, resume; iterable datasets."""

import copy
import random
from collections import Counter

import pytest
import torch
from torch.utils.data import DistributedSampler

import simigrad_compile as sc
from simigrad_compile.runtime.data import _Orders, rank_order
from simigrad_compile.runtime.ladder import Plan


class Indexed(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"idx": i, "x": torch.full((3,), float(i))}


class Stream(torch.utils.data.IterableDataset):
    """0 .. n-1 in order; with workers each takes every ``num_workers``-th sample (the DataLoader interleaves)."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        start, step = (0, 1) if info is None else (info.id, info.num_workers)
        return iter({"idx": i, "x": torch.full((3,), float(i))} for i in range(start, self.n, step))


def collate_ids(samples):
    return torch.tensor([s["idx"] for s in samples]), torch.stack([s["x"] for s in samples])


def make_run(**kw):
    model = torch.nn.Linear(3, 1)
    # the static ladder: tails of the current rung (symbolic_batch's exact tails have their own test)
    opts = dict(batch_size=8, max_micro_batch_size=16, group_mode="microsteps", symbolic_batch=False)
    opts.update(kw)
    return sc.AdaptiveBatching(model, torch.optim.SGD(model.parameters(), lr=0.0), **opts)


def one_pass(run, loader, rng=None, plans=None):
    """One pass; after every real step ``plans(rng)`` (a random plan by default) replaces the controller's.
    Returns the ids seen and the micro-batch sizes of each step."""
    seen, steps, sizes = [], [], []
    for ids, x in loader:
        assert torch.equal(x[:, 0].long(), ids)
        seen += ids.tolist()
        sizes.append(len(ids))
        run.optimizer.step()
        if run.optimizer.stepped:
            steps.append(sizes)
            sizes = []
            if rng is not None:
                run.plan = (plans or random_plan)(run, rng)
    assert not sizes, "a pass ended inside a step"
    return seen, steps


def random_plan(run, rng):
    return Plan(rng.choice(run.ladder.rungs), rng.randint(1, 4))


def check_epochs(stream, n, passes, run):
    """Every sample exactly once in each epoch's slice of the stream; each pass ended past its epoch's end."""
    for e in range(len(stream) // n):
        assert Counter(stream[e * n:(e + 1) * n]) == Counter(range(n)), f"epoch {e}"
    rest = stream[len(stream) // n * n:]
    assert len(set(rest)) == len(rest) and set(rest) <= set(range(n))
    assert run.epoch == passes and len(stream) == passes * n + run.state.position


@pytest.mark.parametrize("n, shuffle, workers", [(203, True, 0), (197, False, 0), (150, True, 2), (61, False, 2)])
def test_every_sample_once_per_epoch(n, shuffle, workers):
    run = make_run()
    rng = random.Random(0)
    loader = run.dataloader(Indexed(n), shuffle=shuffle, num_workers=workers, collate_fn=collate_ids)
    stream, ends = [], []
    for p in range(3):
        seen, steps = one_pass(run, loader, rng)
        stream += seen
        ends.append(len(stream))
        check_epochs(stream, n, p + 1, run)
        assert all(s in run.ladder.rungs and len(set(step)) == 1 for step in steps for s in step)
        assert 0 <= len(stream) - (p + 1) * n < sum(steps[-1]), "the tail borrows less than its own step"
    if shuffle:
        assert stream[:n] != stream[n:2 * n]
    else:
        assert stream == [i % n for i in range(len(stream))]
    micro = [r["micro_batch_size"] for r in run.history]
    changes = sum(a != b for a, b in zip(micro, micro[1:]))
    assert changes >= 5
    if workers:  # a rung change, or a pass's end, costs at most the prefetched micro-batches (2 per worker)
        assert 0 < loader.discarded <= 2 * workers * (changes + 3)
    else:
        assert loader.discarded == 0


def collate_where(samples):
    info = torch.utils.data.get_worker_info()
    return collate_ids(samples) + (torch.tensor(-1 if info is None else info.id),)


def test_workers_collate_whole_micro_batches():
    run = make_run()
    workers = set()
    for ids, x, worker in run.dataloader(Indexed(64), num_workers=2, collate_fn=collate_where):
        workers.add(int(worker))
        run.optimizer.step()
    assert workers == {0, 1}


def test_accumulation_change_on_one_rung_discards_nothing():
    run = make_run()
    loader = run.dataloader(Indexed(304), num_workers=2, collate_fn=collate_ids)  # every pass ends at 304
    stream, _ = one_pass(run, loader, random.Random(1), plans=lambda run, rng: Plan(4, rng.choice([2, 4])))
    assert len({r["accumulation"] for r in run.history}) > 1
    assert loader.discarded == 0 and stream == list(range(304))


def test_dataset_smaller_than_a_step():
    """5 samples, plan 8 x 2: the one step of a pass takes epochs 0-2 and one sample of epoch 3."""
    run = make_run(batch_size=16, min_batch_size=16, max_batch_size=16)
    seen, steps = one_pass(run, run.dataloader(Indexed(5), shuffle=True, collate_fn=collate_ids))
    assert steps == [[8, 8]] and (run.epoch, run.state.position) == (3, 1)
    for e in range(3):
        assert sorted(seen[5 * e:5 * e + 5]) == list(range(5))


def test_drop_last_drops_only_the_partial_step():
    run = make_run(batch_size=32, max_micro_batch_size=16)
    seen, _ = one_pass(run, run.dataloader(Indexed(100), drop_last=True, collate_fn=collate_ids))
    assert seen == list(range(96)) and run.epoch == 1 and run.state.position == 0


class Counting:
    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)


@pytest.mark.parametrize("batch", [32, 64])
def test_epoch_tail_compiles_no_new_graph(batch):
    """103 samples, rungs 1..16, plan 16 x (batch/16): every tail (7 or 39 samples left) runs on rung 16."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counting = Counting()
    model = torch.compile(torch.nn.Linear(3, 1), backend=counting)
    run = sc.AdaptiveBatching(model, torch.optim.SGD(model.parameters(), lr=0.01), batch_size=batch,
                              min_batch_size=batch, max_batch_size=batch, max_micro_batch_size=16,
                              group_mode="microsteps", symbolic_batch=False)
    before = counters["stats"]["unique_graphs"]
    stream = []
    for p in range(3):
        for ids, x in run.dataloader(Indexed(103), shuffle=True, collate_fn=collate_ids):
            model(x).pow(2).mean().backward()
            run.optimizer.step()
            run.optimizer.zero_grad()
            stream += ids.tolist()
    check_epochs(stream, 103, 3, run)
    assert {r["micro_batch_size"] for r in run.history} == {16}
    assert counting.graphs == 1 and counters["stats"]["unique_graphs"] - before == 1
    run.close()


def target(x):
    return x.sum(1, keepdim=True).sin()


def train_recording(run, model, loader, passes, after_pass=lambda p, steps: None):
    """``passes`` passes of ``loader``: each step's sample ids and the gradient the optimizer stepped on."""
    grads, steps, ids_of_step = [], [], []
    params = list(run.optimizer.optimizer.param_groups[0]["params"])
    run.optimizer.optimizer.register_step_pre_hook(
        lambda opt, *_: grads.append(torch.cat([p.grad.flatten() for p in params])))
    for p in range(passes):
        for ids, x in loader:
            torch.nn.functional.mse_loss(model(x), target(x)).backward()
            ids_of_step += ids.tolist()
            run.optimizer.step()
            run.optimizer.zero_grad()
            if run.optimizer.stepped:
                steps.append(ids_of_step)
                ids_of_step = []
        after_pass(p, steps)
    return steps, grads


def assert_mean_gradients(steps, grads, model, n, atol):
    """Each step's gradient is an fp64 plain backward's over exactly that step's samples."""
    for ids, g in zip(steps, grads):
        ref = copy.deepcopy(model).double()
        x = torch.stack([Indexed(n)[i]["x"] for i in ids]).double()
        torch.nn.functional.mse_loss(ref(x), target(x)).backward()
        torch.testing.assert_close(g.double(), torch.cat([p.grad.flatten() for p in ref.parameters()]),
                                   rtol=1e-5, atol=atol)


def test_tail_step_is_the_mean_gradient_of_its_samples():
    """10 samples, plan 4 x 2: pass 1 runs 8, then a tail of 2 + 6 of epoch 1; pass 2 a tail of 4 + 4 of
    epoch 2. Each step's gradient equals an fp64 reference over exactly that step's samples."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    run = sc.AdaptiveBatching(model, torch.optim.SGD(model.parameters(), lr=0.0), batch_size=8, min_batch_size=8,
                              max_batch_size=8, max_micro_batch_size=4, group_mode="microsteps",
                              symbolic_batch=False)
    steps, grads = train_recording(run, model, run.dataloader(Indexed(10), shuffle=True, collate_fn=collate_ids), 2)
    assert [len(s) for s in steps] == [8, 8, 8] and {r["micro_batch_size"] for r in run.history} == {4}
    check_epochs(sum(steps, []), 10, 2, run)
    assert run.state.position == 4
    assert_mean_gradients(steps, grads, model, 10, atol=1e-7)


@pytest.mark.parametrize("n, workers", [(103, 0), (61, 2)])
def test_symbolic_tail_is_the_epochs_last_samples_on_the_one_graph(n, workers):
    """symbolic_batch=True, plan 16 x 2: each pass ends exactly on its epoch's last sample (103 = 3 x 32 + 7: a
    tail of 4 + 3), one graph runs every size, and each step's gradient is the fp64 mean over exactly its samples."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    counting = Counting()
    eager = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    model = torch.compile(eager, backend=counting)
    run = sc.AdaptiveBatching(model, torch.optim.SGD(model.parameters(), lr=0.0), batch_size=32, min_batch_size=32,
                              max_batch_size=32, max_micro_batch_size=16, group_mode="microsteps",
                              symbolic_batch=True)
    before = counters["stats"]["unique_graphs"]

    def epoch_ends_exactly(p, steps):
        assert run.state.position == 0 and run.epoch == p + 1
        check_epochs(sum(steps, []), n, p + 1, run)

    loader = run.dataloader(Indexed(n), shuffle=True, num_workers=workers, collate_fn=collate_ids)
    steps, grads = train_recording(run, model, loader, 3, epoch_ends_exactly)
    tail = [r["batch_size"] for r in run.history][n // 32::n // 32 + 1]
    assert tail == [n % 32] * 3 and counting.graphs == 1 and counters["stats"]["unique_graphs"] - before == 1
    assert_mean_gradients(steps, grads, eager, n, atol=1e-6)  # a plain fp32 step of 32 is up to 3.5e-7 off fp64
    run.close()


def test_state_after_a_padded_tail_resumes_the_stream_exactly():
    run = make_run()
    loader = run.dataloader(Indexed(37), shuffle=True, collate_fn=collate_ids)
    one_pass(run, loader, random.Random(3))
    assert run.state.position > 0, "the tail should have borrowed from epoch 1"
    state = copy.deepcopy(run.state_dict())
    expected, _ = one_pass(run, loader, random.Random(4))
    fresh = make_run()
    fresh.load_state_dict(state)
    got, _ = one_pass(fresh, fresh.dataloader(Indexed(37), shuffle=True, collate_fn=collate_ids), random.Random(4))
    assert got == expected


@pytest.mark.parametrize("workers", [0, 2])
def test_iterable_dataset_streams_the_current_rung(workers):
    run = make_run()
    rng = random.Random(5)
    loader = run.dataloader(Stream(53), num_workers=workers, collate_fn=collate_ids)
    stream = []
    for p in range(3):
        seen, steps = one_pass(run, loader, rng)
        stream += seen
        check_epochs(stream, 53, p + 1, run)
        assert all(s in run.ladder.rungs and len(set(step)) == 1 for step in steps for s in step)
    assert stream == [i % 53 for i in range(len(stream))]


def test_iterable_dataset_resumes_by_skipping():
    run = make_run()
    loader = run.dataloader(Stream(53), collate_fn=collate_ids)
    seen = []
    for ids, _ in loader:
        seen += ids.tolist()
        run.optimizer.step()
        if run.optimizer.stepped and len(run.history) == 3:
            break
    state = copy.deepcopy(run.state_dict())
    fresh = make_run()
    fresh.load_state_dict(state)
    rest, _ = one_pass(fresh, fresh.dataloader(Stream(53), collate_fn=collate_ids))
    assert seen + rest == [i % 53 for i in range(len(seen) + len(rest))] and len(seen) + len(rest) >= 53


def test_iterable_dataset_refuses_shuffle_and_data_parallel():
    run = make_run()
    with pytest.raises(ValueError, match="shuffle"):
        run.dataloader(Stream(10), shuffle=True)
    run.world_size = 2  # as under torch.distributed
    with pytest.raises(ValueError, match="data parallelism.*map-style"):
        run.dataloader(Stream(10))


@pytest.mark.parametrize("symbolic", [False, True])
def test_batch_dim_marked_static_or_dynamic(symbolic):
    run = make_run(symbolic_batch=symbolic)
    ids, x = next(iter(run.dataloader(Indexed(40), collate_fn=collate_ids)))
    mark = "_dynamo_weak_dynamic_indices" if symbolic else "_dynamo_static_indices"
    other = "_dynamo_static_indices" if symbolic else "_dynamo_weak_dynamic_indices"
    for t in (ids, x):
        assert 0 in getattr(t, mark, set()) and 0 not in getattr(t, other, set())


def test_rejects_batch_size_and_out_of_order_kwargs():
    with pytest.raises(TypeError, match="batch_size"):
        make_run().dataloader(Indexed(10), batch_size=4)
    with pytest.raises(TypeError, match="in_order"):
        make_run().dataloader(Indexed(10), in_order=False)


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
            assert _Orders(n, shuffle, 5, world, rank, drop_last).length == len(ref)
