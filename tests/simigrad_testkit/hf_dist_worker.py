"""The Hugging Face door (``SimigradTrainer``) under the Trainer's own DDP, and its checkpoints: one torchrun launch.

    cd tests && torchrun --standalone --nproc_per_node=2 -m simigrad_testkit.hf_dist_worker OUT_DIR fixed adaptive resume

Checks (rank 0 prints ``CHECK <name> OK ...``; a failure raises, non-zero exit):

* ``fixed``: the controller pinned (min = max = B0 = 16 global) on a tiny BERT: parameters equal the plain
  ``transformers.Trainer``'s DDP run with ``gradient_accumulation_steps=2`` at the same global batch. Sequential
  order: both runs see the same 16 samples per step (the plain run shards its batches across ranks, ours shards
  the samples; the set per step is the same), so only the order of the sums differs (fp32 tolerance).
* ``adaptive``: a growing batch on an MLP: parameters and history bit-identical on every rank; ``ranks``
  statistics; parameters equal a one-process fp64 loop over the same global batches (each rank's shard is
  ``r, r + world, ...`` of the sequential order, written out here), with the LR times ``sqrt(B/B0)``.
* ``restart`` (launched with ``--max-restarts=1``, c10d rendezvous): rank 1 dies at step 8 of the adaptive run,
  torchrun restarts both ranks, they resume from ``checkpoint-6`` and end bit-identical to the uninterrupted run.
* ``resume``: the adaptive run stopped at a checkpoint and resumed from it (new model, new Trainer) ends with the
  uninterrupted run's parameters and history, bit for bit; the run's state is in the checkpoint folder once.

The helpers are shared with ``tests/test_hf_dist.py`` (the one-process resume test).
"""

from __future__ import annotations

import copy
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator  # noqa: E402
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

from simigrad_compile.integrations.hf import RUN_STATE_NAME, SimigradTrainer  # noqa: E402

LR, SEED, N = 0.05, 3, 64


class Regression(torch.utils.data.Dataset):
    def __init__(self, n: int = N):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 8, generator=g)
        self.y = torch.sin(self.x @ torch.randn(8, 1, generator=g)) + 0.3 * torch.randn(n, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def forward(self, x, labels):
        return {"loss": torch.nn.functional.mse_loss(self.net(x), labels)}


class Tokens(torch.utils.data.Dataset):
    """Random token rows labelled by parity; labels at ``ignored`` are -100 (a micro-batch whose labels are all
    ignored has a mean loss of 0/0 = NaN)."""

    def __init__(self, n: int = N, ignored=()):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 30, (n, 6), generator=g)
        self.labels = self.ids.sum(1) % 2
        self.labels[list(ignored)] = -100

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def arguments(out: str, **changes) -> TrainingArguments:
    settings = dict(output_dir=out, learning_rate=LR, per_device_train_batch_size=4, logging_steps=1,
                    save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=SEED,
                    lr_scheduler_type="constant", train_sampling_strategy="sequential", max_grad_norm=0.0)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        settings["ddp_backend"] = "gloo"  # with use_cpu=True: the Trainer's DDP on CPU
    settings.update(changes)
    return TrainingArguments(**settings)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)


def simigrad_trainer(model, data, out, simigrad, **changes) -> SimigradTrainer:
    return SimigradTrainer(model=model, args=arguments(out, **changes), train_dataset=data,
                           data_collator=default_data_collator, optimizers=(sgd(model), None), simigrad=simigrad)


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


ADAPTIVE = dict(batch_size=8, min_batch_size=8, max_batch_size=48, target_similarity=0.9, max_micro_batch_size=4)


def same_on_every_rank(name: str, params: torch.Tensor, history: list) -> None:
    world = dist.get_world_size()
    gathered = [torch.empty_like(params) for _ in range(world)]
    dist.all_gather(gathered, params)
    assert all(torch.equal(gathered[0], p) for p in gathered), f"{name}: parameters differ across ranks"
    records = [None] * world
    dist.all_gather_object(records, repr(history))
    assert len(set(records)) == 1, f"{name}: histories differ across ranks"


def fp64_loop(start, data, history, world: int, b0: int):
    """One process, fp64: per recorded step, the mean MSE over the step's global samples (rank ``r``'s shard of the
    sequential order is ``r, r + world, ...``), SGD with momentum at ``LR * sqrt(B/B0)``."""
    model = copy.deepcopy(start).double()
    opt = sgd(model)
    per_rank = -(-len(data) // world)
    position = 0
    for record in history:
        b = record["batch_size"] // world
        idx = [r + world * ((position + i) % per_rank) for r in range(world) for i in range(b)]
        position += b
        model.zero_grad()
        model(data.x[idx].double(), data.y[idx].double())["loss"].backward()
        for group in opt.param_groups:
            group["lr"] = LR * math.sqrt(record["batch_size"] / b0)
        opt.step()
    return model


def check_fixed(out: str) -> str:
    pinned = dict(batch_size=16, min_batch_size=16, max_batch_size=16, max_micro_batch_size=4)
    data, steps = Tokens(), 6
    model = tiny_bert()
    plain_model = copy.deepcopy(model)
    tr = simigrad_trainer(model, data, os.path.join(out, "fixed"), pinned, max_steps=steps)
    tr.train()
    history = tr.simigrad.history
    assert [(r["batch_size"], r["micro_batch_size"], r["accumulation"], r["statistics"]) for r in history] == \
        [(16, 4, 2, "ranks")] * steps, history
    # BERT's classification loss is a mean that ignores num_items_in_batch; told that the model takes it, the plain
    # Trainer multiplies each micro-batch's loss by world x accumulation instead of dividing by the accumulation.
    plain_model.accepts_loss_kwargs = False
    plain = Trainer(model=plain_model, args=arguments(os.path.join(out, "plain"), max_steps=steps,
                                                      gradient_accumulation_steps=2),
                    train_dataset=data, data_collator=default_data_collator, optimizers=(sgd(plain_model), None))
    plain.train()
    ours, theirs = flat(model), flat(plain_model)
    moved = (theirs - flat(tiny_bert())).abs().max().item()
    err = (ours - theirs).abs().max().item()
    assert moved > 1e-3 and torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), (err, moved)
    return f"max|ours - plain Trainer DDP| = {err:.2e} (parameters moved {moved:.2e})"


