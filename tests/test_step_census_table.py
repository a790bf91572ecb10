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


def test_step_census_json_covers_every_listed_model():
    result = json.loads(RESULT.read_text())
    assert result["complete"], "the committed step census was cut short"
    assert [r["model"] for r in result["models"]] == list(LISTED)
    for r in result["models"]:
        assert "ratio" in r["timing"], (r["model"], r["timing"].get("error"))
        assert r["timing"]["stats_mode"] == "batch", r["model"]
        assert "peak_bytes" in r["inductor"] and "peak_bytes" in r["simigrad"], r["model"]
