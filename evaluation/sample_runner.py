"""`--mode sample`: draw samples from the EMA weights of a run's latest checkpoint with any registered solver.

Writes `samples/samples_{solver}_nfe{K}_seed{S}[_class...][_h<hash>].npz` (key `samples`, in data space: float
vectors for toys, uint8 NCHW images for image data), a JSON with the run's facts and settings beside it and a PNG
(scatter plot for 2-D data, image grid for images). The hash appears when other settings that change the samples
(num_samples, batch_size, eps, sampler options) differ from the config's defaults (evaluation/outputs.py).
Every file is written atomically (atomic_io). Each finished batch is saved in `samples/<stem>.partial/`
(evaluation/batch_journal.py): the same command run again after a kill samples only the missing batches (each
batch is seeded on its own, so the samples equal an uninterrupted run's); the folder is removed at the end.
"""
from __future__ import annotations

import inspect
import os
import time
import warnings

import numpy as np
import torch

from atomic_io import save_npz, write_json
from errors import UserError
from evaluation.batch_journal import ArrayJournal
from evaluation.outputs import default_config, file_digest, result_stem
from training import distributed
from validation import check_output_files, check_settings

# config.sampling keys -> sampler keyword arguments (passed only to samplers that take them)
_SAMPLING_OPTIONS = {"predictor": "predictor", "corrector": "corrector", "snr": "snr",
                     "n_steps_each": "corrector_steps", "noise_removal": "noise_removal",
                     "method": "method", "rtol": "rtol", "atol": "atol", "s_churn": "S_churn", "s_tmin": "S_tmin",
                     "s_tmax": "S_tmax", "s_noise": "S_noise"}


def sample_shape(config) -> tuple[int, ...]:
    """Shape of one sample in the model's space: (dim,) for toy data, (C, H, W) for images."""
    if config.data.get("kind", "toy") == "image":
        return (int(config.data.num_channels), int(config.data.image_size), int(config.data.image_size))
    return (int(config.data.dim),)


def sampler_options(config, solver: str) -> dict:
    """Options from config.sampling that the named sampler accepts (e.g. predictor/corrector/snr for pc)."""
    from solvers import SAMPLERS

    accepted = inspect.signature(SAMPLERS[solver]).parameters
    options = {}
    for key, name in _SAMPLING_OPTIONS.items():
        if name in accepted and config.sampling.get(key) is not None:  # None: the sampler's own default
            options[name] = config.sampling[key]
    return options


def generate(config, sde, score_fn, solver: str, nfe: int, num_samples: int, seed: int,
             device: torch.device, progress: bool = True, journal: tuple[str, dict] | None = None,
             timing: dict | None = None) -> tuple[torch.Tensor, list[int]]:
    """num_samples samples (model space, on CPU) in batches of config.sampling.batch_size; and NFE per batch.

    `journal` = (folder, header): every finished batch is saved there and the batches an earlier run with the same
    header saved are reused (evaluation/batch_journal.py; single process only); `timing["reused_seconds"]` is
    then set to the sampling time those batches took."""
    from evaluation.progress import ProgressScore, nfe_bar
    from solvers import available_solvers, sample

    if solver not in available_solvers():
        raise UserError(f"unknown solver {solver!r}; valid: {', '.join(available_solvers())}")
    batch_size = int(config.sampling.batch_size)
    if batch_size <= 0:
        raise UserError(f"config.sampling.batch_size must be positive, got {batch_size}")
    options = sampler_options(config, solver)
    accel = {key: True for key in ("compile", "cuda_graph") if config.sampling.get(key, False)}
    if accel:  # wrapped once: one CUDA-graph capture / compilation serves every batch of the same size
        from solvers.accel import accelerate_score_fn

        score_fn = accelerate_score_fn(score_fn, **accel)
    shape = sample_shape(config)
    chunks, nfes = {}, {}
    sizes = [min(batch_size, num_samples - s) for s in range(0, num_samples, batch_size)]
    # Under torchrun each process draws its share of the batches (each batch seeded on its own) and all
    # processes gather the result: the samples do not depend on the number of processes.
    info = distributed.current_info()
    mine = distributed.my_share(len(sizes), info)
    saved, reused = None, {}
    if journal is not None and info.world_size == 1:
        header = {**journal[1], "sizes": sizes, "shape": list(shape), "device": device.type, **accel}
        saved = ArrayJournal.open(journal[0], header)
        # every saved batch is read and checked before any sampling (a damaged one is refused now, not later)
        reused = {index: _saved_batch(saved, index, (sizes[index],) + shape) for index in mine if index in saved.done}
        if reused:
            print(f"resuming from {saved.folder}: {len(reused)} of {len(sizes)} batches done")
    desc = f"sampling {batches_label([sizes[index] for index in mine])} ({solver}, NFE budget {nfe} per batch)"
    with torch.no_grad(), nfe_bar(nfe * len(mine), desc, progress and info.is_main) as bar:
        counted = ProgressScore(score_fn, bar)  # one tick per score evaluation, all batches on one bar
        for index in mine:
            if index in reused:
                chunks[index], nfes[index], _ = reused[index]
                bar.update(nfe)
                continue
            batch_start = time.time()
            generator = torch.Generator(device=device).manual_seed(distributed.batch_seed(seed, index))
            with warnings.catch_warnings():  # non-finite samples: the runners report them once, in one line
                warnings.filterwarnings("ignore", message=".*sample values are NaN or inf", category=RuntimeWarning)
                x, used = sample(sde, counted, (sizes[index],) + shape, solver=solver, nfe=nfe,
                                 eps=float(config.sampling.eps), generator=generator, **options)
            chunks[index] = x.float().cpu()
            nfes[index] = int(used)
            if saved is not None:
                saved.record(index, samples=chunks[index].numpy(), nfe=np.array(nfes[index]),
                             seconds=np.array(time.time() - batch_start))
    if timing is not None:
        timing["reused_seconds"] = sum(seconds for _, _, seconds in reused.values())
    return torch.cat(distributed.gather_indexed(chunks, info)), distributed.gather_indexed(nfes, info)


