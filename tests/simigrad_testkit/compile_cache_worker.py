"""One process of the compile-cache tests: warm a two-rung ladder, then check each rung's statistics.

``python -m simigrad_testkit.compile_cache_worker {load PATH | env}``: ``load`` calls ``load_compile_cache(PATH)``
first; ``env`` uses only ``SIMIGRAD_COMPILE_CACHE`` (set by the caller: loaded at start if the file exists,
saved after warm-up). Under torchrun each rank does the same on its own samples, with its own local Inductor cache.
Prints one JSON line; with ``OUT_DIR`` set, each rank also writes it to ``$OUT_DIR/rank<r>.json``.
"""

import glob
import json
import os
import sys

import torch
import torch.distributed as dist

import simigrad_compile
from simigrad_compile import compat
from simigrad_compile.compile.passes.split_backward import SplitBackwardPass
from simigrad_testkit.models import TinyGPT, half_reference

RUNGS = (2, 4)


def main(mode: str, path: str = None) -> dict:
    rank = 0
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        # each rank its own local cache, as on separate nodes: only the file travels between them
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], f"rank{rank}")
    torch.manual_seed(0)
    model = TinyGPT()
    torch.manual_seed(1 + rank)
    idx, tgt = torch.randint(0, 40, (8, 8)), torch.randint(0, 40, (8, 8))
    pass_runs = []
    original = SplitBackwardPass.__call__
    SplitBackwardPass.__call__ = lambda self, graph: (pass_runs.append(1), original(self, graph))[1]

    loaded = simigrad_compile.load_compile_cache(path) if mode == "load" else None
    compiled = torch.compile(model, backend="simigrad", options={"group_mode": "batch"})  # also under torchrun
    run = simigrad_compile.AdaptiveBatching(compiled, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=4,
                                            micro_batch_sizes=RUNGS, group_mode="batch",
                                            symbolic_batch=False)  # two static graphs through the cache
    if dist.is_initialized():
        dist.barrier()  # every rank has looked for the file before rank 0 can write it
    dataset = torch.utils.data.TensorDataset(idx, tgt)
    run.warm_up(lambda b: compiled(*b).backward(), dataset)
    warm_counters = compat.compile_cache_counters()

    rungs = {}
    for m in RUNGS:
        model.zero_grad(set_to_none=True)
        x, y = idx[:m].clone(), tgt[:m].clone()
        compat.mark_static(x, 0)
        compat.mark_static(y, 0)
        compiled(x, y).backward()
        stats = simigrad_compile.gradient_stats(model, reset=True)
        d, a, b, cos = half_reference(model, lambda rows: model(x[rows], y[rows]), m)
        rungs[m] = {"mode": stats.mode, "cosine": stats.cosine, "dot": stats.dot, "ref_cosine": cos, "ref_dot": d}
    run.close()
    door = run.compile_cache
    result = {"rank": rank, "loaded": loaded and loaded.artifacts, "saved": door.saved and door.saved.artifacts,
              "env_loaded": bool(door.loaded), "env_saved": bool(door.saved), "pass_runs": len(pass_runs),
              "warm_counters": warm_counters, "end_counters": compat.compile_cache_counters(), "rungs": rungs,
              "cpu_kernels_loaded": (loaded or door.loaded).cpu_kernels if (loaded or door.loaded) else None,
              "cpu_kernels_saved": door.saved.cpu_kernels if door.saved else None,
              # Inductor's built kernels (``<hash>.main.so``); the other ``.so`` files probe this CPU's ISA
              "so_files": len(glob.glob(os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "**", "*.main.so"),
                                        recursive=True))}
    if "RANK" in os.environ:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    out = main(*sys.argv[1:])
    text = json.dumps(out)
    if os.environ.get("OUT_DIR"):
        with open(os.path.join(os.environ["OUT_DIR"], f"rank{out['rank']}.json"), "w") as f:
            f.write(text)
    print(text)
