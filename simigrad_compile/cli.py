"""``python -m simigrad_compile demo`` (also the ``simigrad`` console script)."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from typing import Optional, Sequence


def _parser() -> argparse.ArgumentParser:
    from .demo.settings import DemoSettings

    d = DemoSettings()
    parser = argparse.ArgumentParser(prog="python -m simigrad_compile")
    parser.add_argument("--version", action="version", version=f"simigrad-compile {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train fixed-batch, SimiGrad and equal-average-batch runs on the Python "
                                       "standard library's sources, then print and plot the results")
    demo.add_argument("--samples", type=int, help=f"training sequences per run ({d.samples})")
    demo.add_argument("--seeds", type=int, default=1, help="run N seeds (--seed, --seed+1, ...) and report means (1)")
    demo.add_argument("--seed", type=int, default=0, help="first seed (0)")
    demo.add_argument("--batch-size", type=int, help=f"B0 ({d.batch_size})")
    demo.add_argument("--target", type=float, help=f"target similarity ({d.target})")
    demo.add_argument("--max-batch-size", type=int, help=f"SimiGrad's upper bound ({d.max_batch_size})")
    demo.add_argument("--lr", type=float, help=f"peak AdamW LR at B0 ({d.lr})")
    demo.add_argument("--fixed-lr-scaling", choices=("sqrt", "none"),
                      help="run 3's LR: sqrt(B/B0) x lr like SimiGrad, or lr unscaled (sqrt)")
    demo.add_argument("--out", default="simigrad-demo", help="folder for results.json and the PNG plots")
    demo.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny model, no Inductor)")
    demo.add_argument("--threads", type=int, default=None, help="torch intra-op threads (torch's default; --quick: 1)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars: one line per evaluation instead")
    demo.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("simigrad-compile")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def _settings(args):
    from .demo.settings import QUICK, DemoSettings

    s = DemoSettings(**QUICK) if args.quick else DemoSettings()
    changes = {k: getattr(args, k) for k in ("samples", "batch_size", "target", "max_batch_size", "lr",
                                             "fixed_lr_scaling", "threads") if getattr(args, k) is not None}
    return s.replace(progress=not args.no_progress, **changes)


def demo(args) -> int:
    from .demo.experiment import run_demo
    from .demo.report import save_json, save_plots, table

    settings = _settings(args)
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    rank = _init_distributed()
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    seeds = run_demo(settings, list(range(args.seed, args.seed + args.seeds)))
    total = time.perf_counter() - start
    if rank > 0:
        return 0
    print()
    print(table(seeds))
    json_path = os.path.join(args.out, "results.json")
    save_json(json_path, settings, seeds, total, command=f"python -m simigrad_compile {shlex.join(args.argv)}")
    plots = save_plots(args.out, seeds, settings)
    print(f"\ntotal {total:.0f} s; wrote {json_path}, {', '.join(plots)}")
    return 0


def _init_distributed() -> int:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1): join the process group (gloo, or nccl on GPUs); returns the rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    import torch

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return torch.distributed.get_rank()


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return demo(args)