def _saved_batch(saved: ArrayJournal, index: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, int, float]:
    """Batch `index` from the journal: float32 samples of `shape`, its NFE and its seconds, or a one-line
    refusal."""
    arrays = saved.load(index)
    samples, used, seconds = arrays.get("samples"), arrays.get("nfe"), arrays.get("seconds")
    if (samples is None or samples.dtype != np.float32 or tuple(samples.shape) != tuple(shape) or used is None
            or used.shape != () or not np.issubdtype(used.dtype, np.integer) or int(used) < 0 or seconds is None
            or seconds.shape != () or not np.issubdtype(seconds.dtype, np.floating)
            or not 0 <= float(seconds) < float("inf")):
        raise UserError(f"cannot resume from {saved.folder}: batch {index} does not hold float32 samples of shape "
                        f"{tuple(shape)}, its NFE and its seconds; delete the folder to start over")
    return torch.from_numpy(samples.copy()), int(used), float(seconds)


def batches_label(sizes: list[int]) -> str:
    """The batches to sample as counts x sizes, e.g. "3x256" or "3x256+1x64" (the progress bar's label)."""
    groups: list[list[int]] = []
    for size in sizes:
        if groups and groups[-1][1] == size:
            groups[-1][0] += 1
        else:
            groups.append([1, size])
    return "+".join(f"{count}x{size}" for count, size in groups) or "0 batches"


def to_data_space(config, x: torch.Tensor) -> np.ndarray:
    """Model-space samples -> data space: vectors unchanged, images to uint8 (N, C, H, W)."""
    from data.transforms import get_data_inverse_scaler

    x = get_data_inverse_scaler(config)(x)
    if config.data.get("kind", "toy") == "image":
        from data.images import from_unit_interval

        return from_unit_interval(x, bool(config.data.get("uniform_dequantization", False))).numpy()
    return x.numpy()


def load_score_fn(config, workdir: str, device: torch.device):
    """(sde, score_fn, step) from the EMA weights of the latest checkpoint in workdir."""
    from evaluation.run import load_run

    run = load_run(workdir, device, config=config)
    return run.sde, run.score_fn, run.step


def save_figure(config, path: str, samples: np.ndarray, title: str) -> str | None:
    """Scatter plot (2-D data, with reference toy samples) or image grid (images); None for other data."""
    from evaluation.figures import save_image_grid, save_scatter

    if config.data.get("kind", "toy") == "image":
        return save_image_grid(path, samples[:64], title=title)
    if samples.ndim == 2 and samples.shape[1] == 2:
        reference = None
        try:
            from data.toys import sample_toy
            reference = sample_toy(str(config.data.dataset), min(len(samples), 5000),
                                   generator=torch.Generator().manual_seed(0))
        except ValueError:
            pass
        return save_scatter(path, samples, reference=reference, title=title)
    return None


def figure_title(info: dict) -> str:
    """Solver, NFE, checkpoint step and, when guided, class and guidance of a sample figure."""
    title = f"{info['solver']}, NFE {info['nfe_used']}, step {info['checkpoint_step']}"
    if info.get("class_label") is not None:
        title += f", class {info['class_label']}"
    if info.get("guidance") not in (None, "none"):
        title += f", {info['guidance']} guidance {info['guidance_scale']:g}"
    return title


