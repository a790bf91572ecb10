"""Coverage census of the split pass on real third-party models (torchvision, timm, Hugging Face transformers).

    python bench/bench_coverage.py [--size small|full] [--only REGEX] [--compiler inductor|aot_eager]
                             [--batch 4] [--timeout 1200] [--json PATH]

Each model runs in a fresh subprocess. It is compiled with ``backend="simigrad"`` and runs one forward+backward
on random inputs at an even batch. Then:

- the gradient must equal plain ``torch.compile(backend="inductor")`` (eager for ``--compiler aot_eager``,
  which computes the same ops) within 1e-5
  relative (norm of the difference over all parameters). Where fp32 noise alone exceeds that (BatchNorm over
  a handful of values at a 1x1 feature map), it must be no farther from the fp64 gradient than twice the plain
  compile's own distance from it;
- ``gradient_stats(model)`` (``dot``, ``sq_norm_1``, ``sq_norm_2``, cosine) must match an independent fp64
  reference within 1e-4 (see ``coverage_reference.py``: two half-batch passes, or for BatchNorm in training
  mode the halves' contributions to the full-batch gradient), over the parameters the pass covered.

The compiled model runs in fp64 by default (``--dtype float32`` is there too): the census judges the graph
rewrite, not fp32 rounding. At 32x32 inputs and batch 4, BatchNorm normalises over as few as 4 values, and fp32
rounding alone then moves a gradient by up to 2.5e-3 (eager fp32 against fp64, timm's tf_efficientnet_lite0).

Statuses: ``split`` (every parameter split, statistics right), ``refused`` (some parameters refused, with each
reason, and the rest right), ``wrong`` (a gradient or a statistic off), ``error`` (a crash or a timeout),
``skipped`` (does not build at 32x32/64x64, or larger than ``--max-params``), ``noref`` (no reference is
defined, see coverage_reference.py); with ``--symbolic`` (the batch dim dynamic, as ``symbolic_batch=True``
marks it; ``bench_coverage_symbolic.py``) also ``specializes`` (the model's code made the batch size a constant)
and ``recompiles`` (a second batch size compiles another graph). A table is printed and the records are saved as
JSON
(default ``bench/results/coverage-<compiler>-<size>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
GRAD_TOL, STATS_TOL = 1e-5, 1e-4


def _flat(grads: dict, names) -> "torch.Tensor":
    import torch

    return torch.cat([grads[n].double().flatten() for n in names]) if names else torch.zeros(0, dtype=torch.float64)


# Two forwards of a dropout-free model may differ in the last bits (the CPU BLAS may split a product differently
# from call to call: alignment, threads); dropout differs by O(1). The bound, in ulps of the output's largest value:
FORWARD_JITTER_ULPS = 1000


def _relative_jitter(o1, o2) -> float:
    return ((o1 - o2).abs().max() / o1.abs().max().clamp_min(1e-30)).item()


def _param_grads(model):
    import torch

    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters() if p.requires_grad}


def _step(model, loss_of, batch, backend, compiler):
    """One forward+backward of ``model`` compiled with ``backend`` (``eager``: not compiled)."""
    import torch

    torch._dynamo.reset()
    options = {"compiler": compiler} if backend == "simigrad" else None
    compiled = model if backend == "eager" else torch.compile(model, backend=backend, options=options)
    t = time.perf_counter()
    loss_of(compiled, batch).backward()
    return compiled, time.perf_counter() - t


def run_one(spec, compiler: str, b: int, max_params: int, dtype_name: str = "float64",
            symbolic: bool = False) -> dict:
    """One model (a ``coverage_models.Spec`` or its name): the whole check, in this process. Returns the record.
    ``symbolic``: the batch dim marked dynamic, and a second batch size on the same graph
    (``bench_coverage_symbolic``)."""
    import bench_torchvision_cpu as torchvision_cpu

    torchvision_cpu.ensure_importable()
    import copy

    import torch

    import bench_coverage_models as cm
    import bench_coverage_reference as ref
    import bench_coverage_symbolic as sym
    import simigrad_compile

    if isinstance(spec, str):
        spec = next(s for s in cm.all_specs() if s.name == spec)
    rec: dict = {"model": spec.name, "family": spec.family, "batch": b, "compiler": compiler, "symbolic": symbolic}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    try:
        model, batch, loss_of = spec.build(b)
    except cm.NotBuildable as e:
        return {**rec, "status": "skipped", "error": str(e)}
    dtype = getattr(torch, dtype_name)
    rec["dtype"] = dtype_name
    model = model.to(dtype)
    batch = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.items()}
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    rec["params"] = n_params
    if n_params > max_params:
        return {**rec, "status": "skipped", "error": f"{n_params / 1e6:.0f}M parameters > --max-params"}
    rec["train_batchnorm"] = ref.has_train_batchnorm(model)
    rec["input"] = {k: list(v.shape) for k, v in batch.items()}
    with torch.no_grad():  # dropout-free: two forwards agree (BatchNorm's running stats aside)
        probe = copy.deepcopy(model)
        o1, o2 = (probe(**batch) if spec.family == "transformers" else probe(batch["x"]) for _ in range(2))
        o1, o2 = (o.logits if hasattr(o, "logits") else o for o in (o1, o2))
        o1, o2 = (o[0] if isinstance(o, (tuple, list)) else o for o in (o1, o2))
        rec["forward_jitter"] = _relative_jitter(o1, o2)
        if rec["forward_jitter"] > FORWARD_JITTER_ULPS * torch.finfo(dtype).eps:
            return {**rec, "status": "error", "error": "the forward is not deterministic (dropout left on?)"}
    del probe
    reference_model, baseline = copy.deepcopy(model), copy.deepcopy(model)
    rec["build_s"] = time.perf_counter() - t0
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    rec["baseline"] = "inductor" if compiler == "inductor" else "eager"  # plain aot_eager computes eager's ops

    try:
        _, rec["baseline_step_s"] = _step(baseline, loss_of, batch, rec["baseline"], compiler)
    except Exception as e:  # noqa: BLE001 -- torch itself fails on this model: not the pass's doing
        return {**rec, "status": "error",
                "error": f"plain {rec['baseline']} fails too: {type(e).__name__}: {e}"[:2000]}
    want = _param_grads(baseline)
    del baseline
    before = sym.specialized_so_far()
    compiled, rec["simigrad_step_s"] = _step(model, loss_of, sym.mark(batch) if symbolic else batch, "simigrad",
                                             compiler)
    got = _param_grads(model)
    rec["specialized"] = {k: v - before.get(k, 0) for k, v in sym.specialized_so_far().items() if v > before.get(k, 0)}
    stats = simigrad_compile.gradient_stats(model, reset=True, per_parameter=True)
    rec.update(mode=stats.mode, unsplit=dict(stats.unsplit), missing=list(stats.missing))
    rec["stats"] = {"dot": stats.dot, "sq_norm_1": stats.sq_norm_1, "sq_norm_2": stats.sq_norm_2,
                    "cosine": stats.cosine}
    g_got, g_want = _flat(got, names), _flat(want, names)
    rec["grad_rel_err"] = ((g_got - g_want).norm() / g_want.norm().clamp_min(1e-30)).item()

    t = time.perf_counter()
    model64, batch64 = ref.double_copy(reference_model, batch)
    try:
        if rec["train_batchnorm"]:
            g1, g2, full = ref.contributions_reference(model64, loss_of, batch64, b)
            rec["reference"] = "contributions (BatchNorm in training mode)"
        else:
            g1, g2, full = ref.half_batch_reference(model64, loss_of, batch64, b)
            rec["reference"] = "two half-batch passes"
    except ref.ReferenceUndefined as e:
        g1 = None
        rec["reference_error"] = str(e)
        model64.zero_grad(set_to_none=True)
        loss_of(model64, batch64).backward()
        full = _param_grads(model64)
    rec["reference_s"] = time.perf_counter() - t
    problems = []
    g_full = _flat(full, names)
    rel = lambda x, y: ((x - y).norm() / y.norm().clamp_min(1e-30)).item()  # noqa: E731
    rec["grad_vs_fp64_rel_err"], rec["baseline_vs_fp64_rel_err"] = rel(g_got, g_full), rel(g_want, g_full)
    # fp32 noise of an ill-conditioned model (BatchNorm over a few values) can exceed GRAD_TOL between two
    # correct compilers: then the gradient is judged by its distance from the fp64 one, against the baseline's
    if not (rec["grad_rel_err"] <= GRAD_TOL
            or rec["grad_vs_fp64_rel_err"] <= max(GRAD_TOL, 2 * rec["baseline_vs_fp64_rel_err"])):
        problems.append(f"gradient differs from {rec['baseline']}: rel err {rec['grad_rel_err']:.2e} "
                        f"(fp64: ours {rec['grad_vs_fp64_rel_err']:.2e}, "
                        f"baseline {rec['baseline_vs_fp64_rel_err']:.2e})")
    if g1 is not None:
        covered = [n for n in names if n not in set(stats.missing)]
        a1, a2 = _flat(g1, covered), _flat(g2, covered)
        d, a, bb = (a1 @ a2).item(), (a1 @ a1).item(), (a2 @ a2).item()
        cos = d / (a * bb) ** 0.5 if a > 0 and bb > 0 else float("nan")
        rec["expected"] = {"dot": d, "sq_norm_1": a, "sq_norm_2": bb, "cosine": cos, "params": len(covered)}
        if covered and stats.mode != "none":
            scale = (a * bb) ** 0.5
            errs = {"dot": abs(stats.dot - d) / max(scale, 1e-300),
                    "sq_norm_1": abs(stats.sq_norm_1 - a) / max(a, 1e-300),
                    "sq_norm_2": abs(stats.sq_norm_2 - bb) / max(bb, 1e-300),
                    "cosine": abs(stats.cosine - cos)}
            rec["stats_err"] = errs
            problems += [f"{k} off by {v:.2e}" for k, v in errs.items() if not v <= STATS_TOL]
            if problems:
                rec["worst_parameters"] = _worst(stats.per_parameter or {}, g1, g2)
        elif covered and stats.mode == "none":
            problems.append("no statistics recorded, and no parameter reported missing")
    if symbolic and not problems:
        rec["symbolic"] = sym.second_size(compiled, model, spec, b, dtype, loss_of)
    rec["problems"] = problems
    if problems:
        rec["status"] = "wrong"
    elif rec["specialized"]:
        rec["status"] = "specializes"
    elif symbolic and rec["symbolic"]["graphs_after"] > rec["symbolic"]["graphs_before"]:
        rec["status"] = "recompiles"
    elif g1 is None and stats.mode != "none":
        rec["status"] = "noref"
    elif stats.unsplit or stats.missing or stats.mode != "batch":
        rec["status"] = "refused"
    else:
        rec["status"] = "split"
    rec["reasons"] = reasons(rec)
    return rec


def _worst(per_parameter: dict, g1: dict, g2: dict, k: int = 5) -> list:
    """The parameters whose (d, a, b) deviate most from the reference, for diagnosis."""
    rows = []
    for name, got in per_parameter.items():
        if name not in g1:
            continue
        x, y = g1[name].flatten(), g2[name].flatten()
        want = ((x @ y).item(), (x @ x).item(), (y @ y).item())
        scale = max(want[1], want[2], 1e-300)
        rows.append((max(abs(u - v) for u, v in zip(got, want)) / scale, name, got, want))
    rows.sort(reverse=True)
    return [{"param": n, "rel_dev": e, "got": g, "want": w} for e, n, g, w in rows[:k]]


def reasons(rec: dict) -> dict:
    """Reason -> how many parameters it refused (parameters missing without a reason are counted too)."""
    out: dict = {}
    for why in rec.get("unsplit", {}).values():
        out[why] = out.get(why, 0) + 1
    silent = [n for n in rec.get("missing", []) if n not in rec.get("unsplit", {})]
    if silent:
        out["no statistics (not in a compiled graph: a graph break or an untraced module)"] = len(silent)
    return out


def _worker(args) -> None:
    try:
        rec = run_one(args.worker, args.compiler, args.batch, args.max_params, args.dtype, args.symbolic)
    except Exception as e:  # noqa: BLE001 -- a crash of the model's compile or step is a census result
        rec = {"model": args.worker, "status": "error", "error": f"{type(e).__name__}: {e}"[:2000],
               "traceback": traceback.format_exc()[-4000:]}
    with open(args.out, "w") as f:
        json.dump(rec, f, default=str)


def census(names, compiler: str, b: int, timeout: float, max_params: int, cache_dir: str, log=print,
           on_record=None, dtype: str = "float64", records=None, symbolic: bool = False) -> list:
    """Each of ``names`` in its own worker; ``records`` (an earlier run's) are kept and their models not rerun."""
    records = list(records or [])
    names = [n for n in names if n not in {r["model"] for r in records}]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TORCHINDUCTOR_CACHE_DIR": cache_dir,
           "TORCHVISION_WARN_WHEN_EXTENSION_LOADING_FAILS": ""}
    for name in names:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        cmd = [sys.executable, os.path.join(HERE, "bench_coverage.py"), "--worker", name, "--out", out,
               "--compiler", compiler, "--batch", str(b), "--max-params", str(max_params), "--dtype", dtype,
               *(["--symbolic"] if symbolic else [])]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            try:
                with open(out) as fh:
                    rec = json.load(fh)
            except (OSError, ValueError):
                rec = {"model": name, "status": "error",
                       "error": f"worker died (exit {proc.returncode}): {proc.stderr[-1500:]}"}
        except subprocess.TimeoutExpired:
            rec = {"model": name, "status": "error", "error": f"timeout after {timeout:.0f} s"}
        finally:
            if os.path.exists(out):
                os.unlink(out)
        rec["wall_s"] = time.perf_counter() - t
        rec.setdefault("reasons", reasons(rec))
        records.append(rec)
        log(row(rec))
        if on_record is not None:
            on_record(records)
    return records


