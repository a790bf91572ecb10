"""A second process with a warm Inductor cache skips the passes; the statistics still come out of the graph."""

import json
import os
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))


def _run(cache_dir):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir))
    env.pop("SIMIGRAD", None)
    out = subprocess.run([sys.executable, "-m", "simigrad_testkit.warm_cache"], env=env, capture_output=True, text=True,
                         timeout=600, cwd=TESTS)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_statistics_survive_a_warm_cache(tmp_path):
    cold, warm = _run(tmp_path), _run(tmp_path)
    assert cold["imported_by_entry_point"] and warm["imported_by_entry_point"]
    assert cold["pass_runs"] == 1 and warm["pass_runs"] == 0
    for result in (cold, warm):
        assert result["mode"] == "batch"
        assert result["cosine"] == pytest.approx(result["reference"], abs=1e-4)
        assert result["dot"] == pytest.approx(result["ref_dot"], rel=1e-4, abs=1e-7)