def check_adaptive(out: str) -> str:
    data = Regression()
    model = MLP()
    start = copy.deepcopy(model)
    tr = simigrad_trainer(model, data, os.path.join(out, "adaptive"), ADAPTIVE, max_steps=10)
    tr.train()
    history = tr.simigrad.history
    assert {r["statistics"] for r in history} == {"ranks"}, history
    sizes = [r["batch_size"] for r in history]
    assert len(set(sizes)) > 1 and all(r["stepped"] for r in history), sizes
    same_on_every_rank("adaptive", flat(model), history)
    reference = fp64_loop(start, data, history, dist.get_world_size(), ADAPTIVE["batch_size"])
    err = (flat(model).double() - flat(reference)).abs().max().item()
    assert err < 1e-5, err
    logged = [e for e in tr.state.log_history if "loss" in e]
    assert [e["batch_size"] for e in logged] == sizes
    return f"batches {sizes}; max|ours - fp64 loop| = {err:.2e}"


def resume_pair(out: str, data, make_model, options: dict, stop: int, **changes):
    """The uninterrupted run (a checkpoint every ``stop`` steps) and the run resumed from ``checkpoint-<stop>``."""
    full = make_model()
    a = simigrad_trainer(full, data, os.path.join(out, "full"), options, save_strategy="steps", save_steps=stop,
                         **changes)
    a.train()
    checkpoint = os.path.join(out, "full", f"checkpoint-{stop}")
    assert os.path.isfile(os.path.join(checkpoint, RUN_STATE_NAME)), os.listdir(checkpoint)
    resumed = make_model()
    b = simigrad_trainer(resumed, data, os.path.join(out, "resumed"), options, **changes)
    b.train(resume_from_checkpoint=checkpoint)
    return a, b


def check_resume(out: str) -> str:
    a, b = resume_pair(os.path.join(out, "resume"), Regression(), MLP, ADAPTIVE, stop=5, max_steps=10)
    assert torch.equal(flat(a.model), flat(b.model)), (flat(a.model) - flat(b.model)).abs().max()
    assert repr(a.simigrad.history) == repr(b.simigrad.history)
    same_on_every_rank("resume", flat(b.model), b.simigrad.history)
    return f"resumed at step 5 of 10: bit-identical; batches {[r['batch_size'] for r in b.simigrad.history]}"


class _LoseRank(TrainerCallback):
    """On torchrun's first attempt rank 1 exits as step ``at + 1`` begins (its first micro-batch fetched), while rank
    0 goes on into the step and fails at its gradient reduction."""

    def __init__(self, at: int):
        self.at = at

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at and dist.get_rank() == 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
            os._exit(1)


def check_restart(out: str) -> str:
    """Launched with ``--max-restarts=1``: the uninterrupted run, then the same run whose rank 1 dies as step 8
    begins; torchrun restarts both ranks, which resume from the last checkpoint (step 6) and end with the uninterrupted
    run's parameters and history, bit for bit."""
    full_path = os.path.join(out, "full.pt")
    if not os.path.isfile(full_path):
        full = simigrad_trainer(MLP(), Regression(), os.path.join(out, "full"), ADAPTIVE, max_steps=10)
        full.train()
        if dist.get_rank() == 0:
            torch.save({"params": flat(full.model), "history": repr(full.simigrad.history)}, full_path)
        dist.barrier()
    folder = os.path.join(out, "lost")
    tr = simigrad_trainer(MLP(), Regression(), folder, ADAPTIVE, max_steps=10, save_strategy="steps", save_steps=3)
    tr.add_callback(_LoseRank(at=7))
    last = get_last_checkpoint(folder) if os.path.isdir(folder) else None
    tr.train(resume_from_checkpoint=last)
    expected = torch.load(full_path)
    assert last is not None and last.endswith("checkpoint-6"), last
    assert torch.equal(flat(tr.model), expected["params"]) and repr(tr.simigrad.history) == expected["history"]
    same_on_every_rank("restart", flat(tr.model), tr.simigrad.history)
    return f"rank 1 lost at step 8, restarted, resumed from {os.path.basename(last)}: bit-identical"


CHECKS = {"fixed": check_fixed, "adaptive": check_adaptive, "resume": check_resume, "restart": check_restart}


def run_named(checks: dict, argv) -> None:
    """``argv``: the output folder, then the names of the checks to run in order; rank 0 prints each one's line."""
    out, names = argv[0], argv[1:]
    for name in names:
        detail = checks[name](out)
        dist.barrier()
        if dist.get_rank() == 0:
            print(f"CHECK {name} OK {detail}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    run_named(CHECKS, sys.argv[1:])
