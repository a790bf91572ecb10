"""The Hugging Face and Lightning doors, driven with drawn settings (:mod:`simigrad_testkit.door_actions`).

Each driver runs the real trainer with the door on an fp64 :class:`~loop_reference.Net` and returns a
:class:`~door_reference.Trace` (what the model was fed, by sample index; the core's history; the parameters after
every step), and the LR schedule's factor of a step, computed by hand from the trainer's documented formula.
"""

from __future__ import annotations

import json
import math
import os
import tempfile

import torch
from hypothesis import strategies as st

from simigrad_testkit.door_actions import DECAY, LR, config, door_data, freeze, reference, shared, start_net
from simigrad_testkit.door_reference import Micro, Trace, check_trace
from simigrad_testkit.loop_reference import flat, loss_of, make_optimizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def same_history(a, b) -> bool:
    return json.dumps(a) == json.dumps(b)  # (NaN-safe)


# --- Hugging Face ---------------------------------------------------------------------------------------------
@st.composite
def hf_runs(draw):
    """``per_device_train_batch_size`` (the largest rung), ``max_steps`` or epochs, sampling, ``max_grad_norm``,
    the LR schedule and its warmup, the Trainer's AdamW or the user's optimizer, a checkpoint and a resume."""
    s = draw(st.fixed_dictionaries(shared(micro=st.integers(2, 4))))
    s.update(draw(st.fixed_dictionaries(dict(
        steps=st.none() | st.integers(2, 8), sequential=st.booleans(), clip=st.sampled_from([0.0, 0.05, 1.0, 100.0]),
        schedule=st.sampled_from(["constant", "linear", "cosine", "constant_with_warmup"]),
        warmup=st.integers(0, 3), optim=st.sampled_from(["user", "adamw"]), wd=st.sampled_from([0.0, 0.1]),
        min_batch=st.integers(1, 4), resume=st.none() | st.integers(1, 7)))))
    s["epochs"] = min(s["epochs"], 2)
    if s["steps"] is None or s["resume"] is not None and s["resume"] >= s["steps"]:
        s["resume"] = None
    return s


class Fed(torch.nn.Module):
    """The user's model for the Trainer (``{"loss": ...}``); records each training forward's samples."""

    def __init__(self, net, trace, frozen):
        super().__init__()
        self.net, self.trace, self.frozen = net, trace, frozen

    def forward(self, x, labels, idx):
        if torch.is_grad_enabled():
            self.trace.micro.append(Micro([(idx, 1.0)], frozen=self.frozen))
        return {"loss": loss_of(self.net, x, labels)}