def row(rec: dict) -> str:
    return f"{rec['model']:<36} {rec['status']:<8} {rec.get('wall_s', 0):7.1f}s  {explain(rec)}"


def explain(rec: dict) -> str:
    """Why a model is not ``split``: the refusal reasons, the problems, the error or the skip."""
    why = "; ".join(f"{r} (x{n})" for r, n in rec.get("reasons", {}).items())
    if rec["status"] in ("error", "skipped"):
        why = " ".join(line.strip() for line in rec.get("error", "").splitlines()[:2])[:200]
    if rec["status"] == "wrong":
        why = "; ".join(rec.get("problems", []))
    if rec["status"] == "noref":
        why = rec.get("reference_error", "")
    if rec["status"] == "specializes":
        why = "the batch size made a constant at " + ", ".join(rec.get("specialized", {}))
    return why


def markdown(records: list) -> str:
    """The census as a README table: model, status, reasons, wall time."""
    lines = ["| model | status | reasons | time |", "| --- | --- | --- | --- |"]
    for r in records:
        why = explain(r) if r["status"] != "split" else ""
        lines.append(f"| {r['model']} | {r['status']} | {why.replace('|', '/')} | {r.get('wall_s', 0):.0f} s |")
    s = summary(records)
    lines.append(f"\n{s['fully_split']}/{s['counted']} fully split ({100 * s['fraction_fully_split']:.0f}%)")
    return "\n".join(lines)


