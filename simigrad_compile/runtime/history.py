"""Per-optimizer-step records: ``run.history`` (plain dicts), a CSV file, TensorBoard, and ``plot()``.

A record has the keys of :data:`KEYS`:

* ``step`` (1-based, skipped steps included), ``samples`` (seen so far), ``target_batch_size`` (the controller's),
  ``batch_size`` (realised, global), ``micro_batch_size``, ``accumulation``;
* ``statistics``: where the split came from (``batch``, ``microsteps``, ``ranks``, ``none``), ``cosine``;
* the noise family (formulas in ``docs/statistics.md``): ``signal`` and ``noise``, this step's unbiased estimates
  of ``|G|^2`` and ``tr(Sigma)`` (NaN without split statistics); ``gns``, the noise scale ``B_simple`` of their
  exponential averages (``noise_ema``) after this step; ``gain``, AdaScale's gain ratio of the step's batch over
  its halves from the same averages;
* ``lr_scale``: the LR multiplier of the realised batch;
* ``stepped``: whether the optimizer applied the step; ``skipped``: why it did not (``non-finite-loss``,
  ``non-finite-gradient``, ``non-finite-statistics``, ``amp-overflow``) or, for an applied step, why the
  controller did not move (``no-statistics``, ``interval``, ``non-finite-cosine``, ``short-step``,
  ``no-noise-estimate``), else None;
* ``grad_norm``: the total norm of the step's mean gradient (unscaled, before clipping; in the clip's norm
  type when ``run.clip_grad_norm_`` was called, else the 2-norm);
* ``loss``: the sample-weighted mean loss when the loop passes it (``run.log_loss``), else None;
* ``note``: why the step has no statistics, when it has none, or what its statistics leave out (partial coverage);
* ``covered_elements``, ``covered_sq_norm``: the share of the step's gradient elements, and of its squared norm,
  that the statistics cover (1.0 for ``microsteps``, 0.0 without statistics; the rule for partial coverage is in
  :mod:`simigrad_compile.runtime.coverage`).

With ``log_dir`` set, every record is appended to ``<log_dir>/simigrad.csv`` (flushed per row) and, when the
``tensorboard`` package is installed, written through ``torch.utils.tensorboard.SummaryWriter`` (tag
``simigrad/<key>``, x = samples).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from typing import List, Optional

log = logging.getLogger("simigrad_compile")

KEYS = ("step", "samples", "target_batch_size", "batch_size", "micro_batch_size", "accumulation", "statistics",
        "cosine", "signal", "noise", "gns", "gain", "lr_scale", "stepped", "skipped", "grad_norm", "loss", "note",
        "covered_elements", "covered_sq_norm")
CSV_NAME = "simigrad.csv"


def _summary_writer(log_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        log.info("simigrad: TensorBoard logging off (%s); the CSV in %s has the same records", exc, log_dir)
        return None
    return SummaryWriter(log_dir)


def _series(records: List[dict], key: str) -> List[float]:
    """``records``' values of ``key`` as floats (NaN where missing)."""
    return [float("nan") if r.get(key) is None else float(r[key]) for r in records]


class History:
    def __init__(self, log_dir: Optional[str] = None):
        self.records: List[dict] = []
        self.log_dir = log_dir
        self._csv = self._writer = None
        if log_dir is not None:
            os.makedirs(log_dir, exist_ok=True)
            self._writer = _summary_writer(log_dir)

    def _csv_writer(self):
        if self._csv is None:
            path = os.path.join(self.log_dir, CSV_NAME)
            fresh = not os.path.exists(path) or os.path.getsize(path) == 0
            self._file = open(path, "a", newline="")
            self._csv = csv.DictWriter(self._file, fieldnames=KEYS)
            if fresh:
                self._csv.writeheader()
        return self._csv

    def append(self, record: dict) -> None:
        if tuple(record) != KEYS:
            record = {k: record.get(k) for k in KEYS}
        self.records.append(record)
        if self.log_dir is None:
            return
        self._csv_writer().writerow(record)
        self._file.flush()
        if self._writer is not None:
            for key in ("cosine", "signal", "noise", "gns", "gain", "batch_size", "target_batch_size", "micro_batch_size", "accumulation",
                        "lr_scale", "grad_norm", "loss", "covered_elements", "covered_sq_norm"):
                value = record[key]
                if value is not None and math.isfinite(value):
                    self._writer.add_scalar(f"simigrad/{key}", value, record["samples"])

    def close(self) -> None:
        if self._csv is not None:
            self._file.close()
            self._csv = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def plot(self, path: str, target_similarity: Optional[float] = None) -> None:
        """Similarity (with the target line), batch size (with the noise scale), gain ratio, LR multiplier and loss
        against samples, in one PNG (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ImportError("run.plot() needs matplotlib: pip install 'simigrad-compile[plot]'") from exc
        x = [r["samples"] for r in self.records]
        panels = [("cosine", "similarity"), ("batch_size", "batch size"), ("gain", "gain ratio"),
                  ("lr_scale", "LR multiplier"), ("loss", "loss")]
        fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(7, 11))
        for ax, (key, label) in zip(axes, panels):
            ax.plot(x, _series(self.records, key), lw=1)
            if key == "batch_size":
                ax.plot(x, [r["target_batch_size"] for r in self.records], lw=1, ls="--", label="target")
                gns = _series(self.records, "gns")
                if any(math.isfinite(v) and v > 0 for v in gns):
                    ax.plot(x, [v if math.isfinite(v) and v > 0 else float("nan") for v in gns], lw=1, ls=":",
                            label="noise scale B_simple")
                    ax.set_yscale("log")
                ax.legend()
            if key == "cosine" and target_similarity is not None:
                ax.axhline(target_similarity, color="k", lw=0.8, ls="--", label=f"target {target_similarity:g}")
                ax.legend()
            ax.set_ylabel(label)
        axes[-1].set_xlabel("samples")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)

    def state_dict(self) -> List[dict]:
        return [dict(r) for r in self.records]

    def load_state_dict(self, records: List[dict]) -> None:
        self.records = [{k: r.get(k) for k in KEYS} for r in records]


__all__ = ["History", "KEYS", "CSV_NAME"]
