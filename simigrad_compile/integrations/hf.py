"""Hugging Face ``Trainer`` door: :class:`SimigradTrainer`, a ``Trainer`` whose batch adapts every optimizer step.

Why a subclass and not a ``TrainerCallback``: a callback cannot change the batch. The Trainer (checked on
transformers 5.24) fetches ``gradient_accumulation_steps`` loader batches per optimizer step and finds the step
boundary from ``(step + 1) % gradient_accumulation_steps`` over a count fixed at the start of the epoch; the loader's
batch size is fixed when the loader is built. So the subclass overrides the documented extension points
(``get_train_dataloader``, ``get_batch_samples``, ``training_step``, ``create_optimizer``, ``log``,
``floating_point_ops``) and keeps the Trainer's own loop, clipping, optimizer step, scheduler and logging:

* **One loader item per optimizer step.** ``get_train_dataloader`` yields one item per optimizer step; when the
  Trainer fetches it, the runtime's loader (``run.dataloader``: micro-batches of the current plan's rung, every
  sample once per epoch, ``seed``/``train_sampling_strategy`` honoured) cuts the step's first micro-batch. The
  Trainer itself runs with ``gradient_accumulation_steps=1``.
* **The micro-steps.** ``training_step`` runs the Trainer's own ``training_step`` (forward, loss, backward) on
  each micro-batch of the step and tells the core (``micro_step_done``, with the loss: the history's loss needs no
  extra call). After the last one, ``begin_step`` turns ``p.grad`` into the step's mean gradient and scales the
  LR; so the Trainer's ``max_grad_norm`` clips, and its ``grad_norm`` measures, the step's mean gradient, as in the
  plain loop. ``optimizer.step()`` takes the one real step; ``end_step`` follows in ``on_optimizer_step``.
* **A skipped step** (non-finite loss, gradient or statistics: the core drops the gradients, the optimizer's step
  changes nothing) keeps the LR scheduler where it was (the scheduler's state is restored after the Trainer steps
  it).
* **Logging.** Every Trainer log of the training loss also carries ``cosine``, ``batch_size`` and ``lr_scale`` of
  the last step (``Trainer.log``: TensorBoard, W&B, ... and ``state.log_history``); ``trainer.simigrad.history``
  has every step, and ``log_dir`` the CSV.

Configuration: ``SimigradTrainer(..., simigrad={...})`` (config fields, or a ``SimigradConfig``) on top of the
``SIMIGRAD_*`` environment. Unless set there, ``batch_size`` (B0) and ``max_micro_batch_size`` (the largest rung)
are ``per_device_train_batch_size``.

Compiling. The ``batch`` statistics (one micro-step per step) need the model compiled with the backend before the
Trainer is built: ``model.compile(backend="simigrad")`` (in place, the model stays a ``PreTrainedModel``).
``TrainingArguments(torch_compile_backend="simigrad")`` does not work: accelerate accepts only its own list of
backends. An uncompiled model trains on the ``microsteps`` statistics (>= 2 micro-steps per step), with a warning
that says this.

Steps and epochs. ``max_steps`` counts optimizer steps, as always. With ``num_train_epochs`` the number of steps
per epoch is not known in advance: the loader reports the most an epoch can take (every step at
``max(min_batch_size, 2)`` samples), which is the horizon the Trainer gives its LR scheduler; set ``max_steps`` for
a schedule that ends where training ends.

Many processes (the Trainer's own DDP: ``torchrun`` or ``accelerate launch``; on CPU
``TrainingArguments(use_cpu=True, ddp_backend="gloo")``). The core is built at ``on_train_begin`` from
``trainer.model_wrapped``, the ``DistributedDataParallel`` module the Trainer made, so ``AdaptiveBatching`` installs
the split-group comm hook on it (``ranks`` statistics, the bytes of plain DDP). The global batch is
``world x micro x accumulation``; B0 defaults to ``per_device_train_batch_size x world``. The loader gives each rank
its ``DistributedSampler``-like shard and turns DDP's gradient sync off for every micro-batch but the step's last
(``run.state.sync_gradients``, as under ``no_sync``). The step's loss is the mean over every rank's samples (one
all-reduce of two scalars per step), so every rank records the same history and skips the same steps. Logs and
checkpoints follow the Trainer's rank-0 rules; the core's ``log_dir`` is written by process 0 only.

FSDP2 (``TrainingArguments(fsdp=True, fsdp_config={"version": 2})``, on accelerator devices: accelerate has no FSDP
on CPU): ``trainer.model_wrapped`` is the ``fully_shard`` root; the core installs the split reduce-scatter on its
units and turns FSDP's gradient sync off inside a window, so FSDP communicates once per step
(:mod:`.hf_fsdp`: what is refused and why).

Checkpoints. Every Trainer checkpoint also holds the run's state (``simigrad.pt``: controller, plan, data position,
history; written by process 0, identical on every rank). ``train(resume_from_checkpoint=...)`` restores it and the
loader resumes at the run's own position in the data, so a resumed run continues exactly as the uninterrupted one;
the Trainer's own skipping of seen batches is not used (``ignore_data_skip`` changes nothing). A checkpoint without
``simigrad.pt`` is refused. The door relies on the Trainer's ``_init_training_state``,
``_save_optimizer_and_scheduler`` and ``_load_optimizer_and_scheduler`` (checked on transformers 5.25).

Refused by name (``train()`` raises): ``gradient_accumulation_steps != 1``, DeepSpeed, FSDP1, ``fsdp`` where
accelerate did not enable it (CPU), ``resume_from_checkpoint`` under FSDP, ``DataParallel``
(several GPUs in one process), ``WORLD_SIZE > 1`` with a one-process ``TrainingArguments`` (each rank would train
alone), ``fp16`` (GradScaler; ``bf16`` works), ``auto_find_batch_size``, ``include_num_input_tokens_seen``,
``train_sampling_strategy`` other than ``random``/``sequential``, an ``IterableDataset``.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping, Optional, Union

import torch
import torch.distributed as dist
from accelerate.optimizer import AcceleratedOptimizer
from transformers import Trainer, TrainerCallback

from .. import envvars
from ..config import SimigradConfig, from_mapping, resolve_group_mode
from ..runtime.adaptive import AdaptiveBatching
from .batches import samples_in
from .door_rules import logged, refuse, shared_refusals
from .hf_fsdp import resume_problems, sharding_problems
from .schedule import ScheduleHold

log = logging.getLogger("simigrad_compile")
COMPILE_HINT = ("compile the model with the backend before building the Trainer: model.compile(backend='simigrad') "
                "(TrainingArguments(torch_compile_backend='simigrad') does not work: accelerate accepts only its "
                "own list of backends)")
"""How to compile a model for this door; the core's warning about a model without statistics names it."""
RUN_STATE_NAME = "simigrad.pt"
"""The run's state (``run.state_dict()``) in each Trainer checkpoint folder."""