JOURNAL_SUFFIX = ".partial"  # samples/<stem>.partial/: the batches done so far


def sample_from_run(config, workdir: str, args, journal_folder: str | None = None) -> tuple[np.ndarray, dict]:
    """Samples in data space from the latest checkpoint, with args.solver/nfe/num_samples or config.sampling's.

    Returns (samples, facts) where facts holds solver, NFE requested/used, seed, step, device and timing.
    With `journal_folder` every finished batch is saved there and an earlier run's batches of the same
    checkpoint and settings are reused (remove it with `finish_journal` once the results are written).
    """
    from training.checkpoint import checkpoint_path, stored_digest
    from training.device import get_device

    solver, nfe, num_samples = _requested(config, args)
    seed = int(config.seed)
    device = get_device(config)
    weights = stored_digest(checkpoint_path(workdir))  # read again after loading: the loaded bytes are these
    if (getattr(args, "class_label", None) is None and getattr(args, "guidance", None) in (None, "none")
            and getattr(args, "guidance_scale", None) is None):
        sde, score_fn, step = load_score_fn(config, workdir, device)
        guidance = {}
    else:  # --class_label / --guidance / --guidance_scale (issue 8)
        from evaluation.controllable import guided_score_fn

        sde, score_fn, step, guidance = guided_score_fn(config, workdir, device, args)
    journal = None
    if journal_folder is not None and weights != stored_digest(checkpoint_path(workdir)):
        print(f"note: {checkpoint_path(workdir)} was replaced while it loaded (a training run?): this run's "
              "batches are not saved for a resume")
    elif journal_folder is not None:  # not replaced meanwhile
        header = {"solver": solver, "nfe": int(nfe), "seed": seed, "step": None if step is None else int(step),
                  "weights": weights,  # the same step of another run differs
                  "settings": sampling_settings(config, solver, num_samples), "guidance": guidance}
        if guidance.get("guidance") == "classifier":  # a retrained classifier changes the samples too
            from training.classifier import classifier_path

            header["classifier"] = file_digest(classifier_path(workdir))
        journal = (journal_folder, header)
    start, timing = time.time(), {}
    x, nfes = generate(config, sde, score_fn, solver, nfe, num_samples, seed, device, journal=journal, timing=timing)
    elapsed = time.time() - start + timing.get("reused_seconds", 0.0)  # resumed: the saved batches' time too
    facts = {
        "solver": solver, "nfe_requested": nfe, "nfe_used": max(nfes), "nfe_used_per_batch": nfes,
        "num_samples": num_samples, "seed": seed, "checkpoint_step": step,
        # the --config given, else the run's saved config the command used
        "config": str(getattr(args, "config", "") or "") or os.path.join(workdir, "config.json"),
        "dataset": str(config.data.dataset),
        "sde": str(config.sde.name), "options": sampler_options(config, solver),
        "eps": float(config.sampling.eps), "device": str(device), "seconds": round(elapsed, 3),
        "samples_per_second": round(num_samples / max(elapsed, 1e-9), 2),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **guidance,
    }
    return to_data_space(config, x), facts


def finish_journal(folder: str) -> None:
    """Remove the batches saved by `sample_from_run` (the results hold them now)."""
    ArrayJournal(folder, {}).finish()


def sampling_settings(config, solver: str, num_samples: int) -> dict:
    """The settings beyond solver, NFE, seed and guidance that change the samples."""
    return {"num_samples": int(num_samples), "batch_size": int(config.sampling.batch_size),
            "eps": float(config.sampling.eps), **sampler_options(config, solver)}


def _requested(config, args) -> tuple[str, int, int]:
    solver = getattr(args, "solver", None) or str(config.sampling.solver)
    nfe = getattr(args, "nfe", None) or int(config.sampling.nfe)
    num_samples = getattr(args, "num_samples", None) or int(config.sampling.num_samples)
    return solver, nfe, num_samples


def output_stem(config, args, workdir: str, kind: str = "samples") -> tuple[str, dict]:
    """(path stem, settings) of the result files of a sampling run (`kind`: samples or eval) under
    `workdir/kind/`; see the module docstring."""
    from solvers import available_solvers

    solver, nfe, num_samples = _requested(config, args)
    if solver not in available_solvers():
        raise UserError(f"unknown solver {solver!r}; valid: {', '.join(available_solvers())}")
    stem = f"{kind}_{solver}_nfe{nfe}_seed{int(config.seed)}"
    label, guidance = getattr(args, "class_label", None), str(getattr(args, "guidance", None) or "none")
    if label is not None:
        scale = 1.0 if getattr(args, "guidance_scale", None) is None else float(getattr(args, "guidance_scale"))
        # `:g` when it names the scale exactly (2, 0.5), else every digit: 2 and 2.0000001 are different runs
        shown = f"{scale:g}" if float(f"{scale:g}") == scale else repr(scale)
        stem += f"_class{label}" + (f"_{guidance}{shown}" if guidance != "none" else "")
    settings = sampling_settings(config, solver, num_samples)
    if label is not None and guidance == "classifier":  # the samples depend on which classifier guided them
        from training.checkpoint import stored_digest
        from training.classifier import classifier_path

        settings["classifier"] = stored_digest(classifier_path(workdir))
    defaults = default_config(args, workdir)
    default_settings = (None if defaults is None
                        else sampling_settings(defaults, solver, int(defaults.sampling.num_samples)))
    if kind == "eval":  # the quality report also depends on what it compares with
        settings.update(_reference_settings(config, getattr(args, "split", None)))
        if default_settings is not None:
            default_settings.update(_reference_settings(defaults, None))
    return os.path.join(workdir, kind, result_stem(stem, settings, default_settings)), settings


def _reference_settings(config, split: str | None) -> dict:
    """What an eval report is measured against: the data set, its path and, for images, the reference split and
    image count (the toy metrics draw their own exact samples)."""
    out = {"dataset": str(config.data.dataset), "data_path": str(config.data.get("path", "") or "")}
    if config.data.get("kind", "toy") == "image":
        ev = config.eval
        out.update(split=str(split or ev.split), reference_num_images=int(ev.get("reference_num_images", 0)),
                   # how the metrics are computed: the Inception weights file and KID / IS settings
                   inception_weights=os.path.abspath(os.path.expanduser(str(ev.inception_weights)))
                   if str(ev.get("inception_weights", "") or "") else "",
                   kid_subsets=int(ev.kid_subsets), kid_subset_size=int(ev.kid_subset_size),
                   kid_reference_features=int(ev.kid_reference_features), isc_splits=int(ev.isc_splits))
    return out


def run(config, workdir: str, args) -> int:
    """Sample with args.solver/nfe/num_samples (or config.sampling's) and write npz + JSON + PNG.

    Under `torchrun --nproc_per_node=K` the batches are shared among the processes; rank 0 writes the files.
    """
    from training.device import get_device

    from sde_lib import get_sde

    check_settings(config, args, "sample", get_sde)  # also when called without main.py
    stem, settings = output_stem(config, args, workdir, "samples")
    outputs = [stem + ext for ext in (".npz", ".json", ".png")] + [stem + JOURNAL_SUFFIX + "/journal.json"]
    if config.data.get("kind", "toy") == "image":  # the exports below: checked now, not after the sampling
        outputs += [stem + "_nhwc.npz", stem + "_png/000000.png"]
    check_output_files(outputs)
    group = distributed.setup(get_device(config))
    if group.world_size > 1 and get_device(config).type == "cuda":
        config.device = str(distributed.local_device(get_device(config), group))  # cuda:LOCAL_RANK
    try:
        samples, info = sample_from_run(config, workdir, args, journal_folder=stem + JOURNAL_SUFFIX)
    finally:
        distributed.cleanup(group)
    if not group.is_main:
        return 0
    if not np.isfinite(samples.astype(np.float64)).all():
        print(f"warning: {int((~np.isfinite(samples)).sum())} non-finite values in the samples")
    info["layout"] = "uint8 NCHW" if config.data.get("kind", "toy") == "image" else "float32 (N, dim)"
    info["settings"] = settings
    save_npz(stem + ".npz", samples=samples)
    write_json(stem + ".json", info)
    figure = save_figure(config, stem + ".png", samples, figure_title(info))
    if config.data.get("kind", "toy") == "image":  # the layouts external FID tools read
        from evaluation.exports import save_nhwc_npz, save_png_folder

        save_nhwc_npz(stem + "_nhwc.npz", samples)
        save_png_folder(stem + "_png", samples)
        figure = (figure + ", " if figure else "") + f"{stem}_nhwc.npz (arr_0), {stem}_png/"
    finish_journal(stem + JOURNAL_SUFFIX)
    print(f"{info['num_samples']} samples with {info['solver']} (NFE {info['nfe_used']} used of a budget of "
          f"{info['nfe_requested']} per batch) in {info['seconds']:.1f} s ({info['samples_per_second']:.2f} samples/s)"
          f" -> {stem}.npz" + (f", {figure}" if figure else ""))
    return 0
