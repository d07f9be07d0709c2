"""The train loop: AdamW with warm-up and clipping, EMA, bf16 autocast on CUDA, DDP, checkpoints, logs, samples.

Every random draw of a step (data batch, t, noise, dropout) comes from generators seeded by (seed, step, rank),
so a run resumed from a checkpoint reproduces the uninterrupted run exactly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

import models
from atomic_io import folder_lock, write_json, write_text
from models.guidance import conditional_score_fn
from data.loaders import check_num_classes, get_data_stream, stream_seed, step_generator
from errors import Interrupted, UserError
from sde_lib import get_sde
from solvers.guidance import conditional_score
from training import distributed
from training.checkpoint import (FORMAT_VERSION, checkpoint_path, config_differences, config_to_json,
                                 load_checkpoint, rng_state, save_checkpoint, set_rng_state)
from training.device import get_device
from training.load_errors import describe_state_error
from training.logger import TrainLogger
from training.losses import drop_labels, get_loss_fn
from training.stop_signal import stop_on_signals

_SALT_LOSS, _SALT_DROPOUT = 0x1055, 0xD409
STOP_CHECK_EVERY = 10  # steps between the ranks' checks for a stop signal under torchrun (torchrun kills ~30 s later)


class TrainingDiverged(UserError):
    """The loss, the gradient, the weights or the EMA weights became NaN or infinite."""


def weights_finite(state: "_State") -> torch.Tensor:
    """A device bool: every model weight and EMA shadow weight is finite (one reduction, no host sync)."""
    tensors = [p.detach() for p in state.model.parameters()] + list(state.ema.shadow_params)
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


@dataclasses.dataclass
class TrainEvent:
    """What a training callback sees: the run at a completed step, with the EMA weights' score function.

    `score_fn` is valid only during the call (the trainer swaps the EMA weights in before the callbacks and
    restores the trained weights after them) and is called under torch.no_grad().
    """

    step: int
    final: bool  # step == training.n_iters
    config: Any
    sde: Any
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    device: torch.device
    workdir: str


class TrainCallback(Protocol):
    """Runs every `every` completed steps (0: only at the final step) and at the final step of training;
    returns scalars to log (TensorBoard at that step, `train_summary.json` under "metrics") or None."""

    every: int

    def __call__(self, event: TrainEvent) -> dict[str, float] | None: ...


@dataclasses.dataclass
class TrainResult:
    """What a call to `train` did."""

    step: int  # training steps completed in total
    steps_this_run: int
    loss: float  # mean loss over the last logging window (nan if none ran)
    seconds: float  # wall time of the training steps of this call, callbacks excluded
    checkpoint: str
    callback_seconds: float = 0.0  # wall time spent in the callbacks
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # the callbacks' last scalars
    model: nn.Module | None = dataclasses.field(default=None, repr=False)  # trained weights (not the EMA)


def _check_config(config, world_size: int) -> None:
    tr = config.training
    for key in ("batch_size", "n_iters", "log_every", "snapshot_every"):
        if int(tr[key]) <= 0:
            raise UserError(f"training.{key} must be positive, got {tr[key]}")
    if int(tr.batch_size) % world_size:
        raise UserError(f"training.batch_size={tr.batch_size} must be divisible by the number of processes "
                        f"({world_size})")
    if float(tr.lr) <= 0 or int(tr.warmup) < 0 or float(tr.grad_clip) < 0:
        raise UserError(f"need training.lr > 0, warmup >= 0, grad_clip >= 0; got {tr.lr}, {tr.warmup}, {tr.grad_clip}")


def learning_rate(config, step: int) -> float:
    """Linear warm-up over training.warmup steps to training.lr, then constant (Song et al., 2021, app. H)."""
    warmup = int(config.training.warmup)
    base = float(config.training.lr)
    return base * min(1.0, (step + 1) / warmup) if warmup > 0 else base


def _make_optimizer(config, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(lr=float(config.training.lr), betas=(0.9, 0.999), eps=1e-8,
                  weight_decay=float(config.training.weight_decay))
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(model.parameters(), **kwargs)


class _State:
    """Model, EMA, optimizer and step: what a checkpoint holds."""

    def __init__(self, config, device: torch.device, channels_last: bool):
        torch.manual_seed(int(config.seed))  # same initial weights on every process
        self.model = models.create_model(config).to(device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = models.ExponentialMovingAverage(self.model, float(config.model.ema_rate))
        self.optimizer = _make_optimizer(config, self.model, device)
        self.step = 0

    def to_dict(self, config) -> dict:
        return {"format": FORMAT_VERSION, "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "step": self.step, "config": config_to_json(config),
                "rng": rng_state(), "data": {"seed": int(config.seed), "next_step": self.step}}

    def load(self, state: dict, path: str) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            _check_optimizer_state(self.optimizer)
            self.step = int(state["step"])
            if "rng" in state:
                set_rng_state(state["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as error:
            raise UserError(f"checkpoint {path} does not fit this config's network or is damaged "
                            f"({describe_state_error(error)})") from None


def _final_outputs_missing(workdir: str, step: int, n_iters: int, callbacks) -> bool:
    """A finished run whose end-of-training callbacks or summary never completed (killed, or a callback failed)."""
    import json

    if step != n_iters:
        return False
    try:
        with open(os.path.join(workdir, "train_summary.json"), encoding="utf-8") as handle:
            return json.load(handle).get("step") != step
    except (OSError, ValueError, AttributeError):
        return True


def _finish_outputs(config, sde, state: "_State", device, workdir: str, callbacks, ckpt: str) -> "TrainResult":
    """Run the final callbacks and write train_summary.json for a run that stopped after its last checkpoint."""
    print(f"[train] {ckpt} is at the last step ({state.step}) but the run's final outputs are missing: "
          "making them now")
    start = time.perf_counter()
    metrics = _run_callbacks(callbacks, config, sde, state, device, workdir, int(config.training.n_iters))
    spent = time.perf_counter() - start
    write_json(os.path.join(workdir, "train_summary.json"),
               {"step": state.step, "loss": None, "seconds": 0.0, "steps_this_run": 0, "steps_per_s": None,
                "callback_seconds": spent, "metrics": metrics}, indent=1)
    return TrainResult(state.step, 0, math.nan, 0.0, ckpt, spent, metrics, state.model)


def _check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Adam's moments have their parameter's shape (a mismatch would fail only at the first step, deep in torch)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if key in ("exp_avg", "exp_avg_sq") and (not isinstance(value, torch.Tensor) or value.shape != param.shape):
                    raise ValueError(f"optimizer state {key!r} does not match a parameter of shape {tuple(param.shape)}")


class TrainStep:
    """One optimisation step of the train loop (`train` and benchmarks/throughput.py both call this one).

    `step_fn(step) -> (loss, grad_norm)`, both detached device tensors: the batch of this process at `step`,
    weighted DSM loss (or the configured objective) under autocast(`autocast_dtype`) with float32 master
    weights, backward, gradient clipping, AdamW (fused on CUDA), EMA update. No host synchronisation.
    """

    def __init__(self, config, sde, state: "_State", stream, device: torch.device,
                 info: distributed.DistInfo = distributed.DistInfo(), *, autocast_dtype: torch.dtype | None = None):
        tr = config.training
        self.config, self.state, self.stream, self.device, self.info = config, state, stream, device, info
        model = state.model
        train_model: nn.Module = model
        if info.world_size > 1:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if tr.compile:
            train_model = torch.compile(train_model)
        self.train_model = train_model
        self.loss_fn = get_loss_fn(config, sde)
        self.score_fn = models.get_score_fn(sde, train_model, continuous=bool(tr.continuous),
                                             **models.score_fn_options(config))
        self.num_classes = check_num_classes(config)  # > 0: class-conditional with label dropout (issue 8)
        self.class_score_fn = (conditional_score_fn(sde, train_model, bool(tr.continuous),
                                                    **models.score_fn_options(config))
                               if self.num_classes else None)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_norm = float(tr.grad_clip) if float(tr.grad_clip) > 0 else math.inf
        self.autocast_dtype = autocast_dtype

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        config, state, info = self.config, self.state, self.info
        generator = step_generator(config.seed, step, info.rank, _SALT_LOSS, device=self.device)
        torch.manual_seed(stream_seed(config.seed, step, info.rank, _SALT_DROPOUT))  # dropout masks
        if self.class_score_fn is None:
            x0, step_score_fn = self.stream.batch(step), self.score_fn
        else:
            x0, y = self.stream.labelled_batch(step)
            y = drop_labels(y, float(config.model.p_uncond), self.num_classes, generator)
            step_score_fn = conditional_score(self.class_score_fn, y)
        lr = learning_rate(config, step)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        with self._autocast():
            loss = self.loss_fn(step_score_fn, x0, generator)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        state.optimizer.step()
        state.ema.update(state.model)
        state.step = step + 1
        return loss.detach(), grad_norm.detach()


def new_train_step(config, stream, device: torch.device, *,
                   autocast_dtype: torch.dtype | None = None) -> TrainStep:
    """A fresh model/EMA/optimizer (channels_last for images on CUDA) and its TrainStep over `stream`."""
    channels_last = device.type == "cuda" and config.data.kind == "image"
    state = _State(config, device, channels_last)
    state.model.train()
    return TrainStep(config, get_sde(config), state, stream, device, autocast_dtype=autocast_dtype)


def _resume(state: _State, config, workdir: str, device: torch.device) -> bool:
    path = checkpoint_path(workdir)
    if not os.path.exists(path):
        return False
    saved = load_checkpoint(path, map_location=device)
    diffs = config_differences(saved["config"], config)
    if diffs:
        raise UserError(f"cannot resume {path}: the config differs from the one it was trained with "
                        f"({'; '.join(diffs[:6])}); use the same settings or a new --workdir")
    state.load(saved, path)
    return True


def _callback_due(callback, done: int, n_iters: int) -> bool:
    every = int(callback.every)
    return done == n_iters or (every > 0 and done % every == 0)


def _run_callbacks(callbacks: Sequence[TrainCallback], config, sde, state: "_State", device: torch.device,
                   workdir: str, n_iters: int) -> dict[str, float]:
    """Call the due callbacks with the EMA weights swapped in (under no_grad); their scalars, merged."""
    done = state.step
    due = [cb for cb in callbacks if _callback_due(cb, done, n_iters)]
    if not due:
        return {}
    model = state.model
    state.ema.store(model)
    state.ema.copy_to(model)
    model.eval()
    scalars: dict[str, float] = {}
    try:
        score_fn = models.get_score_fn(sde, model, continuous=bool(config.training.continuous),
                                       **models.score_fn_options(config))
        event = TrainEvent(step=done, final=done == n_iters, config=config, sde=sde, score_fn=score_fn,
                           device=device, workdir=workdir)
        with torch.no_grad():
            for callback in due:
                values = callback(event)
                if values:
                    scalars.update({str(k): float(v) for k, v in values.items()})
    finally:
        state.ema.restore(model)
        model.train()
    return scalars


def train(config, workdir: str, *, max_steps: int | None = None, progress: bool | None = None,
          callbacks: Sequence[TrainCallback] = ()) -> TrainResult:
    """Train (or resume training of) the model config describes in `workdir`; see the module docstring.

    `max_steps` stops after that many steps of this call (with a checkpoint), as if the run were interrupted.
    `progress` shows the tqdm bar (default: config.training.progress). `callbacks` (see `TrainCallback`) run
    on the main process every `every` steps and at the final step, with the EMA weights; their scalars go to
    TensorBoard and `train_summary.json`, their wall time is excluded from the training rate. Under torchrun
    pass the same callbacks on every process (the others wait for the main one at the same steps).
    """
    if progress is None:
        progress = bool(config.training.get("progress", True))
    for callback in callbacks:
        if not callable(callback) or int(getattr(callback, "every", -1)) < 0:
            raise UserError(f"training callback {callback!r} needs __call__ and an int attribute every >= 0")
    device = get_device(config)
    info = distributed.setup(device)
    try:
        # one training per workdir at a time (two would overwrite each other's checkpoints); the main process
        # holds the lock for the whole run
        lock = folder_lock(workdir, "training run") if info.is_main else contextlib.nullcontext()
        with lock:
            return _train(config, workdir, distributed.local_device(device, info), info, max_steps, progress,
                          tuple(callbacks))
    finally:
        distributed.cleanup(info)


def _train(config, workdir: str, device: torch.device, info: distributed.DistInfo,
           max_steps: int | None, progress: bool, callbacks: tuple = ()) -> TrainResult:
    _check_config(config, info.world_size)
    tr = config.training
    on_cuda = device.type == "cuda"
    is_image = config.data.kind == "image"
    channels_last = on_cuda and is_image
    autocast_bf16 = on_cuda and bool(tr.bf16)  # CPU always trains in float32
    sde = get_sde(config)
    per_rank_batch = int(tr.batch_size) // info.world_size
    stream = get_data_stream(config, per_rank_batch, rank=info.rank, world_size=info.world_size, device=device,
                             channels_last=channels_last)

    state = _State(config, device, channels_last)
    resumed = _resume(state, config, workdir, device)
    start = state.step
    end = int(tr.n_iters) if max_steps is None else min(int(tr.n_iters), start + int(max_steps))
    ckpt = checkpoint_path(workdir)
    if start >= end:  # config.json keeps describing the checkpoint (not this command's n_iters)
        if info.is_main and _final_outputs_missing(workdir, start, int(tr.n_iters), callbacks):
            return _finish_outputs(config, sde, state, device, workdir, callbacks, ckpt)
        if info.is_main:
            print(f"[train] {ckpt} is already at step {start} (training.n_iters={tr.n_iters}); nothing to do")
        return TrainResult(start, 0, math.nan, 0.0, ckpt, model=state.model)

    model = state.model
    train_step = TrainStep(config, sde, state, stream, device, info,
                           autocast_dtype=torch.bfloat16 if autocast_bf16 else None)
    if info.is_main:  # only once everything the steps need was built (a bad loss name leaves no file behind)
        os.makedirs(workdir, exist_ok=True)
        write_text(os.path.join(workdir, "config.json"), config_to_json(config))
    log_every, snapshot_every = int(tr.log_every), int(tr.snapshot_every)
    logger = TrainLogger(workdir, start, int(tr.n_iters), enabled=info.is_main, progress=progress)
    if resumed:
        logger.message(f"[train] resumed from {ckpt} at step {start}")

    loss_sum = torch.zeros((), device=device)
    grad_sum = torch.zeros((), device=device)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    window, window_start, last_good = 0, time.perf_counter(), start
    t0 = time.perf_counter()
    last_loss = math.nan
    metrics: dict[str, float] = {}
    callback_seconds = 0.0
    model.train()
    stopped = False
    with stop_on_signals() as stop, contextlib.closing(logger):
        for step in range(start, end):
            loss, grad_norm = train_step(step)
            lr = learning_rate(config, step)
            loss_sum += loss.float()
            grad_sum += grad_norm.float()
            bad |= ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
            window += 1
            done = state.step
            log_due = done % log_every == 0 or done == end
            snapshot_due = done % snapshot_every == 0 or done == end
            callbacks_due = any(_callback_due(cb, done, int(tr.n_iters)) for cb in callbacks)
            # SIGINT / SIGTERM: checked after every step by one process; under torchrun every STOP_CHECK_EVERY
            # steps on all ranks together (a collective, so at the same steps everywhere), and at the other sync points
            stop_due = stop.requested if info.world_size == 1 else done % STOP_CHECK_EVERY == 0
            if not (log_due or snapshot_due or callbacks_due or stop_due):
                continue
            # One synchronisation per logging window, never per step; weights and EMA are checked too, so a
            # snapshot never holds NaN/inf and "the last good checkpoint" is always good.
            bad |= ~weights_finite(state)
            if distributed.broadcast_flag(bool(bad.item()), info, device):
                raise TrainingDiverged(
                    f"training diverged: the loss, gradient, weights or EMA weights became NaN/inf between steps "
                    f"{last_good} and {done}; "
                    f"the last good checkpoint ({ckpt}, step {last_good if os.path.exists(ckpt) else 'none'}) "
                    "was kept; lower training.lr, raise training.warmup or check the data")
            last_good = done
            stopped = distributed.broadcast_flag(stop.requested, info, device) and done < end
            snapshot_due = snapshot_due or stopped
            if log_due:
                elapsed = time.perf_counter() - window_start
                mean_loss = distributed.all_reduce_mean(loss_sum / window, info)
                last_loss = float(mean_loss)
                rate = window * int(tr.batch_size) / max(elapsed, 1e-9)
                logger.scalars(done, {"loss": last_loss, "lr": lr, "grad_norm": float(grad_sum / window),
                                      ("images_per_s" if is_image else "samples_per_s"): rate})
                logger.advance(window)
                loss_sum.zero_()
                grad_sum.zero_()
                window, window_start = 0, time.perf_counter()
            if snapshot_due and info.is_main:
                save_checkpoint(ckpt, state.to_dict(config))
            if info.is_main and callbacks_due and not stopped:  # a stopping run saves and leaves at once
                callback_start = time.perf_counter()
                try:
                    values = _run_callbacks(callbacks, config, sde, state, device, workdir, int(tr.n_iters))
                except BaseException:
                    if not snapshot_due:  # a failing callback (or Ctrl-C in one) never costs the steps since the last snapshot
                        save_checkpoint(ckpt, state.to_dict(config))
                    raise
                if values:
                    logger.metrics(done, values)
                    metrics.update(values)
                spent = time.perf_counter() - callback_start
                callback_seconds += spent
                window_start += spent  # callbacks do not count towards the training rate
            distributed.barrier(info)
            if stopped:
                break
    if stopped:
        raise Interrupted(f"stopped by {stop.name or 'a signal'} at step {state.step}: checkpoint {ckpt} saved; "
                          "run the same command to resume", stop.signum or 15)
    seconds = time.perf_counter() - t0 - callback_seconds
    if info.is_main:
        write_json(os.path.join(workdir, "train_summary.json"),
                   {"step": state.step, "loss": last_loss, "seconds": seconds, "steps_this_run": end - start,
                    "steps_per_s": (end - start) / seconds if seconds > 0 else None,
                    "callback_seconds": callback_seconds, "metrics": metrics}, indent=1)
    return TrainResult(state.step, end - start, last_loss, seconds, ckpt, callback_seconds, metrics, model)