def _hf_trainer(s, out, trace):
    from transformers import TrainerCallback, TrainingArguments, default_data_collator

    from simigrad_compile.integrations.hf import SimigradTrainer

    class Snapshots(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            trace.snapshot(trainer.simigrad.history, net)

    x, y, idx = door_data(s)
    net = start_net()
    frozen = frozenset([s["frozen"]] if s["frozen"] else [])
    freeze(net, frozen)
    model = Fed(net, trace, frozen)
    save = s["resume"] is not None
    args = TrainingArguments(
        output_dir=out, learning_rate=LR, per_device_train_batch_size=s["micro"], max_steps=s["steps"] or -1,
        num_train_epochs=s["epochs"], max_grad_norm=s["clip"], lr_scheduler_type=s["schedule"],
        warmup_steps=s["warmup"], weight_decay=s["wd"], optim="adamw_torch",
        train_sampling_strategy="sequential" if s["sequential"] else "random", seed=7, data_seed=s["seed"],
        save_strategy="steps" if save else "no", save_steps=s["resume"] or 500, report_to="none", use_cpu=True,
        disable_tqdm=True, logging_steps=1)
    optimizers = (None, None) if s["optim"] == "adamw" else \
        (make_optimizer([p for p in net.parameters() if p.requires_grad], s["opt"], LR), None)
    trainer = SimigradTrainer(model=model, args=args, data_collator=default_data_collator,
                              train_dataset=[{"x": x[i], "labels": y[i], "idx": idx[i]} for i in range(s["n"])],
                              optimizers=optimizers, simigrad=dict(config(s), min_batch_size=s["min_batch"]),
                              callbacks=[Snapshots()])
    return trainer, net


def hf_reference_optimizer(s, ref):
    """The optimizer of the plain loop: the user's, or the Trainer's AdamW (its documented groups: biases without
    weight decay; betas 0.9, 0.999, eps 1e-8)."""
    params = dict(ref.model.named_parameters())
    live = {n: p for n, p in params.items() if n != s["frozen"]}
    if s["optim"] == "user":
        ref.opt = make_optimizer(list(live.values()), s["opt"], LR)
    else:
        ref.opt = torch.optim.AdamW(
            [{"params": [p for n, p in live.items() if "bias" not in n], "weight_decay": s["wd"]},
             {"params": [p for n, p in live.items() if "bias" in n], "weight_decay": 0.0}],
            lr=LR, betas=(0.9, 0.999), eps=1e-8)


def hf_order(s, count):
    """The documented sample stream: each epoch one permutation of ``data_seed + epoch`` (or in order)."""
    orders, epoch = [], 0
    while sum(map(len, orders)) < count:
        g = torch.Generator().manual_seed(s["seed"] + epoch)
        orders.append(torch.arange(s["n"]) if s["sequential"] else torch.randperm(s["n"], generator=g))
        epoch += 1
    return torch.cat(orders)[:count] if orders else torch.zeros(0, dtype=torch.long)


def run_hf(s, tmp) -> Trace:
    trace = Trace()
    trainer, net = _hf_trainer(s, os.path.join(tmp, "a"), trace)
    trainer.train()
    trace.history = trainer.simigrad.history
    fed = torch.cat([idx for m in trace.micro for idx, _ in m.parts])
    assert torch.equal(fed, hf_order(s, len(fed))), "the Trainer was fed other samples than the documented order"
    if s["resume"] is not None:  # a new Trainer from the checkpoint ends where the uninterrupted one did
        again = Trace()
        resumed, resumed_net = _hf_trainer(s, os.path.join(tmp, "a"), again)
        resumed.train(resume_from_checkpoint=os.path.join(tmp, "a", f"checkpoint-{s['resume']}"))
        assert same_history(resumed.simigrad.history, trace.history)
        torch.testing.assert_close(flat(resumed_net), flat(net), rtol=0, atol=0)
    return trace


def hf_factor(s):
    """The Trainer's LR schedule (transformers' formulas, by hand) at the number of applied steps (a skipped step
    holds it); the horizon is ``max_steps``, or the loader's most steps per epoch times the epochs."""
    total = s["steps"] or s["epochs"] * max(1, math.ceil(s["n"] / max(2, s["min_batch"])))
    w = s["warmup"]

    def factor(rec, applied, micros):
        if s["schedule"] == "constant":
            return 1.0
        if applied < w:
            return applied / max(1, w)
        if s["schedule"] == "constant_with_warmup":
            return 1.0
        if s["schedule"] == "linear":
            return max(0.0, (total - applied) / max(1, total - w))
        progress = (applied - w) / max(1, total - w)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return factor


# --- Lightning -------------------------------------------------------------------------------------------------
@st.composite
def lightning_runs(draw):
    """The loader, ``gradient_clip_val`` by norm or by value, a step- or epoch-interval scheduler, a checkpoint at
    an epoch's end and a resumed fit."""
    s = draw(st.fixed_dictionaries(shared()))
    s.update(draw(st.fixed_dictionaries(dict(
        drop_last=st.booleans(), shuffle=st.booleans(), sched=st.sampled_from([None, "step", "epoch"]),
        clip=st.none() | st.tuples(st.sampled_from([0.01, 0.3, 100.0]), st.sampled_from(["norm", "value"])),
        resume=st.none() | st.integers(1, 2)))))
    if s["resume"] is not None and s["resume"] >= s["epochs"]:
        s["resume"] = None
    return s


def _lightning_fit(s, tmp, trace, epochs, ckpt=None):
    import lightning.pytorch as pl

    from simigrad_compile.integrations.lightning import SimigradCallback
    from simigrad_testkit.lightning_module import PlainModule

    class Module(PlainModule):
        def on_train_epoch_start(self):
            freeze(self.net, [s["frozen"]] if s["frozen"] and self.current_epoch == 0 else [])

        def training_step(self, batch, batch_idx):
            x, y, idx = batch
            frozen = frozenset(n for n, p in self.net.named_parameters() if not p.requires_grad)
            factor = DECAY(self.current_epoch) if s["sched"] == "epoch" else 1.0
            trace.micro.append(Micro([(idx, 1.0)], frozen=frozen, factor=factor))
            return loss_of(self.net, x, y)

        def configure_optimizers(self):
            opt = make_optimizer(self.net.parameters(), s["opt"], LR)
            if s["sched"] is None:
                return opt
            sched = torch.optim.lr_scheduler.LambdaLR(opt, DECAY)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": s["sched"]}}

    class Snapshots(pl.Callback):
        def on_train_batch_end(self, *args):
            trace.snapshot(callback.run.history, net)

        def on_train_epoch_end(self, *args):
            trace.micro[-1].epoch_end = True

    net = start_net()
    callback = SimigradCallback(**config(s))
    clip = s["clip"] or (None, None)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, precision="64-true",
                         enable_checkpointing=s["resume"] is not None, default_root_dir=tmp,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback, Snapshots()],
                         gradient_clip_val=clip[0], gradient_clip_algorithm=clip[1])
    g = torch.Generator().manual_seed(s["seed"])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*door_data(s)), batch_size=s["micro"],
                                         drop_last=s["drop_last"], shuffle=s["shuffle"], generator=g)
    trainer.fit(Module(net), loader, ckpt_path=ckpt)
    assert trainer.accumulate_grad_batches == 1
    return callback.run.history, net


def run_lightning(s, tmp) -> Trace:
    trace = Trace()
    if s["resume"] is None:
        trace.history, _ = _lightning_fit(s, tmp, trace, s["epochs"])
        return trace
    first, _ = _lightning_fit(s, tmp, trace, s["resume"])
    (ckpt,) = [os.path.join(d, f) for d, _, files in os.walk(tmp) for f in files if f.endswith(".ckpt")]
    trace.history, _ = _lightning_fit(s, tmp, trace, s["epochs"], ckpt=ckpt)
    assert same_history(trace.history[:len(first)], first)
    return trace


def lightning_factor(s):
    """A step-interval scheduler at the applied steps (a skipped step holds it); an epoch-interval one at the
    epoch of the step."""
    def factor(rec, applied, micros):
        return DECAY(applied) if s["sched"] == "step" else micros[-1].factor
    return factor


def lightning_clip(s):
    if s["clip"] is None:
        return None
    return (s["clip"][0], 2.0 if s["clip"][1] == "norm" else "value")


def check_hf(s) -> Trace:
    """Run the Hugging Face door (and its resume) and check it against the fp64 plain loop."""
    with tempfile.TemporaryDirectory() as tmp:
        trace = run_hf(s, tmp)
    ref = reference(s)
    hf_reference_optimizer(s, ref)
    x, y, _ = door_data(s)
    check_trace(trace, ref, (x, y), hf_factor(s), clip=(s["clip"], 2.0) if s["clip"] else None)
    return trace


def check_lightning(s) -> Trace:
    """Run the Lightning door (and its resume) and check it against the fp64 plain loop."""
    with tempfile.TemporaryDirectory() as tmp:
        trace = run_lightning(s, tmp)
    x, y, _ = door_data(s)
    check_trace(trace, reference(s), (x, y), lightning_factor(s), clip=lightning_clip(s))
    return trace
