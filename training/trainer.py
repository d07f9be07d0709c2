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

import torch
from torch import nn

import models
from atomic_io import write_json, write_text
from models.guidance import conditional_score_fn
from data.loaders import check_num_classes, data_shape, get_data_stream, stream_seed, step_generator
from errors import UserError
from sde_lib import get_sde
from solvers.guidance import conditional_score
from training import distributed
from training.checkpoint import (FORMAT_VERSION, checkpoint_path, config_differences, config_to_json,
                                 load_checkpoint, rng_state, save_checkpoint, set_rng_state)
from training.device import get_device
from training.logger import TrainLogger
from training.losses import drop_labels, get_loss_fn

_SALT_LOSS, _SALT_DROPOUT, _SALT_PLOT = 0x1055, 0xD409, 0x9107


class TrainingDiverged(UserError):
    """The loss, the gradient, the weights or the EMA weights became NaN or infinite."""


def weights_finite(state: "_State") -> torch.Tensor:
    """A device bool: every model weight and EMA shadow weight is finite (one reduction, no host sync)."""
    tensors = [p.detach() for p in state.model.parameters()] + list(state.ema.shadow_params)
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


@dataclasses.dataclass
class TrainResult:
    """What a call to `train` did."""

    step: int  # training steps completed in total
    steps_this_run: int
    loss: float  # mean loss over the last logging window (nan if none ran)
    seconds: float
    checkpoint: str
    samples_path: str | None = None
    sw2: float | None = None
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
        except (RuntimeError, ValueError, KeyError) as error:
            raise UserError(f"checkpoint {path} does not fit this config's network "
                            f"({str(error).splitlines()[0][:200]})") from None
        self.step = int(state["step"])
        if "rng" in state:
            set_rng_state(state["rng"])


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
        self.score_fn = models.get_score_fn(sde, train_model, continuous=bool(tr.continuous))
        self.num_classes = check_num_classes(config)  # > 0: class-conditional with label dropout (issue 8)
        self.class_score_fn = (conditional_score_fn(sde, train_model, bool(tr.continuous))
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


def _sample_figure(config, sde, state: _State, workdir: str, device: torch.device, logger: TrainLogger):
    """Sample with the EMA weights through the solvers package and save a scatter plot / image grid."""
    try:
        import solvers
    except ImportError:
        solvers = None
    solver = str(config.sampling.solver)
    if solvers is None or solver not in solvers.available_solvers():
        logger.message(f"[train] no sampler {solver!r} registered yet; skipping the sample figure")
        return None, None
    n = int(config.training.get("plot_samples", 2000))
    if n <= 0:
        return None, None
    shape = (n, *data_shape(config))
    generator = torch.Generator(device=device).manual_seed(stream_seed(config.seed, 0, 0, _SALT_PLOT))
    model = state.model
    state.ema.store(model)
    state.ema.copy_to(model)
    model.eval()
    try:
        score_fn = models.get_score_fn(sde, model, continuous=bool(config.training.continuous))
        from evaluation.sample_runner import sampler_options

        with torch.no_grad():
            samples, nfe = solvers.sample(sde, score_fn, shape, solver=solver, nfe=int(config.sampling.nfe),
                                          eps=float(config.sampling.eps), generator=generator,
                                          **sampler_options(config, solver))
    finally:
        state.ema.restore(model)
        model.train()
    samples = samples.float().cpu()
    title = f"{config.sde.name} step {state.step}, {solver} NFE {nfe}"
    path = os.path.join(workdir, "samples_train.png")
    sw2 = None
    if config.data.kind == "toy":
        from data.toys import sample_toy
        from evaluation.figures import save_scatter

        reference = sample_toy(str(config.data.dataset), n, generator=torch.Generator().manual_seed(int(config.seed)))
        sw2 = _sliced_w2(samples, reference)
        if sw2 is not None:
            title += f", SW-2 {sw2:.3f}"
        if samples.shape[1] == 2:
            save_scatter(path, samples, reference=reference, title=title)
            logger.image("samples", state.step, _read_png(path))
        else:
            path = None
    else:
        from data.transforms import get_data_inverse_scaler
        from evaluation.figures import make_grid, save_image_grid

        images = get_data_inverse_scaler(config)(samples).clamp(0, 1)
        save_image_grid(path, images)
        logger.image("samples", state.step, make_grid(images))
    return path, sw2


def _read_png(path: str):
    import matplotlib.image

    rgb = matplotlib.image.imread(path)[..., :3]
    return (rgb * 255).round().astype("uint8") if rgb.dtype.kind == "f" else rgb


def _sliced_w2(samples: torch.Tensor, reference: torch.Tensor) -> float | None:
    try:
        from evaluation.metrics import sliced_wasserstein
    except ImportError:
        return None
    finite = torch.isfinite(samples).all(1)
    if not bool(finite.all()):
        return float("inf")
    return float(sliced_wasserstein(samples.double(), reference.double(), generator=torch.Generator().manual_seed(0)))


def train(config, workdir: str, *, max_steps: int | None = None, progress: bool | None = None) -> TrainResult:
    """Train (or resume training of) the model config describes in `workdir`; see the module docstring.

    `max_steps` stops after that many steps of this call (with a checkpoint), as if the run were interrupted.
    `progress` shows the tqdm bar (default: config.training.progress).
    """
    if progress is None:
        progress = bool(config.training.get("progress", True))
    device = get_device(config)
    info = distributed.setup(device)
    try:
        return _train(config, workdir, distributed.local_device(device, info), info, max_steps, progress)
    finally:
        distributed.cleanup(info)


def _train(config, workdir: str, device: torch.device, info: distributed.DistInfo,
           max_steps: int | None, progress: bool) -> TrainResult:
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
    if info.is_main:
        os.makedirs(workdir, exist_ok=True)
        write_text(os.path.join(workdir, "config.json"), config_to_json(config))
    if start >= end:
        if info.is_main:
            print(f"[train] {ckpt} is already at step {start} (training.n_iters={tr.n_iters}); nothing to do")
        return TrainResult(start, 0, math.nan, 0.0, ckpt, model=state.model)

    model = state.model
    train_step = TrainStep(config, sde, state, stream, device, info,
                           autocast_dtype=torch.bfloat16 if autocast_bf16 else None)
    log_every, snapshot_every = int(tr.log_every), int(tr.snapshot_every)
    sample_every = int(tr.get("sample_every", 0) or 0)
    logger = TrainLogger(workdir, start, int(tr.n_iters), enabled=info.is_main, progress=progress)
    if resumed:
        logger.message(f"[train] resumed from {ckpt} at step {start}")

    loss_sum = torch.zeros((), device=device)
    grad_sum = torch.zeros((), device=device)
    bad = torch.zeros((), dtype=torch.bool, device=device)
    window, window_start, last_good = 0, time.perf_counter(), start
    t0 = time.perf_counter()
    last_loss = math.nan
    samples_path, sw2 = None, None
    model.train()
    try:
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
            if not (log_due or snapshot_due):
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
            if info.is_main and ((sample_every > 0 and done % sample_every == 0) or done == int(tr.n_iters)):
                samples_path, sw2 = _sample_figure(config, sde, state, workdir, device, logger)
                if sw2 is not None:
                    logger.scalars(done, {"sw2": sw2})
                window_start = time.perf_counter()
            distributed.barrier(info)
    finally:
        logger.close()
    seconds = time.perf_counter() - t0
    if info.is_main:
        write_json(os.path.join(workdir, "train_summary.json"),
                   {"step": state.step, "loss": last_loss, "seconds": seconds, "sw2": sw2}, indent=1)
    return TrainResult(state.step, end - start, last_loss, seconds, ckpt, samples_path, sw2, model)
