"""An ordinary DDP loop, as a user writes it (``DistributedDataParallel``, a ``DistributedSampler``, its
``DataLoader``, ``torch.compile``), launched by ``cd tests && torchrun --nproc_per_node=2 -m
simigrad_testkit.autoload_dist_worker OUT TAG BATCH EPOCHS COMPILE`` with or without ``SIMIGRAD=1``.

The loop itself never imports simigrad_compile. After it, the worker records for the test: this rank's parameters
(fp64, flat), under ``SIMIGRAD=1`` the door's history, and how many backward passes reduced through the split
reduction (``ddp_hook`` calls on DDP's last bucket), in ``OUT/TAG-rank{r}.pt``.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

REDUCED = [0]


def count_reductions() -> None:
    """Count the backward passes that reduce through the split reduction (test instrumentation)."""
    import simigrad_compile.distributed as distributed

    hook = distributed.ddp_hook

    def counting(state, bucket):
        if bucket.is_last():
            REDUCED[0] += 1
        return hook(state, bucket)

    distributed.ddp_hook = counting


def problem():
    """The data set (128 samples) and the initial network, the same in every process that calls it."""
    torch.manual_seed(0)
    x = torch.randn(128, 8)
    y = (x @ torch.randn(8, 1)).sin() + 0.3 * torch.randn(128, 1)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    return TensorDataset(x, y), net


def main(out: str, tag: str, batch: str, epochs: str, compile: str) -> None:
    simigrad = os.environ.get("SIMIGRAD") == "1"
    if simigrad:
        count_reductions()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    data, net = problem()
    ddp = DistributedDataParallel(net)
    model = torch.compile(ddp) if compile == "1" else ddp
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=int(batch), sampler=sampler)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(int(epochs)):
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            loss.backward()
            opt.step()
    result = {"params": torch.cat([p.detach().double().flatten() for p in net.parameters()]),
              "history": None, "reduced": REDUCED[0]}
    if simigrad:
        from simigrad_compile.integrations import auto_loop

        result["history"] = auto_loop.history(opt)
    torch.save(result, os.path.join(out, f"{tag}-rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
