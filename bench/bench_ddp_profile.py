"""Where the data-parallel step's time goes, ours against plain DDP (gloo, CPU): per-thread CPU time and a sampled
profile of every rank.

    python bench/bench_ddp_profile.py --world 2 --width 512            # thread CPU table, both schemes interleaved
    python bench/bench_ddp_profile.py --world 2 --width 512 --pyspy ours --seconds 8   # + py-spy of each rank

Per step and rank: wall time of forward+backward, and the CPU time (``/proc/self/task/*/schedstat``) of each
thread, grouped as ``main`` (forward, backward, DDP's reducer and the comm hook), ``simigrad-*`` (the hook's stage
threads) and ``other`` (gloo's and torch's C++ threads: plain DDP's all-reduce runs there). With N processes on
fewer cores, the sum of every rank's CPU time over ``cores x wall`` says how CPU-bound the step is.

``--pyspy SCHEME`` runs that scheme alone for ``--seconds`` under ``py-spy record --threads --idle`` (one
profile per rank, ``--gil``: only samples holding the GIL) and prints the top functions of each thread.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_ddp import Net  # noqa: E402

def thread_cpu() -> dict:
    """CPU seconds of each live thread of this process, by thread id (``schedstat``: nanoseconds on a CPU)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0]) * 1e-9
        except OSError:
            continue
    return out


def group_of(tid: int) -> str:
    if tid == threading.main_thread().native_id:
        return "main"
    for t in threading.enumerate():
        if t.native_id == tid:
            return t.name if t.name.startswith("simigrad") else "py-other"
    return "other"


def worker(args) -> None:
    from simigrad_compile.distributed import enable_ddp

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    net = Net(args.width)
    models = {}
    for s in ("plain", "ours"):
        m = Net(args.width)
        m.load_state_dict(net.state_dict())
        models[s] = DDP(m, bucket_cap_mb=args.bucket_mb)
    enable_ddp(models["ours"])
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(args.batch, args.width, generator=gen), torch.randint(0, 10, (args.batch,), generator=gen)

    def step(name):
        m = models[name]
        m.zero_grad(set_to_none=True)
        dist.barrier()
        c0, t0 = thread_cpu(), time.perf_counter()
        F.cross_entropy(m(x), y).backward()
        t1, c1 = time.perf_counter(), thread_cpu()
        cpu = collections.Counter()
        for tid, v in c1.items():
            cpu[group_of(tid)] += v - c0.get(tid, 0.0)
        return t1 - t0, cpu

    for _ in range(5):
        for name in models:
            step(name)
    if args.pyspy:
        dist.barrier()
        out = os.path.join(args.dir, f"rank{rank}.txt")
        prof = subprocess.Popen([args.pyspy_bin, "record", "--pid", str(os.getpid()), "--threads", "--idle",
                                 "--format", "raw", "--rate", "250", "--nonblocking", "-o", out,
                                 *(["--gil"] if args.gil else [])],
                                stdout=subprocess.DEVNULL, stderr=open(out + ".err", "w"))
        time.sleep(1.5)
        end = time.perf_counter() + args.seconds
        n = 0
        while True:
            flag = torch.tensor([float(time.perf_counter() < end)])
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if not flag.item():
                break
            step(args.pyspy)
            n += 1
        prof.send_signal(2)
        prof.wait()
        if rank == 0:
            print(f"pyspy: {n} steps of {args.pyspy}", flush=True)
        dist.barrier()
    rows = []
    for rep in range(args.repeats):
        order = ("plain", "ours") if rep % 2 == 0 else ("ours", "plain")
        for name in order:
            wall, cpu = step(name)
            rows.append({"scheme": name, "wall": wall, "cpu": dict(cpu)})
    every = [None] * world
    dist.all_gather_object(every, rows)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(every, f)
    dist.destroy_process_group()


def summarize(per_rank, world: int) -> dict:
    out = {}
    for scheme in ("plain", "ours"):
        steps = list(zip(*[[r for r in rows if r["scheme"] == scheme] for rows in per_rank]))
        walls = [max(s["wall"] for s in step) for step in steps]
        groups = sorted({g for step in steps for s in step for g in s["cpu"]})
        cpu = {g: statistics.mean(sum(s["cpu"].get(g, 0.0) for s in step) / world for step in steps) for g in groups}
        total = statistics.mean(sum(sum(s["cpu"].values()) for s in step) for step in steps)
        out[scheme] = {"wall_ms": statistics.median(walls) * 1e3, "cpu_ms_per_rank": {g: v * 1e3 for g, v in cpu.items()},
                       "cpu_all_ranks_over_wall": total / statistics.median(walls)}
    return out


def top_pyspy(path: str, k: int = 12) -> str:
    """Per thread: samples and the top self frames (raw py-spy output: 'thread;frame;frame count')."""
    by_thread = collections.defaultdict(collections.Counter)
    totals = collections.Counter()
    incl = collections.defaultdict(collections.Counter)
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            thread, n = frames[0], int(n)
            totals[thread] += n
            by_thread[thread][frames[-1]] += n
            for fr in set(frames[1:]):
                incl[thread][fr] += n
    lines = []
    for thread, total in totals.most_common():
        lines.append(f"  {thread}: {total} samples")
        for fr, n in by_thread[thread].most_common(k):
            lines.append(f"      self {n:>6} ({n / total:4.0%})  {fr[:130]}")
        for fr, n in incl[thread].most_common(k):
            if "simigrad" in fr or "hook" in fr or "wait" in fr or "backward" in fr:
                lines.append(f"      incl {n:>6} ({n / total:4.0%})  {fr[:130]}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--bucket-mb", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--pyspy", choices=["plain", "ours"])
    p.add_argument("--gil", action="store_true", help="py-spy: only samples that hold the GIL")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--pyspy-bin", default="py-spy")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--out")
    p.add_argument("--dir")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    d = tempfile.mkdtemp()
    out = os.path.join(d, "rows.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.world}", __file__,
           "--worker", "--out", out, "--dir", d, "--world", str(args.world), "--width", str(args.width),
           "--batch", str(args.batch), "--bucket-mb", str(args.bucket_mb), "--repeats", str(args.repeats),
           "--seconds", str(args.seconds), "--pyspy-bin", args.pyspy_bin,
           *(["--pyspy", args.pyspy] if args.pyspy else []), *(["--gil"] if args.gil else [])]
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    with open(out) as f:
        per_rank = json.load(f)
    summary = summarize(per_rank, args.world)
    print(f"world {args.world} width {args.width} loadavg {os.getloadavg()}")
    for s, v in summary.items():
        print(f"  {s:>5}: wall {v['wall_ms']:6.2f} ms  cpu(all ranks)/wall {v['cpu_all_ranks_over_wall']:.2f}  per rank: "
              + "  ".join(f"{g} {ms:.2f}" for g, ms in sorted(v["cpu_ms_per_rank"].items())))
    print(f"  ours/plain wall {summary['ours']['wall_ms'] / summary['plain']['wall_ms']:.3f}")
    if args.pyspy:
        for r in range(args.world):
            path = os.path.join(d, f"rank{r}.txt")
            if os.path.exists(path):
                print(f"rank {r} ({args.pyspy}{', GIL holders' if args.gil else ''}):")
                print(top_pyspy(path))


if __name__ == "__main__":
    main()
