"""The global batches of an adaptive data-parallel run, rebuilt from its history: what a one-process fp64
reference trains on to be compared with the run."""

from __future__ import annotations

from torch.utils.data.distributed import DistributedSampler


def global_batches(data, history, world: int = 2, seed: int = 0):
    """For each history record, the sample indices of its step: rank r's samples are those of a shuffled
    ``DistributedSampler`` (``seed``, ``set_epoch`` each epoch); a step takes the next ``batch / world`` of each
    rank, in rank order, and a window ends with the epoch."""
    epoch, position, orders = 0, 0, None
    for r in history:
        if orders is None:
            orders = []
            for rank in range(world):
                sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=seed)
                sampler.set_epoch(epoch)
                orders.append(list(sampler))
        n = r["batch_size"] // world
        index = [i for order in orders for i in order[position:position + n]]
        assert len(index) == r["batch_size"], (len(index), r["batch_size"])
        yield r, index
        position += n
        if position == len(orders[0]):
            epoch, position, orders = epoch + 1, 0, None


def without_loss(history):
    """History records without ``loss``: the per-rank loss of a data-parallel step is that rank's own."""
    return [{k: v for k, v in r.items() if k != "loss"} for r in history]
