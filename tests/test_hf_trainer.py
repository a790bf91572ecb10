"""The Hugging Face door (``SimigradTrainer``) with the real ``transformers`` Trainer on a tiny BERT built from a config
(no download): its updates equal the core's (``AdaptiveBatching`` on the same samples) and a hand-written fp64 plain
loop over the same samples with the mean gradient."""

import copy
import math
import os

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import TrainingArguments, default_data_collator  # noqa

import simigrad_compile as sc  # noqa: E402
from simigrad_compile.integrations.hf import SimigradTrainer  # noqa: E402
from simigrad_testkit import hf_dist_worker as hf_data  # noqa: E402
from simigrad_testkit.hf_dist_worker import tiny_bert  # noqa: E402

N, B0, SEED, LR = 44, 8, 7, 0.1
OPTIONS = dict(group_mode="microsteps", batch_size=B0, min_batch_size=4, max_batch_size=24, target_similarity=0.3,
               max_micro_batch_size=4)


def Tokens(n=N, ignored=()):
    return hf_data.Tokens(n, ignored)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)


def trainer(tmp_path, model, data, simigrad=OPTIONS, **args):
    settings = dict(output_dir=str(tmp_path), learning_rate=LR, per_device_train_batch_size=4, logging_steps=1,
                    save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=SEED,
                    lr_scheduler_type="constant")
    settings.update(args)
    return SimigradTrainer(model=model, args=TrainingArguments(**settings), train_dataset=data,
                           data_collator=default_data_collator, optimizers=(sgd(model), None), simigrad=simigrad)


def plain_fp64(model, data, order, records, clip=None, schedule=lambda applied: 1.0):
    """The user's plain loop in fp64: per step, one backward of the mean loss over that step's samples, the clipping
    (``clip_grad_norm_``'s formula) by hand, the LR times ``sqrt(B/B0)`` and the schedule; a skipped step applies
    nothing."""
    model = copy.deepcopy(model).double()
    opt = sgd(model)
    position, applied = 0, 0
    for record in records:
        idx = order[position:position + record["batch_size"]]
        position += record["batch_size"]
        if not record["stepped"]:
            continue
        model.zero_grad()
        model(input_ids=data.ids[idx], labels=data.labels[idx]).loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if clip is not None:
            norm = torch.cat([g.flatten() for g in grads]).norm().item()
            for g in grads:
                g.mul_(min(1.0, clip / (norm + 1e-6)))
        for group in opt.param_groups:
            group["lr"] = LR * schedule(applied) * math.sqrt(record["batch_size"] / B0)
        opt.step()
        applied += 1
    return model


def flat(model):
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def test_trainer_steps_equal_the_core_and_a_plain_fp64_loop(tmp_path):
    data, clip = Tokens(), 0.15
    model = tiny_bert()
    start = copy.deepcopy(model)
    tr = trainer(tmp_path, model, data, num_train_epochs=1, max_grad_norm=clip)
    tr.train()
    history = tr.simigrad.history
    assert len(history) >= 4 and sum(r["batch_size"] for r in history) == N       # every sample once
    assert len({r["batch_size"] for r in history}) > 1 and {r["statistics"] for r in history} == {"microsteps"}
    assert any(r["grad_norm"] > clip for r in history)                            # clipping acted
    assert {r["micro_batch_size"] for r in history} > {4}                         # rungs other than the top one

    # The core's own door on the same samples (its loader, the same seed) and the same plan.
    core_model = copy.deepcopy(start)
    run = sc.AdaptiveBatching(core_model, sgd(core_model), **OPTIONS)
    for batch in run.dataloader(data, shuffle=True, seed=SEED, collate_fn=default_data_collator):
        core_model(**batch).loss.backward()
        run.clip_grad_norm_(clip)
        run.optimizer.step()
        run.optimizer.zero_grad()
    run.close()
    keys = ("batch_size", "micro_batch_size", "accumulation", "stepped")
    assert [[r[k] for k in keys] for r in history] == [[r[k] for k in keys] for r in run.history]
    torch.testing.assert_close(flat(model), flat(core_model), rtol=1e-6, atol=1e-6)

    # A hand-written fp64 plain loop over the same samples (the loader's documented order: one permutation of
    # seed + epoch), with the mean gradient.
    order = torch.randperm(N, generator=torch.Generator().manual_seed(SEED)).tolist()
    reference = plain_fp64(start, data, order, history, clip=clip)
    torch.testing.assert_close(flat(model), flat(reference), rtol=1e-5, atol=1e-5)
    for r in history:
        assert r["lr_scale"] == pytest.approx(math.sqrt(r["batch_size"] / B0))

    # The Trainer's own logging carries the step's cosine, batch size and LR scale.
    logged = [entry for entry in tr.state.log_history if "loss" in entry]
    assert [(e["cosine"], e["batch_size"], e["lr_scale"]) for e in logged] == \
        [(r["cosine"], r["batch_size"], r["lr_scale"]) for r in history]
    assert [e["loss"] for e in logged] == pytest.approx([r["loss"] for r in history], rel=1e-6)


