"""What the demo shows: the results table, the goal check, the JSON record and the PNG plots."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time

import torch

from .settings import DemoSettings
from .train import RunResult

GOAL_LOSS = 0.02
GOAL_STEPS = 2.0
SMOKE_NOTE = ("--quick is a smoke run (a 1-layer model, a few hundred sequences, no Inductor): it shows that the "
              "demo runs, and its figures and verdicts mean nothing at this size. Run without --quick to measure.")


def _mean(values) -> float:
    return statistics.fmean(values)


def summary(seeds: list) -> dict:
    """Means over seeds (each seed is ``[fixed B0, SimiGrad, fixed average]``) and the goal check."""
    base, ada, avg = ([runs[i] for runs in seeds] for i in range(3))
    vs_base = _mean((a.val_loss / b.val_loss - 1) for a, b in zip(ada, base))
    vs_avg = _mean((a.val_loss / c.val_loss - 1) for a, c in zip(ada, avg))
    fewer = _mean(b.steps / a.steps for a, b in zip(ada, base))
    return {
        "runs": [{"name": runs[0].name, "val_loss": _mean(r.val_loss for r in runs),
                  "steps": _mean(r.steps for r in runs), "average_batch": _mean(r.average_batch for r in runs),
                  "wall_s": _mean(r.wall_s for r in runs), "compile_s": _mean(r.compile_s for r in runs)}
                 for runs in (base, ada, avg)],
        "simigrad_vs_fixed_b0_loss": vs_base,
        "simigrad_vs_fixed_average_loss": vs_avg,
        "fewer_steps_than_fixed_b0": fewer,
        "goal": {"loss_within_2pct": vs_base <= GOAL_LOSS, "steps_2x_fewer": fewer >= GOAL_STEPS,
                 "no_worse_than_fixed_average": vs_avg <= 0.0},
    }


def table(seeds: list) -> str:
    head = f"{'seed':>4}  {'run':<22} {'batch':>9} {'val loss':>9} {'vs B0':>7} {'steps':>6} {'avg batch':>9} " \
           f"{'wall s':>7} {'compile s':>9}"
    lines = [head, "-" * len(head)]
    for runs in seeds:
        for r in runs:
            delta = 100 * (r.val_loss / runs[0].val_loss - 1)
            lines.append(f"{r.seed:>4}  {r.name:<22} {r.batch_size:>9} {r.val_loss:>9.4f} {delta:>+6.2f}% "
                         f"{r.steps:>6} {r.average_batch:>9.1f} {r.wall_s:>7.1f} {r.compile_s:>9.1f}")
    s = summary(seeds)
    if len(seeds) > 1:
        lines.append("-" * len(head))
        for run, role in zip(s["runs"], ("fixed B0", "SimiGrad", "fixed B=average")):
            lines.append(f"{'mean':>4}  {role:<22} {'':>9} {run['val_loss']:>9.4f} {'':>7} "
                         f"{run['steps']:>6.0f} {run['average_batch']:>9.1f} {run['wall_s']:>7.1f} "
                         f"{run['compile_s']:>9.1f}")
    g = s["goal"]
    smoke = any(r.smoke for runs in seeds for r in runs)
    # a smoke run's verdicts are noise: say so instead of printing yes/NO
    mark = (lambda ok: "not judged") if smoke else (lambda ok: "yes" if ok else "NO")  # noqa: E731
    lines += ["", f"SimiGrad vs fixed B0 (mean over {len(seeds)} seed(s)): loss {100 * s['simigrad_vs_fixed_b0_loss']:+.2f}% "
              f"(within 2%: {mark(g['loss_within_2pct'])}), {s['fewer_steps_than_fixed_b0']:.2f}x fewer optimizer "
              f"steps (>= 2x: {mark(g['steps_2x_fewer'])})",
              f"SimiGrad vs fixed average batch: loss {100 * s['simigrad_vs_fixed_average_loss']:+.2f}% "
              f"(no worse: {mark(g['no_worse_than_fixed_average'])})"]
    if smoke:
        lines.append(SMOKE_NOTE)
    return "\n".join(lines)


def _run_json(r: RunResult, with_history: bool) -> dict:
    out = {k: getattr(r, k) for k in ("name", "seed", "batch_size", "lr", "val_loss", "steps", "samples", "wall_s",
                                      "compile_s", "eval_s", "curve")}
    out["average_batch"] = r.average_batch
    if with_history:
        out["history"] = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in h.items()}
                          for h in r.history]
    return out


def environment() -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def save_json(path: str, settings: DemoSettings, seeds: list, total_s: float, command: str = "") -> None:
    doc = {"command": command, "settings": settings.as_dict(), "environment": environment(), "total_wall_s": total_s,
           "summary": summary(seeds),
           "seeds": [[_run_json(r, with_history=i == 1) for i, r in enumerate(runs)] for runs in seeds]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def save_plots(out_dir: str, seeds: list, settings: DemoSettings) -> list:
    """``loss.png`` (validation loss of the three runs) and ``simigrad.png`` (similarity, batch, LR multiplier)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = ("tab:blue", "tab:red", "tab:green")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, runs in enumerate(seeds):
        for r, c in zip(runs, colors):
            x, y = zip(*r.curve)
            ax.plot(x, y, color=c, marker="o", ms=3, lw=1.5 if k == 0 else 0.7, alpha=1 if k == 0 else 0.5,
                    label=f"{r.name} ({r.steps} steps)" if k == 0 else None)
    ax.set_xlabel("training samples (sequences)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(f"Same samples, three batch policies ({len(seeds)} seed(s))")
    ax.legend()
    fig.tight_layout()
    paths = [os.path.join(out_dir, "loss.png")]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(7, 8))
    for k, runs in enumerate(seeds):
        fixed, ada = runs[0], runs[1]
        x = [h["samples"] for h in ada.history]
        alpha = 1 if k == 0 else 0.4
        axes[0].plot(x, [h["cosine"] for h in ada.history], color=colors[1], lw=0.6, alpha=alpha,
                     label="SimiGrad" if k == 0 else None)
        if k == 0:
            axes[0].plot([h["samples"] for h in fixed.history], [h["cosine"] for h in fixed.history],
                         color=colors[0], lw=0.4, alpha=0.35, label=f"{fixed.name} (measured only)")
        axes[1].plot(x, [h["batch_size"] for h in ada.history], color=colors[1], lw=1, alpha=alpha,
                     label="realised" if k == 0 else None)
        axes[1].plot(x, [h["target_batch_size"] for h in ada.history], color="k", lw=0.6, ls="--", alpha=alpha,
                     label="controller target" if k == 0 else None)
        axes[2].plot(x, [h["lr_scale"] for h in ada.history], color=colors[1], lw=1, alpha=alpha)
    axes[0].axhline(settings.target, color="k", ls=":", lw=1, label=f"target {settings.target}")
    axes[0].set_ylabel("gradient cosine similarity")
    axes[0].legend(fontsize=8)
    axes[1].set_ylabel("batch size")
    axes[1].legend(fontsize=8)
    axes[2].set_ylabel("LR multiplier sqrt(B/B0)")
    axes[2].set_xlabel("training samples (sequences)")
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "simigrad.png"))
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths
