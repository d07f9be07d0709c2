"""`python main.py --mode train`: train (or resume) a run with the evaluation callbacks, and report it.

The training package never imports `evaluation`; this command layer builds the callbacks that make the
sample figure (`samples_train.png`) and, for toy data, the sliced Wasserstein-2 distance to exact samples,
and passes them to `training.trainer.train` (see `TrainEvent` for what a callback sees).
"""
from __future__ import annotations

import os
import time

import torch

from data.loaders import stream_seed
from training.trainer import TrainEvent, train

_SALT_PLOT = 0x9107  # seeds the figure's sampler: the same noise at every step of a run


class SampleFigureCallback:
    """Samples `training.plot_samples` points with config.sampling's solver and NFE (a per-NFE progress bar),
    saves `samples_train.png` (scatter next to exact data for 2-D toys, a titled image grid for images) and
    returns {"sw2": ...} for toy data (sliced W2 to as many exact samples), else None."""

    def __init__(self, config, every: int, progress: bool = True):
        self.every = int(every)
        self.progress = progress
        self.num_samples = int(config.training.plot_samples)
        self.path: str | None = None
        self.sw2: float | None = None
        self.seconds = 0.0  # wall time of the last call (sampling and figure)

    def __call__(self, event: TrainEvent) -> dict[str, float] | None:
        from evaluation.sample_runner import sample_shape, sampler_options
        from evaluation.progress import ProgressScore, nfe_bar
        import solvers

        start = time.perf_counter()
        config = event.config
        solver, nfe = str(config.sampling.solver), int(config.sampling.nfe)
        generator = torch.Generator(device=event.device).manual_seed(stream_seed(config.seed, 0, 0, _SALT_PLOT))
        shape = (self.num_samples, *sample_shape(config))
        with nfe_bar(nfe, f"sample at step {event.step} ({solver}, NFE budget {nfe})", self.progress) as bar:
            samples, used = solvers.sample(event.sde, ProgressScore(event.score_fn, bar), shape, solver=solver,
                                           nfe=nfe, eps=float(config.sampling.eps), generator=generator,
                                           **sampler_options(config, solver))
        samples = samples.float().cpu()
        title = f"{config.sde.name}, step {event.step}, {solver} NFE {used}"
        self.path = os.path.join(event.workdir, "samples_train.png")
        scalars = None
        if config.data.kind == "toy":
            self.sw2 = _toy_sw2(config, samples)
            scalars = {"sw2": self.sw2}
            title += f", SW-2 to data {self.sw2:.3f}"
            if samples.shape[1] == 2:
                from data.toys import sample_toy
                from evaluation.figures import save_scatter

                reference = sample_toy(str(config.data.dataset), self.num_samples,
                                       generator=torch.Generator().manual_seed(int(config.seed)))
                save_scatter(self.path, samples, reference=reference, title=title)
            else:
                self.path = None
        else:
            from data.transforms import get_data_inverse_scaler
            from evaluation.figures import save_image_grid

            from data.images import from_unit_interval

            images = from_unit_interval(get_data_inverse_scaler(config)(samples[:64]),
                                        bool(config.data.get("uniform_dequantization", False)))
            save_image_grid(self.path, images, title=title)
        if self.path:
            _log_image(event.workdir, event.step, self.path)
        self.seconds = time.perf_counter() - start
        return scalars


def _log_image(workdir: str, step: int, png: str) -> None:
    """The figure as an image in TensorBoard (run `samples` under workdir/tensorboard), at the training step."""
    import matplotlib.image
    from torch.utils.tensorboard import SummaryWriter

    rgb = matplotlib.image.imread(png)[..., :3]
    rgb = (rgb * 255).round().astype("uint8") if rgb.dtype.kind == "f" else rgb
    with SummaryWriter(log_dir=os.path.join(workdir, "tensorboard", "samples")) as writer:
        writer.add_image("samples", rgb, step, dataformats="HWC")


def _toy_sw2(config, samples: torch.Tensor) -> float:
    """Sliced W2 of toy samples to as many exact draws (inf when a sample is not finite)."""
    from data.toys import sample_toy
    from evaluation.metrics import sliced_wasserstein

    if not bool(torch.isfinite(samples).all()):
        return float("inf")
    reference = sample_toy(str(config.data.dataset), samples.shape[0],
                           generator=torch.Generator().manual_seed(int(config.seed)))
    return float(sliced_wasserstein(samples.double(), reference.double(), generator=torch.Generator().manual_seed(0)))


def build_callbacks(config, progress: bool = True) -> list:
    """The callbacks `--mode train` passes to the trainer (the same list on every process)."""
    callbacks = []
    if int(config.training.get("plot_samples", 2000)) > 0:
        callbacks.append(SampleFigureCallback(config, int(config.training.get("sample_every", 0) or 0), progress))
    if config.data.kind == "image" and int(config.eval.get("fid_every", 0) or 0) > 0:  # FID/KID/IS (issue 14)
        from evaluation.image_eval import ImageMetricsCallback

        callbacks.append(ImageMetricsCallback(config, int(config.eval.fid_every), int(config.eval.fid_num_samples)))
    return callbacks


def run(config, workdir: str, args) -> int:
    """Train the model of `config` in `workdir` (resuming from its checkpoint if there is one) and report."""
    from sde_lib import get_sde
    from training.checkpoint import checkpoint_path
    from validation import check_output_files, check_settings

    check_settings(config, args, "train", get_sde)  # also when called without main.py
    check_output_files([checkpoint_path(workdir), os.path.join(workdir, "config.json"),
                        os.path.join(workdir, "train_summary.json")])  # before hours of training, not after
    progress = bool(config.training.get("progress", True))
    callbacks = build_callbacks(config, progress)
    result = train(config, workdir, callbacks=callbacks)
    if int(os.environ.get("RANK", "0")) == 0 and result.steps_this_run == 0 and result.callback_seconds == 0:
        return 0  # the trainer said "nothing to do"; there is no loss or rate of this run to report
    if int(os.environ.get("RANK", "0")) == 0:
        rate = f", {result.steps_this_run / result.seconds:.2f} steps/s" if result.seconds > 0 else ""
        loss = f"; final loss {result.loss:.4g}" if result.steps_this_run > 0 else ""
        print(f"[train] step {result.step} ({result.steps_this_run} this run): training {result.seconds:.1f} s"
              f"{rate}{loss}")
        print(f"[train] checkpoint: {result.checkpoint}")
        print(f"[train] tensorboard: {os.path.join(workdir, 'tensorboard')}")
        for callback in callbacks:
            if isinstance(callback, SampleFigureCallback) and callback.path:
                extra = f", sliced W2 to data {callback.sw2:.4f}" if callback.sw2 is not None else ""
                print(f"[train] samples: {callback.path} (sampling {callback.seconds:.1f} s{extra})")
            if getattr(callback, "last", None):
                from evaluation.image_eval import format_metrics

                print(f"[train] step {callback.last['step']}: {format_metrics(callback.last)}, "
                      f"{callback.last['solver']} NFE {callback.last['nfe_used']}")
        if result.callback_seconds > 0:
            print(f"[train] evaluation callbacks: {result.callback_seconds:.1f} s in total (not in the training rate)")
    return 0
