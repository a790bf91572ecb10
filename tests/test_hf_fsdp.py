"""``SimigradTrainer`` on the Trainer's FSDP2 path, and its refusals of the other sharded strategies.

The refusal messages are checked in one process; the FSDP2 runs (``simigrad_testkit.hf_fsdp_worker``: a pinned batch
against the plain ``transformers.Trainer``'s FSDP2 run, an adaptive batch against an fp64 loop with the same history
on every rank, one step's statistics against the fp64 rank-halves) and the refusal of ``fsdp`` on CPU, where
accelerate does not enable it, are ``slow`` torchrun launches at 2 and 3 processes."""

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from simigrad_compile.integrations import hf_fsdp  # noqa: E402
from simigrad_testkit.hf_dist_worker import MLP, Regression, simigrad_trainer  # noqa: E402
from simigrad_testkit.launch import run_checks  # noqa: E402

ONE_PROCESS = dict(batch_size=8, min_batch_size=8, max_batch_size=8, max_micro_batch_size=4, group_mode="microsteps")


def _trainer(tmp_path):
    return simigrad_trainer(MLP(), Regression(), str(tmp_path), ONE_PROCESS, max_steps=1)


def test_deepspeed_is_refused_with_its_reason(tmp_path):
    tr = _trainer(tmp_path)
    tr.is_deepspeed_enabled = True
    with pytest.raises(NotImplementedError, match="DeepSpeed: its engine holds the accumulation window"):
        tr.train()


def test_fsdp1_is_refused_and_fsdp2_named(tmp_path, monkeypatch):
    tr = _trainer(tmp_path)
    tr.is_fsdp_enabled = True
    monkeypatch.setattr(hf_fsdp, "fsdp_version", lambda trainer: 1)
    with pytest.raises(NotImplementedError, match=r"FSDP1 .*fsdp_config=\{'version': 2\}"):
        tr.train()


def test_fsdp_asked_for_but_not_enabled_is_refused(tmp_path, monkeypatch):
    """``accelerate launch --use_fsdp`` on CPU: accelerate leaves FSDP off (the torchrun check below shows it for
    ``TrainingArguments(fsdp=True)``), so the door refuses rather than train with DDP."""
    tr = _trainer(tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(NotImplementedError, match="accelerate enables FSDP only on accelerator devices") as e:
        tr.train()
    assert "drop fsdp/fsdp_config" in str(e.value) and "AdaptiveBatching" in str(e.value)


def test_resume_under_fsdp_is_refused(tmp_path, monkeypatch):
    tr = _trainer(tmp_path)
    tr.is_fsdp_enabled = True
    monkeypatch.setattr(hf_fsdp, "fsdp_version", lambda trainer: 2)
    with pytest.raises(NotImplementedError, match="resume_from_checkpoint under FSDP"):
        tr.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def _torchrun(processes: int) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 3])
def test_fsdp2_fixed_adaptive_and_statistics(tmp_path, processes):
    checks = ["fixed", "adaptive", "stats", "epoch_end", "epoch_end_exact"]
    run_checks([*_torchrun(processes), "-m", "simigrad_testkit.hf_fsdp_worker", str(tmp_path), *checks], checks)


@pytest.mark.slow
def test_fsdp_on_cpu_is_refused_under_torchrun(tmp_path):
    run_checks([*_torchrun(2), "-m", "simigrad_testkit.hf_fsdp_worker", str(tmp_path), "cpu_refused"],
               ["cpu_refused"])
