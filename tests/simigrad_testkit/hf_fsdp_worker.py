"""The Hugging Face door (``SimigradTrainer``) on the Trainer's FSDP2 path: one torchrun launch, 2 or 3 processes.

    cd tests && torchrun --standalone --nproc_per_node=3 -m simigrad_testkit.hf_fsdp_worker OUT_DIR fixed adaptive stats

On CPU, accelerate 1.16 gives the FSDP plugin only to accelerator devices (``AcceleratorState`` drops it for a
``MULTI_CPU`` state, and the plain Trainer then trains with DDP). :class:`ForceFsdp` (test only) puts accelerate's
state on its FSDP path after the Trainer built it, for the plain Trainer and for ours alike; from there on the
Trainer's own FSDP2 code runs unchanged (``fully_shard`` through ``fsdp2_prepare_model``, its optimizer switch,
``accelerator.backward``).

Checks (rank 0 prints ``CHECK <name> OK ...``; a failure raises, non-zero exit):

* ``fixed``: the controller pinned at ``world x 4 x 2`` samples per step on a tiny BERT (a ``fully_shard`` unit per
  ``BertLayer`` plus the root), ``max_grad_norm`` clipping every step: parameters equal the plain
  ``transformers.Trainer``'s FSDP2 run with ``gradient_accumulation_steps=2`` at the same global batches
  (sequential order: the same samples per step), to fp32 rounding (the split sums each half first, plain FSDP2 in
  its ring's order), and so do the logged gradient norms (the whole gradient's, over every shard).
* ``adaptive``: a growing batch on an MLP: ``ranks`` statistics, the same history on every rank (and the same logged
  ``batch_size``), parameters equal a one-process fp64 SGD loop over the same global batches at ``LR sqrt(B/B0)``.
* ``stats``: one step of two micro-batches a rank: the ``(d, a, b)`` the core read (scaled to the means, as the
  controller does) equal the fp64 ``g1.g2``, ``|g1|^2``, ``|g2|^2`` of the mean gradients of ranks
  ``[0, N//2)`` and ``[N//2, N)``, and the recorded ``grad_norm`` the fp64 norm of the mean gradient.
"""

from __future__ import annotations

import copy
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator  # noqa: E402

from simigrad_compile.integrations.hf import SimigradTrainer  # noqa: E402
from simigrad_testkit.hf_dist_worker import MLP, Regression, Tokens, run_named, tiny_bert  # noqa: E402

LR, SEED, MICRO = 0.05, 3, 4
CLIP = 0.05  # the fixed check clips (both Trainers clip the step's mean gradient over every shard)


