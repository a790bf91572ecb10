"""What every benchmark records beside its figures: medians, hardware and versions."""

from __future__ import annotations

import os
import platform
import statistics

import torch


def summarise(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def hardware(device: str) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "loadavg_1_5_15": os.getloadavg()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import simigrad_compile

    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "simigrad_compile": simigrad_compile.__version__}
