"""FSDP2 + split reduce-scatter checkpoints through ``torch.distributed.checkpoint`` (DCP), for dist_worker.py.

``fsdp_dcp_save`` (any world): 4 Adam steps on fixed global batches of 10 samples, split over the ranks (uneven
where 10 does not divide, with :func:`set_sample_counts`); a DCP checkpoint of model + optimizer after step 2,
the full (gathered) states after steps 2 and 4 as plain ``torch.save`` files. Then, in the same launch, a fresh
model loads the checkpoint and repeats steps 3-4: its state must equal the uninterrupted run's bit for bit.

``fsdp_dcp_load`` (another world size): a fresh model loads the checkpoint; its gathered state must equal the
saved full state of step 2 bit for bit (DCP reshards, it does not compute); steps 3-4 follow at this world size,
each checked against the fp64 reference of the two rank-halves' mean gradients (statistics and gradient), and the
end state must equal the uninterrupted run's to fp32 rounding (the same global batches, summed in another order).
"""

from __future__ import annotations

import copy
import os
from typing import Dict

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, get_state_dict, set_state_dict)

import simigrad_compile
from simigrad_compile.distributed import set_sample_counts
from simigrad_testkit.fsdp_check import check_stats, flat_grad, halves_reference, shard

GLOBAL = 10
FULL = StateDictOptions(full_state_dict=True)


def _model(seed: int):
    from simigrad_testkit.dist_worker import MLP  # noqa: PLC0415 - the worker is the importer

    torch.manual_seed(seed)
    model = shard(MLP())
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _counts(world: int):
    return [GLOBAL // world + (1 if r < GLOBAL % world else 0) for r in range(world)]


def _step(model, opt, step: int, rank: int, world: int, worst: Dict[str, float]) -> None:
    """One step on this rank's slice of global batch ``step``; checks the gradient and statistics against the
    fp64 halves reference computed from a plain copy of the current (gathered) parameters."""
    from simigrad_testkit.dist_worker import MLP  # noqa: PLC0415

    counts = _counts(world)
    lo = sum(counts[:rank])
    x, y = MLP.batch(GLOBAL, torch.Generator().manual_seed(500 + step))
    x, y = x[lo : lo + counts[rank]], y[lo : lo + counts[rank]]
    local = MLP()
    local.load_state_dict(get_model_state_dict(model, options=FULL))
    F.cross_entropy(local(x), y).backward()
    set_sample_counts(model, counts)
    F.cross_entropy(model(x), y).backward()
    ref_stats, ref_mean = halves_reference(flat_grad(local), counts)
    check_stats(simigrad_compile.gradient_stats(model, reset=True), ref_stats, worst)
    got = flat_grad(model)
    worst["grad"] = max(worst["grad"], float((got - ref_mean).norm() / ref_mean.norm()))
    opt.step()
    opt.zero_grad(set_to_none=True)


def _full_state(model, opt) -> Dict[str, Dict]:
    """The gathered model and optimizer states, copied (Adam's ``step`` tensors are updated in place)."""
    return copy.deepcopy({"model": get_model_state_dict(model, options=FULL),
                          "optim": get_optimizer_state_dict(model, opt, options=FULL)})


def _flat_items(tree, prefix=""):
    if isinstance(tree, dict):
        for k in sorted(tree, key=str):
            yield from _flat_items(tree[k], f"{prefix}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _flat_items(v, f"{prefix}/{i}")
    else:
        yield prefix, tree


def _compare(got, want, exact: bool) -> float:
    """Largest difference over every tensor of two full states (raises on a missing key or a shape change)."""
    a, b = dict(_flat_items(got)), dict(_flat_items(want))
    if a.keys() != b.keys():
        raise AssertionError(f"state keys differ: {sorted(set(a) ^ set(b))[:6]}")
    worst = 0.0
    for key, v in a.items():
        w = b[key]
        if not isinstance(v, torch.Tensor):
            assert v == w, (key, v, w)
            continue
        v, w = torch.as_tensor(v).double(), torch.as_tensor(w).double()
        if v.shape != w.shape or (exact and not torch.equal(v, w)):
            raise AssertionError(f"{key}: loaded state differs from the saved one")
        worst = max(worst, float((v - w).abs().max()) if v.numel() else 0.0)
    return worst


def run_dcp_save(directory: str, rank: int, world: int) -> None:
    model, opt = _model(0)
    worst = {"grad": 0.0, "stats": 0.0, "cos": 0.0}
    for step in range(2):
        _step(model, opt, step, rank, world, worst)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(directory, "step2"))
    full2 = _full_state(model, opt)
    for step in range(2, 4):
        _step(model, opt, step, rank, world, worst)
    full4 = _full_state(model, opt)
    if rank == 0:
        torch.save({"full2": full2, "full4": full4, "world": world}, os.path.join(directory, "full.pt"))

    resumed, ropt = _model(1)
    msd, osd = get_state_dict(resumed, ropt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=os.path.join(directory, "step2"))
    set_state_dict(resumed, ropt, model_state_dict=msd, optim_state_dict=osd)
    _compare(_full_state(resumed, ropt), full2, exact=True)
    for step in range(2, 4):
        _step(resumed, ropt, step, rank, world, worst)
    _compare(_full_state(resumed, ropt), full4, exact=True)
    _finish("fsdp_dcp_save", rank, worst, f"resumed at world {world}: bit-identical")


def run_dcp_load(directory: str, rank: int, world: int) -> None:
    saved = torch.load(os.path.join(directory, "full.pt"), weights_only=False)
    if saved["world"] == world:
        raise ValueError(f"fsdp_dcp_load: the checkpoint was saved at world {world}: launch another world size")
    model, opt = _model(1)
    msd, osd = get_state_dict(model, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=os.path.join(directory, "step2"))
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    _compare(_full_state(model, opt), saved["full2"], exact=True)
    worst = {"grad": 0.0, "stats": 0.0, "cos": 0.0}
    for step in range(2, 4):
        _step(model, opt, step, rank, world, worst)
    end = _full_state(model, opt)
    worst["param_vs_uninterrupted"] = _compare(end["model"], saved["full4"]["model"], exact=False)
    if worst["param_vs_uninterrupted"] > 1e-5:
        raise AssertionError(f"fsdp_dcp_load: parameters after resume at world {world} differ from the "
                             f"uninterrupted world-{saved['world']} run by {worst['param_vs_uninterrupted']}")
    _finish("fsdp_dcp_load", rank, worst, f"saved at world {saved['world']}, resumed at world {world}")


def _finish(name: str, rank: int, worst: Dict[str, float], note: str) -> None:
    if worst["grad"] > 1e-6 or worst["stats"] > 1e-5:
        raise AssertionError(f"{name}: worst errors {worst}")
    dist.barrier()
    if rank == 0:
        print(f"CHECK {name} OK ({note}) " + " ".join(f"{k}={v:.2e}" for k, v in worst.items()), flush=True)
