"""A ladder saved by one process is loaded by a fresh one (and by each rank under torchrun) with no new compile,
and the statistics of the loaded graphs equal the fp64 two-half reference."""

import json
import os
import subprocess
import sys

import pytest

from simigrad_compile import envvars
from simigrad_compile.config import SimigradConfig
from simigrad_compile.runtime.ladder import Ladder
from simigrad_compile.runtime.compile_cache import ENV, CompileCacheError, EnvCompileCache, load_compile_cache

TESTS = os.path.dirname(os.path.abspath(__file__))
WORKER = "simigrad_testkit.compile_cache_worker"


def _env(cache_dir, **extra):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir), OMP_NUM_THREADS="1", **extra)
    for name in ("SIMIGRAD", ENV):
        if name not in extra:
            env.pop(name, None)
    return env


def _start(cache_dir, *args, **extra):
    return subprocess.Popen([sys.executable, "-m", WORKER, *args], env=_env(cache_dir, **extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=TESTS)


def _result(proc):
    try:
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _run(cache_dir, *args, **extra):
    return _result(_start(cache_dir, *args, **extra))


def _check_statistics(result):
    for m, r in result["rungs"].items():
        assert r["mode"] == "batch", (m, r)
        assert r["cosine"] == pytest.approx(r["ref_cosine"], abs=1e-4), m
        assert r["dot"] == pytest.approx(r["ref_dot"], rel=1e-4, abs=1e-7), m


def _check_cold(result):
    c = result["end_counters"]
    assert result["pass_runs"] == 2 and c["fxgraph_miss"] >= 4 and c["autograd_miss"] == 2, result
    _check_statistics(result)


def _check_loaded(result):
    """No graph compiled: Inductor and AOTAutograd hit for both rungs, the split pass never ran, and no CPU kernel
    was built (every ``.so`` in the fresh Inductor cache is one the file brought)."""
    c = result["end_counters"]
    assert result["pass_runs"] == 0, result
    assert result["cpu_kernels_loaded"] > 0 and result["so_files"] == result["cpu_kernels_loaded"], result
    assert c["fxgraph_miss"] == 0 and c["autograd_miss"] == 0, c
    assert c["autograd_hit"] == 2, c
    _check_statistics(result)


@pytest.mark.timeout(2400)  # three processes, one of them a cold Inductor compile of two rungs
def test_a_saved_ladder_loads_in_fresh_processes(tmp_path):
    """Saved through SIMIGRAD_COMPILE_CACHE after warm-up; loaded by load_compile_cache, then by the variable."""
    path = tmp_path / "sub" / "ladder.bin"
    cold = _run(tmp_path / "inductor_a", "env", **{ENV: str(path)})
    assert not cold["env_loaded"] and cold["env_saved"] and path.exists()
    assert cold["saved"]["inductor"] >= 4 and cold["saved"]["aot_autograd"] == 2
    assert 0 < cold["cpu_kernels_saved"] <= cold["so_files"], cold
    _check_cold(cold)
    size = path.stat().st_size
    # the two loading processes are independent of each other: they run side by side
    procs = (_start(tmp_path / "inductor_b", "load", str(path)),
             _start(tmp_path / "inductor_c", "env", **{ENV: str(path)}))
    loaded, by_env = map(_result, procs)
    assert loaded["loaded"] == cold["saved"]
    _check_loaded(loaded)
    assert by_env["env_loaded"] and not by_env["env_saved"]
    _check_loaded(by_env)
    assert path.stat().st_size == size


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_every_rank_loads_the_same_file_under_torchrun(tmp_path):
    path = tmp_path / "ladder.bin"

    def torchrun(name):
        out_dir = tmp_path / name
        out_dir.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", WORKER, "env"]
        out = subprocess.run(cmd, env=_env(tmp_path / f"inductor_{name}", OUT_DIR=str(out_dir), **{ENV: str(path)}),
                             capture_output=True, text=True, timeout=1800, cwd=TESTS)
        assert out.returncode == 0, out.stderr[-4000:]
        return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]

    cold = torchrun("cold")
    assert [r["env_saved"] for r in cold] == [True, False] and path.exists()
    for r in cold:
        _check_cold(r)
    warm = torchrun("warm")
    for r in warm:
        assert r["env_loaded"] and not r["env_saved"]
        _check_loaded(r)


