"""The step-census table of docs/benchmarks.md is the one its generator makes from bench/results/step_census.json."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "bench" / "results" / "step_census.json"
LISTED = ("GPT-2", "BERT (padded)", "Llama", "T5", "ViT", "Whisper", "ResNet-50", "ConvNeXt-T", "MobileNetV3",
          "EfficientNet-B0", "LR-ASPP", "Swin-T")


def test_step_census_table_matches_the_json():
    out = subprocess.run([sys.executable, str(REPO / "bench" / "bench_step_census_table.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_step_census_json_rows_are_listed_models_with_results():
    """Every row is one of the listed models, in the listed order, with its timing, statistics and memory; the
    file says whether every listed model is in it."""
    result = json.loads(RESULT.read_text())
    names = [r["model"] for r in result["models"]]
    assert names == [m for m in LISTED if m in names]
    assert result["complete"] == (set(names) == set(LISTED))
    for r in result["models"]:
        assert "ratio" in r["timing"], (r["model"], r["timing"].get("error"))
        assert r["timing"]["stats_mode"] == "batch", r["model"]
        assert "peak_bytes" in r["inductor"] and "peak_bytes" in r["simigrad"], r["model"]