def test_a_non_finite_step_is_skipped_and_the_schedule_holds(tmp_path):
    """Samples 8..11 (the first micro-batch of step 2, in order) have no label: their mean loss is NaN. The whole
    step is skipped: parameters, momentum and the linear schedule's position stay; ``max_steps`` counts it."""
    data = Tokens(ignored=range(8, 12))
    model = tiny_bert()
    start = copy.deepcopy(model)
    steps = 4
    tr = trainer(tmp_path, model, data, max_steps=steps, lr_scheduler_type="linear",
                 train_sampling_strategy="sequential", max_grad_norm=0.0)
    tr.train()
    history = tr.simigrad.history
    assert len(history) == steps and [r["stepped"] for r in history] == [True, False, True, True]
    assert history[1]["skipped"] == "non-finite-loss" and math.isnan(history[1]["loss"])
    assert tr.lr_scheduler.last_epoch == 3                                        # three applied steps
    reference = plain_fp64(start, data, list(range(N)), history, schedule=lambda applied: (steps - applied) / steps)
    torch.testing.assert_close(flat(model), flat(reference), rtol=1e-5, atol=1e-5)


def test_unsupported_settings_are_refused_by_name(tmp_path):
    tr = trainer(tmp_path, tiny_bert(), Tokens(), max_steps=1, gradient_accumulation_steps=2)
    with pytest.raises(NotImplementedError, match="gradient_accumulation_steps=2"):
        tr.train()


ONE_MICRO_STEP = dict(OPTIONS, group_mode="auto", min_batch_size=8, max_batch_size=8, max_micro_batch_size=8)


def test_an_uncompiled_model_is_told_how_to_compile_it_and_that_way_works(tmp_path, caplog):
    """Without the backend the first step has no statistics: the warning names the compile call that works under
    this door (``model.compile(backend="simigrad")`` before the Trainer; accelerate refuses
    ``torch_compile_backend="simigrad"``). Compiled that way, a one-micro-step step has ``batch`` statistics."""
    with caplog.at_level("WARNING", logger="simigrad_compile"):
        tr = trainer(tmp_path / "plain", tiny_bert(), Tokens(), simigrad=ONE_MICRO_STEP, max_steps=2)
        tr.train()
    warned = [r.getMessage() for r in caplog.records if "no split statistics for this model" in r.getMessage()]
    assert len(warned) == 1 and "model.compile(backend='simigrad')" in warned[0], warned
    assert "torch_compile_backend" in warned[0]
    with pytest.raises(ValueError, match="DynamoBackend"):  # why the warning does not suggest TrainingArguments
        from accelerate.utils import TorchDynamoPlugin

        TorchDynamoPlugin(backend="simigrad")
    caplog.clear()
    model = tiny_bert()
    model.compile(backend="simigrad", options={"compiler": "aot_eager"})
    with caplog.at_level("WARNING", logger="simigrad_compile"):
        tr = trainer(tmp_path / "compiled", model, Tokens(), simigrad=ONE_MICRO_STEP, max_steps=2)
        tr.train()
    assert [r["statistics"] for r in tr.simigrad.history] == ["batch", "batch"]
    assert not [r for r in caplog.records if "no split statistics" in r.getMessage()]