def test_missing_and_unreadable_files_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_compile_cache"):
        load_compile_cache(str(tmp_path / "none.bin"))
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a cache")
    with pytest.raises(CompileCacheError, match="delete it"):
        load_compile_cache(str(bad))
    door = EnvCompileCache(0, {ENV: str(bad)})  # the environment door warns and compiles from scratch
    assert door.loaded is None


def test_a_process_that_compiled_nothing_writes_no_file(tmp_path):
    path = tmp_path / "x.bin"
    code = f"import simigrad_compile as s; print(s.save_compile_cache({str(path)!r}))"
    out = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "None" and not path.exists(), out.stderr[-2000:]


def test_the_variable_is_not_a_config_field():
    assert envvars.config_from_env({ENV: "/tmp/x.bin", "SIMIGRAD_TARGET_SIMILARITY": "0.3"}).target_similarity == 0.3


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("kw", [dict(min_batch_size=16, max_batch_size=3000, max_micro_batch_size=64),
                                dict(min_batch_size=1, max_batch_size=700, max_micro_batch_size=12),
                                dict(min_batch_size=100, max_batch_size=5000, micro_batch_sizes=(3, 5, 8, 32)),
                                dict(min_batch_size=256, max_batch_size=4096, max_micro_batch_size=256)])
def test_reachable_rungs_against_every_target(world, kw):
    """Every target in the bounds, at 1 and 2 minimum micro-steps, planned one by one (no shortcut)."""
    ladder = Ladder(SimigradConfig(batch_size=kw["min_batch_size"], **kw), world)
    every = set()
    for k in (1, 2):
        ladder.require_accumulation(k)
        every |= {ladder.plan(t).micro_batch_size for t in range(ladder.lower, ladder.upper + 1)}
    ladder.require_accumulation(1)
    assert set(ladder.reachable_rungs()) == every


def test_warm_up_compiles_only_the_reachable_rungs():
    import torch

    import simigrad_compile
    from simigrad_testkit.models import MLP

    torch._dynamo.reset()
    shapes = []

    def counting(gm, example_inputs):
        shapes.append(next(t.shape[0] for t in example_inputs if isinstance(t, torch.Tensor)
                           and not isinstance(t, torch.nn.Parameter) and t.shape[1:] == (12,)))
        return gm.forward

    model = MLP()
    compiled = torch.compile(model, backend=counting)
    run = simigrad_compile.AdaptiveBatching(compiled, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=16,
                                            min_batch_size=16, max_micro_batch_size=64, group_mode="microsteps",
                                            symbolic_batch=False)
    data = torch.utils.data.TensorDataset(torch.randn(64, 12), torch.randn(64, 5))
    run.warm_up(lambda b: torch.nn.functional.mse_loss(compiled(b[0]), b[1]).backward(), data)
    run.close()
    assert run.ladder.rungs == (1, 2, 4, 8, 16, 32, 64)
    assert sorted(shapes) == [8, 16, 32, 64]


def test_a_kernel_file_outside_the_cache_is_refused(tmp_path, monkeypatch):
    from simigrad_compile.runtime.cpu_kernels import restore_kernel_files

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    for bad in ("../outside.so", "/tmp/abs.so", "ab/kernel.py"):
        with pytest.raises(ValueError, match="not a .so inside"):
            restore_kernel_files({"ok/k.so": b"\x7fELF", bad: b"x"})
        assert not (tmp_path / "inductor" / "ok" / "k.so").exists()  # nothing written when one is refused
    assert restore_kernel_files({"ok/k.so": b"\x7fELF"}) == 1 and restore_kernel_files({"ok/k.so": b"other"}) == 0
    assert (tmp_path / "inductor" / "ok" / "k.so").read_bytes() == b"\x7fELF"  # an existing kernel is kept
