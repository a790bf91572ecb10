"""The FSDP2 checks dist_worker.py runs by name (``fsdp``, ``fsdp_uneven``, ``fsdp_bf16``,
``fsdp_bf16_reduce``, ``fsdp_accum``, ``fsdp_dcp_save``, ``fsdp_dcp_load``); the checkpoint directory of the last two is ``$SIMIGRAD_FSDP_CKPT``."""

from __future__ import annotations

import os

import torch


def run_fsdp_case(name: str, rank: int, world: int) -> None:
    from simigrad_testkit.fsdp_check import run_fsdp_check  # noqa: PLC0415 - torch.distributed is up by now

    uneven = [[3 + 2 * r for r in range(world)], [5] * world]
    if world >= 3:
        uneven.append([0 if r == world - 2 else 4 + r for r in range(world)])
    if name == "fsdp":
        run_fsdp_check(name, rank, world, sizes=[8, 5, 11], width=63)
    elif name == "fsdp_uneven":
        run_fsdp_check(name, rank, world, sizes=uneven, counts=True, width=63)
    elif name == "fsdp_bf16":
        run_fsdp_check(name, rank, world, sizes=[16, 9], bf16=True)
    elif name == "fsdp_bf16_reduce":
        run_fsdp_check(name, rank, world, sizes=[16, 9], bf16=True, reduce_dtype=torch.bfloat16, grad_tol=2e-2,
                       stats_tol=3e-2)
    elif name == "fsdp_accum":
        run_fsdp_check(name, rank, world, sizes=[6, 4], micro=3)
    elif name in ("fsdp_dcp_save", "fsdp_dcp_load"):
        from simigrad_testkit.fsdp_dcp_check import run_dcp_load, run_dcp_save  # noqa: PLC0415

        directory = os.environ["SIMIGRAD_FSDP_CKPT"]
        (run_dcp_save if name == "fsdp_dcp_save" else run_dcp_load)(directory, rank, world)
    else:
        raise ValueError(f"unknown fsdp check {name!r}")