def summary(records: list) -> dict:
    counted = [r for r in records if r["status"] != "skipped"]
    by = {}
    for r in records:
        by[r["status"]] = by.get(r["status"], 0) + 1
    split = by.get("split", 0)
    return {"counts": by, "counted": len(counted), "fully_split": split,
            "fraction_fully_split": split / len(counted) if counted else float("nan")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["small", "full"], default="small")
    p.add_argument("--only", default=None, help="regular expression on model names")
    p.add_argument("--compiler", choices=["inductor", "aot_eager"], default="inductor")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                   help="of the compiled model and its baseline (the references are always fp64)")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per model")
    p.add_argument("--max-params", type=int, default=150_000_000, help="larger models are skipped (memory)")
    p.add_argument("--cache-dir", default=None, help="Inductor cache (default: a fresh one, so every pass runs)")
    p.add_argument("--symbolic", action="store_true",
                   help="the batch dim marked dynamic (symbolic_batch=True) and a second batch size on the graph")
    p.add_argument("--json", default=None)
    p.add_argument("--resume", action="store_true",
                   help="keep the records already in --json (but timeouts) and run only the models it lacks")
    p.add_argument("--list", action="store_true", help="print the selected models and exit")
    p.add_argument("--table", metavar="JSON", help="print a saved census as a markdown table and exit")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, HERE)
    if args.worker:
        _worker(args)
        return 0
    if args.table:
        with open(args.table) as f:
            print(markdown(json.load(f)["models"]))
        return 0
    if args.batch < 2 or args.batch % 2:
        p.error("--batch must be even and >= 2")
    import bench_torchvision_cpu as torchvision_cpu

    torchvision_cpu.ensure_importable()
    import bench_coverage_models as cm

    names = [s.name for s in cm.select(args.size, args.only)]
    if args.list:
        print("\n".join(names))
        return 0
    cache = args.cache_dir or tempfile.mkdtemp(prefix="simigrad-census-cache-")
    print(f"census: {len(names)} models, compiler={args.compiler}, batch={args.batch}")
    t = time.perf_counter()
    name = f"coverage-{args.compiler}-{args.size}{'-symbolic' * args.symbolic}.json"
    path = args.json or os.path.join(HERE, "results", name)
    from bench_common import hardware, versions

    def save(records, done=False):  # after every model, so that an interrupted census keeps what it measured
        with open(path, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
                       "complete": done, "summary": summary(records), "versions": versions(),
                       "hardware": hardware("cpu"), "models": records}, f, indent=1, default=str)

    earlier = []
    if args.resume and os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        kept = {k: v for k, v in saved["args"].items()
                if k in ("compiler", "batch", "dtype", "max_params", "symbolic")}
        if kept != {k: getattr(args, k) for k in kept}:
            p.error(f"--resume: {path} was run with {kept}; pass the same options")
        earlier = [r for r in saved["models"]  # a timeout is the machine's, not the model's: run it again
                   if r["model"] in names and not str(r.get("error", "")).startswith("timeout")]
        print(f"census: resuming, {len(earlier)} of {len(names)} models already in {path}")
    records = census(names, args.compiler, args.batch, args.timeout, args.max_params, cache, on_record=save,
                     dtype=args.dtype, records=earlier, symbolic=args.symbolic)
    save(records, done=True)
    s = summary(records)
    print(f"\n{s['fully_split']}/{s['counted']} fully split ({100 * s['fraction_fully_split']:.0f}%), "
          f"counts {s['counts']}, {time.perf_counter() - t:.0f} s")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