class _StepBatches:
    """One optimizer step's micro-batches: the first, cut when the Trainer fetched the step, and the rest."""

    def __init__(self, first: Any, rest):
        self.first, self.rest, self.flops = first, rest, 0.0


class _StepLoader:
    """The Trainer's training "loader": one :class:`_StepBatches` per optimizer step."""

    def __init__(self, trainer: "SimigradTrainer", dataset, collate_fn):
        self.trainer, self.dataset, self.collate_fn = trainer, dataset, collate_fn
        self.endless = trainer.args.max_steps > 0

    def __len__(self) -> int:
        if self.endless:  # the Trainer then counts max_steps and treats the data as one long epoch
            raise TypeError("SimigradTrainer's loader has no fixed number of steps per epoch")
        lo = max(2, self.trainer.simigrad_config().min_batch_size)
        return max(1, math.ceil(len(self.dataset) / lo))

    def __iter__(self):
        trainer = self.trainer
        run, args = trainer.simigrad, trainer.args
        if run is None:
            raise RuntimeError("simigrad: the Trainer asked for training data before create_optimizer()")
        loader = run.dataloader(self.dataset, shuffle=args.train_sampling_strategy == "random",
                                seed=args.data_seed if args.data_seed is not None else args.seed,
                                collate_fn=self.collate_fn, device=args.device,
                                num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory)
        while True:
            micro = iter(loader)
            stepped = False
            for first in micro:  # the Trainer pulls the rest of the step's micro-batches in training_step
                stepped = True
                yield _StepBatches(first, micro)
            if not self.endless or not stepped:
                return


class _Boundary(TrainerCallback):
    """Ends the core's step after the Trainer's optimizer step; holds the LR schedule over a skipped step."""

    def __init__(self, trainer: "SimigradTrainer"):
        self.trainer = trainer
        self.hold: Optional[ScheduleHold] = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._start_run()

    def on_optimizer_step(self, args, state, control, **kwargs):
        run = self.trainer.simigrad
        run.end_step()
        if not run.history[-1]["stepped"]:
            self.hold = ScheduleHold([self.trainer.lr_scheduler], run.user_optimizer)

    def on_step_end(self, args, state, control, **kwargs):
        if self.hold is not None:
            self.hold.restore()
            self.hold = None

    def on_train_end(self, args, state, control, **kwargs):
        if self.trainer.simigrad is not None:
            self.trainer.simigrad.close()