class ForceFsdp:
    """Test only: accelerate's ``MULTI_CPU`` state switched to FSDP with the plugin ``TrainingArguments`` asked for."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
            state = self.accelerator.state
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            state.distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True


class PlainFsdpTrainer(ForceFsdp, Trainer):
    pass


class FsdpSimigradTrainer(ForceFsdp, SimigradTrainer):
    pass


def arguments(out: str, wrap=None, **changes) -> TrainingArguments:
    fsdp_config = {"version": 2}
    if wrap:
        fsdp_config["transformer_layer_cls_to_wrap"] = wrap
    settings = dict(output_dir=out, learning_rate=LR, per_device_train_batch_size=MICRO, logging_steps=1,
                    save_strategy="no", report_to="none", use_cpu=True, ddp_backend="gloo", disable_tqdm=True,
                    seed=SEED, lr_scheduler_type="constant", train_sampling_strategy="sequential", max_grad_norm=0.0,
                    optim="sgd", fsdp=True, fsdp_config=fsdp_config)
    settings.update(changes)
    return TrainingArguments(**settings)


def ours(model, data, out, simigrad, wrap=None, **changes) -> SimigradTrainer:
    # the Trainer refuses optimizers=(...) under FSDP: both runs use optim="sgd" (plain SGD)
    tr = FsdpSimigradTrainer(model=model, args=arguments(out, wrap, **changes), train_dataset=data,
                             data_collator=default_data_collator, simigrad=simigrad)
    assert tr.is_fsdp_enabled
    return tr


def full(model) -> torch.Tensor:
    """Every parameter, whole (the shards gathered), flattened."""
    return torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten()
                      for p in model.parameters()])


def shard_units(model) -> int:
    from torch.distributed.fsdp import FSDPModule

    return sum(isinstance(m, FSDPModule) for m in model.modules())


def same_history(name: str, history: list) -> None:
    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, repr(history))
    assert len(set(records)) == 1, f"{name}: histories differ across ranks"


def check_fixed(out: str) -> str:
    world = int(os.environ["WORLD_SIZE"])  # before the Trainer starts the process group
    b = world * MICRO * 2
    pinned = dict(batch_size=b, min_batch_size=b, max_batch_size=b, max_micro_batch_size=MICRO)
    data, steps = Tokens(), 48 // b
    start = tiny_bert()
    model, plain_model = copy.deepcopy(start), copy.deepcopy(start)
    tr = ours(model, data, os.path.join(out, "fixed"), pinned, wrap=["BertLayer"], max_steps=steps, max_grad_norm=CLIP)
    tr.train()
    history = tr.simigrad.history
    assert [(r["batch_size"], r["micro_batch_size"], r["accumulation"], r["statistics"]) for r in history] == \
        [(b, MICRO, 2, "ranks")] * steps, history
    units = shard_units(tr.model_wrapped)
    plain_model.accepts_loss_kwargs = False  # as in hf_dist_worker.check_fixed: a mean loss, divided by accumulation
    plain = PlainFsdpTrainer(model=plain_model, args=arguments(os.path.join(out, "plain"), ["BertLayer"],
                                                               max_steps=steps, gradient_accumulation_steps=2,
                                                               max_grad_norm=CLIP),
                             train_dataset=data, data_collator=default_data_collator)
    plain.train()
    mine, theirs = full(tr.model_wrapped), full(plain.model_wrapped)
    moved = (theirs - full(start)).abs().max().item()
    err = (mine - theirs).abs().max().item()
    assert units >= 2 and moved > 1e-4 and torch.allclose(mine, theirs, rtol=1e-5, atol=1e-6), (units, err, moved)
    norms = [[e["grad_norm"] for e in t.state.log_history if "grad_norm" in e] for t in (tr, plain)]
    assert len(norms[0]) == steps and all(n > CLIP for n in norms[1]), norms  # every step clipped
    assert all(abs(a - b) <= 1e-5 * b for a, b in zip(*norms)), norms
    same_history("fixed", history)
    return (f"{units} fully_shard units, clipped at {CLIP}; max|ours - plain Trainer FSDP2| = {err:.2e} (parameters "
            f"moved {moved:.2e}); grad norms {[round(n, 4) for n in norms[0]]}")


def fp64_sgd(start, data, history, world: int, b0: int):
    """One process, fp64: per recorded step, the mean MSE over the step's global samples (rank ``r``'s shard of the
    sequential order is ``r, r + world, ...``), plain SGD at ``LR sqrt(B/B0)``."""
    model = copy.deepcopy(start).double()
    per_rank = len(data) // world
    position = 0
    for record in history:
        b = record["batch_size"] // world
        idx = [r + world * ((position + i) % per_rank) for r in range(world) for i in range(b)]
        position += b
        model.zero_grad()
        model(data.x[idx].double(), data.y[idx].double())["loss"].backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * math.sqrt(record["batch_size"] / b0) * p.grad
    return model


def check_adaptive(out: str) -> str:
    world = int(os.environ["WORLD_SIZE"])
    b0 = world * MICRO
    options = dict(batch_size=b0, min_batch_size=b0, max_batch_size=6 * b0, target_similarity=0.9,
                   max_micro_batch_size=MICRO)
    data = Regression(96)  # divisible by 2 and 3: no padded shard
    model = MLP()
    start = copy.deepcopy(model)
    tr = ours(model, data, os.path.join(out, "adaptive"), options, max_steps=8)
    tr.train()
    history = tr.simigrad.history
    assert {r["statistics"] for r in history} == {"ranks"}, history
    sizes = [r["batch_size"] for r in history]
    assert len(set(sizes)) > 1 and all(r["stepped"] for r in history), sizes
    same_history("adaptive", history)
    logged = [e["batch_size"] for e in tr.state.log_history if "loss" in e]
    assert logged == sizes, (logged, sizes)
    reference = fp64_sgd(start, data, history, world, b0)
    err = (full(tr.model_wrapped).double() - torch.cat([p.flatten() for p in reference.parameters()])).abs().max()
    assert err.item() < 1e-5, err
    return f"batches {sizes}; max|ours - fp64 loop| = {err.item():.2e}"


def check_epoch_end(out: str, symbolic: bool = False) -> str:
    """10 samples a rank and steps of 12 a rank (micro-batches of 4): the step reaches into the next pass over the
    data, as the door's loader does on the static ladder; with ``symbolic_batch`` (one graph for every size) it is
    the rank's 10 samples exactly, as micro-batches of 4, 3 and 3 that FSDP2's held window weighs by their sizes.
    Either way it equals the fp64 loop over the same samples."""
    world = int(os.environ["WORLD_SIZE"])
    b0 = world * 3 * MICRO
    options = dict(batch_size=b0, min_batch_size=b0, max_batch_size=b0, max_micro_batch_size=MICRO,
                   symbolic_batch=symbolic)
    data = Regression(world * 10)
    model = MLP()
    start = copy.deepcopy(model)
    tr = ours(model, data, os.path.join(out, f"epoch_end{'_exact' * symbolic}"), options, num_train_epochs=1)
    tr.train()
    history = tr.simigrad.history
    exact = tr.simigrad.ladder.any_size
    assert exact == symbolic
    assert [(r["micro_batch_size"], r["batch_size"]) for r in history] == [(MICRO, world * (10 if exact else 12))]
    assert all(r["stepped"] for r in history), history
    same_history(f"epoch_end{'_exact' * symbolic}", history)
    reference = fp64_sgd(start, data, history, world, b0)
    err = (full(tr.model_wrapped).double() - torch.cat([p.flatten() for p in reference.parameters()])).abs().max()
    assert err.item() < 1e-5, err
    return f"batches {[r['batch_size'] for r in history]}; max|ours - fp64 loop| = {err.item():.2e}"


class _Capture(TrainerCallback):
    """Keeps the statistics the core read at each step (its ``statistics.read``, wrapped at train begin)."""

    def __init__(self, trainer):
        self.trainer, self.reads = trainer, []

    def on_train_begin(self, args, state, control, **kwargs):
        choice = self.trainer.simigrad.statistics
        read = choice.read

        def capture(w, step):
            got = read(w, step)
            self.reads.append((got[0].result() if hasattr(got[0], "result") else got[0], tuple(w.sizes)))
            return got

        choice.read = capture


def check_stats(out: str) -> str:
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    per_rank, micro = 4, 2
    options = dict(batch_size=world * per_rank, min_batch_size=world * per_rank, max_batch_size=world * per_rank,
                   max_micro_batch_size=micro)
    data = Regression(96)
    model = MLP()
    start = copy.deepcopy(model).double()
    tr = ours(model, data, os.path.join(out, "stats"), options, max_steps=1)
    capture = _Capture(tr)
    tr.add_callback(capture)
    tr.train()
    (stats, sizes), = capture.reads
    record = tr.simigrad.history[0]
    assert sizes == (micro, micro) and stats.mode == "ranks", (sizes, stats)
    f = (sizes[-1] / sum(sizes)) ** 2  # the window form of the ranks buckets, scaled to the means (controller.py)
    got = [stats.dot * f, stats.sq_norm_1 * f, stats.sq_norm_2 * f]
    idx = [rank + world * i for i in range(per_rank)]  # this rank's samples of the step (sequential order)
    start(data.x[idx].double(), data.y[idx].double())["loss"].backward()
    local = torch.cat([p.grad.flatten() for p in start.parameters()])
    every = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(every, local)
    half = world // 2
    g1, g2 = sum(every[:half]) / half, sum(every[half:]) / (world - half)
    mean = sum(every) / world
    ref = [float(g1 @ g2), float(g1 @ g1), float(g2 @ g2)]
    rel = max(abs(x - r) / abs(r) for x, r in zip(got, ref))
    norm_err = abs(record["grad_norm"] - float(mean.norm())) / float(mean.norm())
    assert rel < 1e-5 and norm_err < 1e-5, (got, ref, record["grad_norm"], float(mean.norm()))
    same_history("stats", tr.simigrad.history)
    return f"(d, a, b) max rel err {rel:.2e}, grad_norm rel err {norm_err:.2e}, cosine {record['cosine']:.4f}"


def check_cpu_refused(out: str) -> str:
    """Without :class:`ForceFsdp`: accelerate leaves FSDP off on CPU (the plain Trainer would train with DDP), and
    ``SimigradTrainer`` refuses, naming that."""
    data, model = Regression(96), MLP()
    plain = Trainer(model=model, args=arguments(os.path.join(out, "plain_cpu"), max_steps=1), train_dataset=data,
                    data_collator=default_data_collator)
    assert not plain.is_fsdp_enabled and plain.accelerator.state.distributed_type == DistributedType.MULTI_CPU
    tr = SimigradTrainer(model=MLP(), args=arguments(os.path.join(out, "cpu"), max_steps=1), train_dataset=data,
                         data_collator=default_data_collator, simigrad={"batch_size": 8})
    try:
        tr.train()
    except NotImplementedError as e:
        assert "accelerate enables FSDP only on accelerator devices" in str(e), e
        return str(e)
    raise AssertionError("SimigradTrainer trained with fsdp=True on CPU")


CHECKS = {"fixed": check_fixed, "adaptive": check_adaptive, "stats": check_stats, "epoch_end": check_epoch_end,
          "epoch_end_exact": lambda out: check_epoch_end(out, symbolic=True), "cpu_refused": check_cpu_refused}


if __name__ == "__main__":
    run_named(CHECKS, sys.argv[1:])
