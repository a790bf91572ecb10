"""The split-group DDP reduction on NCCL (one GPU per rank): gradients against plain DDP, statistics against
every rank's local gradient all-gathered and combined in fp64, in fp32 and bf16.

    cd tests && torchrun --standalone --nproc_per_node=2 -m simigrad_testkit.nccl_worker      (bench/gpu.sh runs it when 2 GPUs exist)

Rank 0 prints ``CHECK nccl-<dtype> OK <worst errors>``; any failure raises (non-zero exit).
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import simigrad_compile
from simigrad_compile.distributed import enable_ddp


class MLP(torch.nn.Module):
    def __init__(self, width: int = 1024) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(3))
        self.head = torch.nn.Linear(width, 10)

    def forward(self, x):
        for layer in self.layers:
            x = F.gelu(layer(x))
        return self.head(x)


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.detach().double().flatten() for p in model.parameters()])


def check(dtype: torch.dtype, grad_tol: float, stats_tol: float, device: torch.device) -> str:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    net = MLP().to(device, dtype)
    local = copy.deepcopy(net)
    plain = DDP(copy.deepcopy(net), device_ids=[device.index], bucket_cap_mb=1)
    ours = DDP(copy.deepcopy(net), device_ids=[device.index], bucket_cap_mb=1)
    enable_ddp(ours)
    worst = {"grad": 0.0, "stats": 0.0}
    for step in range(3):
        gen = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(16, 1024, generator=gen).to(device, dtype)
        y = torch.randint(0, 10, (16,), generator=gen).to(device)
        for m in (local, plain, ours):
            m.zero_grad(set_to_none=True)
            F.cross_entropy(m(x).float(), y).backward()
        every = [torch.empty_like(flat_grad(local)) for _ in range(world)]
        dist.all_gather(every, flat_grad(local))
        half = world // 2
        g1, g2 = sum(every[:half]) / half, sum(every[half:]) / (world - half)
        want = torch.stack([g1 @ g2, g1 @ g1, g2 @ g2])
        ref_grad = flat_grad(plain)
        worst["grad"] = max(worst["grad"], float((flat_grad(ours) - ref_grad).norm() / ref_grad.norm()))
        s = simigrad_compile.gradient_stats(ours, reset=True)
        got = torch.tensor([s.dot, s.sq_norm_1, s.sq_norm_2], dtype=torch.float64, device=device)
        worst["stats"] = max(worst["stats"], float(((got - want).abs() / (want[1] * want[2]).sqrt()).max()))
    if worst["grad"] > grad_tol or worst["stats"] > stats_tol:
        raise AssertionError(f"nccl {dtype}: {worst} (tolerances {grad_tol}, {stats_tol})")
    return f"CHECK nccl-{str(dtype).removeprefix('torch.')} OK {worst}"


def main() -> None:
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    for dtype, grad_tol, stats_tol in ((torch.float32, 1e-5, 1e-5), (torch.bfloat16, 2e-2, 3e-2)):
        line = check(dtype, grad_tol, stats_tol, device)
        if dist.get_rank() == 0:
            print(line, flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