class SimigradTrainer(Trainer):
    """A ``transformers.Trainer`` whose global batch adapts at every optimizer step (SimiGrad); module docstring.

    ``trainer.simigrad`` is the runtime core (:class:`~simigrad_compile.AdaptiveBatching`) once training starts.
    """

    def __init__(self, *args, simigrad: Optional[Union[Mapping[str, Any], SimigradConfig]] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.simigrad_options = simigrad
        self.simigrad: Optional[AdaptiveBatching] = None
        self._simigrad_logged = 0
        self._simigrad_optimizer: Optional[torch.optim.Optimizer] = None
        self._simigrad_resume: Optional[dict] = None
        self._simigrad_weight = 1.0  # the next training loss's backward factor (a held window's n / d)
        self.add_callback(_Boundary(self))

    def simigrad_config(self) -> SimigradConfig:
        """The run's config: ``simigrad=`` over the environment, with the Trainer's batch where neither sets it."""
        options = self.simigrad_options
        if isinstance(options, SimigradConfig):
            return options
        per_device = self.args.per_device_train_batch_size
        base = envvars.config_from_env(defaults={"batch_size": per_device * self.args.world_size,
                                                 "max_micro_batch_size": per_device})
        return from_mapping(options, base=base)

    # --- refusals ---------------------------------------------------------------------------------------------
    def _check_supported(self) -> None:
        args = self.args
        problems = shared_refusals(  # world_size=1: the Trainer's DDP and FSDP2 run here (hf_fsdp: the rest)
            accumulation_option="gradient_accumulation_steps", accumulation=args.gradient_accumulation_steps,
            world_size=1, grad_scaler="fp16" if args.fp16 else None, self_accumulating=None)
        problems += sharding_problems(self)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and args.world_size == 1:
            problems.append(f"WORLD_SIZE={launched} with a one-process TrainingArguments (each rank would train "
                            "alone); on CPU set TrainingArguments(use_cpu=True, ddp_backend='gloo')")
        mode = self.simigrad_config().group_mode
        if args.world_size > 1 and resolve_group_mode(mode, args.world_size) != "ranks":
            problems.append(f"group_mode={mode!r} on {args.world_size} processes (the statistics come from the "
                            "ranks' halves there); use group_mode='auto' or 'ranks'")
        if args.n_gpu > 1:
            problems.append(f"DataParallel over {args.n_gpu} GPUs in one process; launch one process per GPU "
                            "(torchrun or accelerate launch)")
        if args.auto_find_batch_size:
            problems.append("auto_find_batch_size (the run chooses the batch)")
        if getattr(args, "include_num_input_tokens_seen", "no") not in ("no", False):
            problems.append("include_num_input_tokens_seen")
        if args.train_sampling_strategy not in ("random", "sequential"):
            problems.append(f"train_sampling_strategy={args.train_sampling_strategy!r} (random or sequential)")
        if isinstance(self.train_dataset, torch.utils.data.IterableDataset):
            problems.append("an IterableDataset (the run's loader needs the dataset's length)")
        refuse("SimigradTrainer", problems)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        self._check_supported()
        refuse("SimigradTrainer", resume_problems(self, resume_from_checkpoint))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    # --- the core ---------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        self._simigrad_optimizer = optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer
        return optimizer

    def _start_run(self) -> None:
        """Build the core on the model the Trainer wrapped (DDP under many processes: the comm hook goes on it;
        the ``fully_shard`` root under FSDP2: the split reduce-scatter) and restore the run's state when resuming."""
        if self.simigrad is not None:
            self.simigrad.close()
        if self._simigrad_optimizer is None:
            raise RuntimeError("simigrad: training began without create_optimizer()")
        config = self.simigrad_config()
        if self.args.process_index != 0:
            config = config.replace(log_dir=None)  # one CSV/TensorBoard log, written by process 0
        self.simigrad = run = AdaptiveBatching(self.model_wrapped, self._simigrad_optimizer, config=config)
        run.statistics.compile_hint = COMPILE_HINT
        if self._simigrad_resume is not None:
            run.load_state_dict(self._simigrad_resume)
            self._simigrad_resume = None
            length = self._epoch_length()
            if run.state.position >= length:  # saved after an epoch's last step, before the loader closed it
                run.finish_epoch(length)
        self._simigrad_logged = len(run.history)

    def _epoch_length(self) -> int:
        """This rank's samples per epoch (``run.dataloader``'s shard: the dataset padded to the world size)."""
        return -(-len(self.train_dataset) // self.args.world_size)

    # --- checkpoints ------------------------------------------------------------------------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.simigrad is not None and self.args.should_save:
            torch.save(self.simigrad.state_dict(), os.path.join(output_dir, RUN_STATE_NAME))

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint,
                             trial):
        """The Trainer's state, and on resume the run's: the loader resumes at the run's position in the data, so
        the Trainer skips no batch; its epoch is the run's."""
        epochs, _ = super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs,
                                                 resume_from_checkpoint, trial)
        self._simigrad_resume = None
        if resume_from_checkpoint is None:
            return epochs, 0
        path = os.path.join(resume_from_checkpoint, RUN_STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"simigrad: {path} is missing: the checkpoint was not written by SimigradTrainer, and without the "
                "run's state (batch size, controller, position in the data) it cannot continue exactly; resume "
                "from a SimigradTrainer checkpoint or start a new run")
        self._simigrad_resume = state = torch.load(path, weights_only=True)
        if self.args.max_steps > 0:  # one long "epoch" for the Trainer: the loader runs its passes by itself
            return epochs, 0
        length = self._epoch_length()
        epoch, position = state["epoch"], state["position"]
        return (epoch + position // length if length else epoch), 0

    def get_train_dataloader(self):
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        dataset, collate_fn = self.train_dataset, self.data_collator
        try:
            import datasets

            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description="training")
            else:
                collate_fn = self._get_collator_with_removed_columns(collate_fn, description="training")
        except ImportError:
            collate_fn = self._get_collator_with_removed_columns(collate_fn, description="training")
        return _StepLoader(self, dataset, collate_fn)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        try:
            return [next(epoch_iterator)], None
        except StopIteration:
            self.control.should_epoch_stop = True  # the epoch's samples are used up
            return [], None

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not isinstance(inputs, _StepBatches):
            raise TypeError("simigrad: SimigradTrainer.training_step takes the steps of its own train loader")
        run, dim = self.simigrad, self.simigrad.config.batch_dim
        many = run.world_size > 1
        micro, total, samples = inputs.first, None, 0
        while True:
            n = samples_in(micro, dim)
            window = run.state.window  # FSDP2 holds the window's sum: a micro-batch of another size (an exact
            # epoch tail) is weighed by its own backward (compute_loss, Window.backward_scale)
            if window is not None and window.held and not window.complete and n != window.sizes[window.done]:
                raise RuntimeError(f"simigrad: a micro-batch of {n} samples where the window expects "
                                   f"{window.sizes[window.done]} under FSDP2; please report this")
            self._simigrad_weight = window.backward_scale if window is not None else 1.0
            inputs.flops += float(super().floating_point_ops(micro))
            try:
                loss = super().training_step(model, micro)
            finally:
                self._simigrad_weight = 1.0
            total = loss * n if total is None else total + loss * n
            samples += n
            if many and run.state.sync_gradients:  # the step's last micro-batch: the loss over every rank
                mean = _global_mean(total, samples)
                done = run.micro_step_done(loss=mean * (samples / n))  # the core weighs it by n, divides by samples
            else:
                done = run.micro_step_done(loss=None if many else loss)
            if done:
                break
            micro = next(inputs.rest)
        run.begin_step()  # False: gradients dropped; the optimizer's step and the clipping then change nothing
        return mean if many else total / samples

    def compute_loss(self, model, inputs, *args, **kwargs):
        out = super().compute_loss(model, inputs, *args, **kwargs)
        loss, factor = out[0] if isinstance(out, tuple) else out, self._simigrad_weight
        if factor != 1.0 and torch.is_tensor(loss) and loss.requires_grad:
            loss.register_hook(lambda grad: grad * factor)  # the backward only: the logged loss stays the mean
        return out

    def floating_point_ops(self, inputs) -> float:
        return inputs.flops if isinstance(inputs, _StepBatches) else super().floating_point_ops(inputs)

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        run = self.simigrad
        if run is not None and "loss" in logs and len(run.history) > self._simigrad_logged:
            record = run.history[-1]
            logs = {**logs, **logged(record)}
            self._simigrad_logged = len(run.history)
        super().log(logs, start_time)


def _global_mean(total: torch.Tensor, samples: int) -> torch.Tensor:
    """The sample-weighted mean loss of a step over every rank (the same value, bit for bit, on each)."""
    both = torch.stack([total.detach().double().reshape(()), total.new_tensor(float(samples), dtype=torch.float64)])
    dist.all_reduce(both)
    return (both[0] / both[1]).to(total.dtype)


__all__ = ["COMPILE_HINT", "RUN_STATE_NAME", "SimigradTrainer"]
