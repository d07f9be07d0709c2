"""Checks of user input before any work starts: flags, config values, output locations, file contents.

Every check raises a one-line `UserError` naming the key (or file) and its valid range. The module sits in the
lowest layer (it imports only `errors`, `atomic_io`, numpy and the standard library), so the command line, the
runners and the data readers can all call it; callers pass what it cannot know (the SDE's end time T).

Limits: budgets and counts have a sane upper bound (`MAX_NFE`, `MAX_COUNT`) that `--allow_large` lifts; batch
sizes are checked against an estimate of the memory one batch needs. Guidance scales must be finite and in
[0, MAX_GUIDANCE_SCALE] (a negative scale pushes samples away from the class: not a guidance this toolkit offers).
The smallest time eps of sampling, likelihood and training must lie in (0, T / 10]: the samplers stop at t = eps
and report the distribution p_eps, which is only close to the data for eps << T.
"""
from __future__ import annotations

import math
import os
import tempfile
from typing import Any, Iterable

import numpy as np

from atomic_io import temp_prefix
from errors import UserError

MAX_NFE = 100_000  # score evaluations per sample (the published samplers use <= 4,000)
MAX_COUNT = 10_000_000  # samples, training iterations, frames ... without --allow_large
MAX_GUIDANCE_SCALE = 100.0
MAX_LR = 1.0
EPS_FRACTION = 0.1  # eps <= EPS_FRACTION * T


# --- generic number checks --------------------------------------------------------------------------------------
def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise UserError(f"{key} must be a number, got {value!r}")
    return float(value)


def check_int(key: str, value: Any, lo: int = 1, hi: int | None = None, hint: str = "") -> int:
    """`value` as an int in [lo, hi]; a one-line error naming `key` and the range otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if not (isinstance(value, float) and math.isfinite(value) and value == int(value)):
            raise UserError(f"{key} must be an integer in [{lo}, {hi if hi is not None else 'inf'}], got {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        if lo == 1:
            upper = f" and at most {hi}" if hi is not None else ""
            raise UserError(f"{key} must be positive{upper}, got {value}{hint if value > lo else ''}")
        raise UserError(f"{key} must be an integer in [{lo}, {hi if hi is not None else 'inf'}], got {value}{hint}")
    return value


def check_real(key: str, value: Any, lo: float | None = None, hi: float | None = None,
               lo_open: bool = False, hi_open: bool = False) -> float:
    """`value` as a finite float in the interval given by lo/hi (open or closed ends)."""
    x = _number(key, value)
    low = "(-inf" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
    high = "inf)" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
    bad = (not math.isfinite(x) or (lo is not None and (x <= lo if lo_open else x < lo))
           or (hi is not None and (x >= hi if hi_open else x > hi)))
    if bad:
        raise UserError(f"{key} must be a finite number in {low}, {high}, got {value!r}")
    return x


def check_time(key: str, value: Any, T: float) -> float:
    """A smallest time eps of the reverse process: in (0, T / 10] (see the module docstring)."""
    x = _number(key, value)
    if not (math.isfinite(x) and 0 < x <= EPS_FRACTION * T):
        raise UserError(f"{key} must be in (0, {EPS_FRACTION * T:g}] (a small time 0 < eps << sde.T = {T:g}), "
                        f"got {value!r}")
    return x


# --- flags and config values -----------------------------------------------------------------------------------
def validate_args(args, mode: str) -> None:
    """Check the command-line flags that take numbers (ranges, finiteness, budgets)."""
    if mode == "likelihood":  # not silently ignored: the likelihood has its own integrator and data
        given = [flag for flag in ("solver", "nfe", "num_samples") if getattr(args, flag, None) is not None]
        if given:
            raise UserError(f"--{given[0]} does not apply to --mode likelihood: it integrates the probability-flow "
                            "ODE with likelihood.method / rtol / atol on the data of --split (and --num_batches "
                            "of likelihood.batch_size)")
    large = bool(getattr(args, "allow_large", False))
    count_hi = None if large else MAX_COUNT
    hint = " (--allow_large lifts the upper bound)"
    if getattr(args, "nfe", None) is not None:
        check_int("--nfe", args.nfe, 1, None if large else MAX_NFE, hint)
    if getattr(args, "num_samples", None) is not None:
        check_int("--num_samples", args.num_samples, 1, count_hi, hint)
    if getattr(args, "seed", None) is not None:
        check_int("--seed", args.seed, 0, 2 ** 32 - 1)
    if getattr(args, "num_batches", None) is not None:
        check_int("--num_batches", args.num_batches, 1, count_hi, hint)
    if getattr(args, "guidance_scale", None) is not None:
        check_real("--guidance_scale", args.guidance_scale, 0.0, MAX_GUIDANCE_SCALE)
    if getattr(args, "num_frames", None) is not None:
        check_int("--num_frames", args.num_frames, 2, 1000)


_SAMPLING_MODES = ("sample", "eval", "inpaint", "colorize", "interpolate")


def validate_config(config, mode: str, T: float, allow_large: bool = False) -> None:
    """Check the config values `mode` uses (ranges, finiteness, budgets); T is the SDE's end time."""
    hi = None if allow_large else MAX_COUNT
    hint = " (--allow_large lifts the upper bound)"
    check_int("seed", config.seed, 0, 2 ** 32 - 1)
    chain = (mode == "train" and not bool(config.training.continuous)) or (
        mode == "likelihood" and bool(config.likelihood.get("ddpm_bound", False)))
    _check_sde(config.sde, discrete=chain)
    data = config.data
    if str(data.get("kind", "toy")) == "image":
        check_int("data.image_size", data.image_size, 1, 4096)
        check_int("data.num_channels", data.num_channels, 1, 4)
    else:
        check_int("data.dim", data.dim, 1, 1_000_000)
    check_int("data.num_classes", data.get("num_classes", 0), 0, 1_000_000)
    if mode == "train":
        tr = config.training
        check_int("training.batch_size", tr.batch_size, 1)  # bounded by the memory estimate
        for key in ("n_iters", "log_every", "snapshot_every"):
            check_int(f"training.{key}", tr[key], 1, hi, hint)
        check_int("training.warmup", tr.warmup, 0, hi)
        check_int("training.sample_every", tr.get("sample_every", 0) or 0, 0)
        check_int("training.plot_samples", tr.get("plot_samples", 0), 0, hi)
        check_real("training.lr", tr.lr, 0.0, MAX_LR, lo_open=True)
        check_real("training.grad_clip", tr.grad_clip, 0.0)
        check_real("training.weight_decay", tr.weight_decay, 0.0)
        check_time("training.eps", tr.eps, T)
        check_real("model.ema_rate", config.model.ema_rate, 0.0, 1.0, hi_open=True)
        check_real("model.dropout", config.model.get("dropout", 0.0), 0.0, 1.0, hi_open=True)
        check_real("model.p_uncond", config.model.get("p_uncond", 0.0), 0.0, 1.0)
    if mode in _SAMPLING_MODES:
        s = config.sampling
        check_int("sampling.nfe", s.nfe, 1, None if allow_large else MAX_NFE, hint)
        check_int("sampling.num_samples", s.num_samples, 1, hi, hint)
        check_int("sampling.batch_size", s.batch_size, 1)  # bounded by the memory estimate
        check_time("sampling.eps", s.eps, T)
        check_real("sampling.snr", s.snr, 0.0, 100.0, lo_open=True)
        check_int("sampling.n_steps_each", s.n_steps_each, 0, 1000)
        for key in ("rtol", "atol"):  # optional (None: the solver's default)
            if s.get(key) is not None:
                check_real(f"sampling.{key}", s[key], 0.0, 1.0, lo_open=True)
        for key in ("s_churn", "s_tmin", "s_noise"):  # edm_stochastic's (None: its default)
            if s.get(key) is not None:
                check_real(f"sampling.{key}", s[key], 0.0)
        if s.get("s_tmax") is not None and not _number("sampling.s_tmax", s.s_tmax) >= 0:  # inf allowed, NaN not
            raise UserError(f"sampling.s_tmax must be a number >= 0 (inf allowed), got {s.s_tmax!r}")
        if s.get("method") is not None and not isinstance(s.method, str):
            raise UserError(f"sampling.method must be a method name (e.g. dopri5, rk4, RK45, euler), got {s.method!r}")
    ev = config.get("eval")
    if ev is not None and mode == "train":
        check_int("eval.fid_every", ev.get("fid_every", 0) or 0, 0, hi, hint)
        check_int("eval.fid_num_samples", ev.get("fid_num_samples", 2), 2, hi, hint)
    if ev is not None and str(data.get("kind", "toy")) == "image" and (
            mode == "eval" or (mode == "train" and int(ev.get("fid_every", 0) or 0) > 0)):  # FID/KID/IS settings
        check_int("eval.batch_size", ev.batch_size, 1)
        check_int("eval.reference_num_images", ev.reference_num_images, 0, hi, hint)
        check_int("eval.kid_subsets", ev.kid_subsets, 1, 100_000)
        check_int("eval.kid_subset_size", ev.kid_subset_size, 2, hi, hint)
        check_int("eval.kid_reference_features", ev.kid_reference_features, 2, hi, hint)
        check_int("eval.isc_splits", ev.isc_splits, 1, 10_000)
    if mode == "likelihood":
        lk = config.likelihood
        check_real("likelihood.rtol", lk.rtol, 0.0, 1.0, lo_open=True)
        check_real("likelihood.atol", lk.atol, 0.0, 1.0, lo_open=True)
    if mode == "likelihood":
        lk = config.likelihood
        check_time("likelihood.eps", lk.eps, T)
        check_int("likelihood.batch_size", lk.batch_size, 1)  # bounded by the memory estimate
        check_int("likelihood.num_batches", lk.num_batches, 0, hi, hint)
        check_int("likelihood.toy_num_samples", lk.toy_num_samples, 1, hi, hint)
        check_int("likelihood.num_dequant", lk.num_dequant, 1, 10_000)
        check_int("likelihood.n_probes", lk.n_probes, 1, 10_000)
        check_int("likelihood.ddpm_num_terms", lk.get("ddpm_num_terms", 0), 0, hi)
    if mode == "train_classifier":
        c = config.classifier
        check_int("classifier.n_iters", c.n_iters, 1, hi, hint)
        check_int("classifier.batch_size", c.batch_size, 1)  # bounded by the memory estimate
        check_int("classifier.log_every", c.log_every, 1)
        check_real("classifier.lr", c.lr, 0.0, MAX_LR, lo_open=True)
        check_time("classifier.eps", c.eps, T)


def _check_sde(sde, discrete: bool = False) -> None:
    """SDE settings; `discrete`: the DDPM / SMLD chain is used (discrete training or the DDPM bound)."""
    check_int("sde.num_scales", sde.num_scales, 1, 1_000_000)
    name = str(sde.name).lower()
    if name == "vesde":
        low = check_real("sde.sigma_min", sde.sigma_min, 0.0, lo_open=True)
        check_real("sde.sigma_max", sde.sigma_max, low, lo_open=True)
    else:
        low = check_real("sde.beta_min", sde.beta_min, 0.0, lo_open=True)
        high = check_real("sde.beta_max", sde.beta_max, low)
        if name == "vpsde" and discrete and int(sde.num_scales) <= high:  # DDPM's beta_i = beta / N must be < 1
            raise UserError(f"sde.num_scales={int(sde.num_scales)} gives DDPM a step beta_max / N = "
                            f"{high / int(sde.num_scales):g} >= 1 (1 - beta < 0): the discrete chain needs "
                            f"sde.num_scales > sde.beta_max = {high:g}")


# --- memory -----------------------------------------------------------------------------------------------------
def machine_memory_bytes(device: str = "cpu") -> int | None:
    """Total memory of the device runs use: the GPU's when `device` is a CUDA device (or "auto" with CUDA), else RAM."""
    if str(device) == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda"):
        try:
            import torch

            index = int(str(device).split(":")[1]) if ":" in str(device) else 0
            return int(torch.cuda.get_device_properties(index).total_memory)
        except Exception:  # no CUDA: fall back to RAM
            pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def per_sample_floats(config) -> int:
    """A lower estimate of the float32 values one sample occupies in a network call (input + activations)."""
    data, model = config.data, config.model
    if str(data.get("kind", "toy")) == "image":
        pixels = int(data.image_size) ** 2
        numel = pixels * int(data.num_channels)
        if str(model.name) == "mlp":
            return numel + int(model.hidden_dim) * int(model.num_layers)
        # U-Nets: at least one nf-channel feature map per residual block at full resolution
        return numel + int(model.get("nf", 64)) * pixels * (int(model.get("num_res_blocks", 1)) + 1)
    return int(data.dim) + int(model.get("hidden_dim", 0)) * int(model.get("num_layers", 1))


def check_batch_memory(key: str, batch_size: int, config, device: str = "cpu", factor: int = 4,
                       extra_bytes: int = 0) -> None:
    """Refuse a batch whose estimated memory (`factor` copies of its activations, plus `extra_bytes`) exceeds
    the machine's memory: "KEY=N would need about X GiB" instead of an allocator traceback later."""
    need = int(batch_size) * per_sample_floats(config) * 4 * factor + int(extra_bytes)
    have = machine_memory_bytes(device)
    if have is not None and need > have:
        raise UserError(f"{key}={batch_size} would need about {need / 2 ** 30:,.0f} GiB of memory "
                        f"(this machine has {have / 2 ** 30:,.0f} GiB); use a smaller value")


def validate_memory(config, mode: str, args=None) -> None:
    """Memory estimates of the batches (and stored samples) that `mode` makes."""
    device = str(config.get("device", "cpu"))
    if mode == "train":
        check_batch_memory("training.batch_size", config.training.batch_size, config, device, factor=6)
    if mode in _SAMPLING_MODES:
        num = int(getattr(args, "num_samples", None) or config.sampling.num_samples)
        batch = min(int(config.sampling.batch_size), num)  # the batches never exceed the number of samples
        check_batch_memory("sampling.batch_size", batch, config, device, factor=4)
        key = "--num_samples" if getattr(args, "num_samples", None) else "sampling.num_samples"
        check_batch_memory(key, num, config, device, factor=0,  # all samples are kept (model and data space)
                           extra_bytes=num * _data_numel(config) * 8)
    if mode == "likelihood":
        check_batch_memory("likelihood.batch_size", config.likelihood.batch_size, config, device,
                           factor=6 + 2 * likelihood_vjp_vectors(config.likelihood))
    if mode == "train_classifier":
        check_batch_memory("classifier.batch_size", config.classifier.batch_size, config, device, factor=6)


def likelihood_vjp_vectors(lk) -> int:
    """Vectors one batched VJP of the likelihood's divergence carries (its backward memory grows with them):
    n_probes for Hutchinson, 2 n_probes for Hutch++'s second round, 1 for the exact divergence's chunks."""
    divergence = str(lk.get("divergence", "hutchinson_rademacher"))
    if divergence == "exact":
        return 1
    return max(1, int(lk.n_probes)) * (2 if divergence.startswith("hutchpp") else 1)


def _data_numel(config) -> int:
    data = config.data
    if str(data.get("kind", "toy")) == "image":
        return int(data.image_size) ** 2 * int(data.num_channels)
    return int(data.dim)


# --- output locations -------------------------------------------------------------------------------------------
def check_writable_folder(folder: str, what: str = "--workdir") -> None:
    """`folder` is (or can be created as) a writable folder; checked without creating it.

    Every existing component of the path must be a folder; the deepest existing one must accept a new file
    (probed with a temp file that is removed at once: read-only file systems and /proc are found here).
    """
    folder = os.path.abspath(folder)
    probe = folder
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UserError(f"cannot write to {what} {folder}: {probe} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=f"{temp_prefix()}probe_", dir=probe)
        os.close(fd)
        os.remove(name)
    except OSError as error:
        reason = os.strerror(error.errno).lower() if error.errno else str(error)
        raise UserError(f"cannot write to {what} {folder}: {reason} ({probe})") from None


def check_output_files(paths: Iterable[str]) -> None:
    """Every output path can be written: its folder is writable and the path is not a folder."""
    for path in paths:
        if os.path.isdir(path):
            raise UserError(f"cannot write {path}: it is a folder")
        check_writable_folder(os.path.dirname(os.path.abspath(path)), "output folder")


# --- file contents ----------------------------------------------------------------------------------------------
def check_binary_mask(array: np.ndarray, path: str) -> np.ndarray:
    """A mask file's values as float 0/1 (1 = known): uint8 0/255 (or 0/1), floats exactly 0 or 1; NaN refused."""
    if array.size == 0:
        raise UserError(f"--mask {path!r} is empty")
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise UserError(f"--mask {path!r} holds NaN or infinite values; a mask must be 0 (missing) or 1 (known)")
    if array.dtype == np.uint8 and values.max() > 1:
        values = values / 255.0
    bad = (values != 0) & (values != 1)
    if bad.any():
        raise UserError(f"--mask {path!r} must hold only 0 (missing) and 1 (known) (uint8: 0 and 255), "
                        f"got values such as {values[bad].flat[0]:g}")
    return values.astype(np.float32)


def describe_read_error(error: BaseException) -> str:
    """What is wrong with a data file (npz, npy, image) a library failed to read, in a few words, without the
    library's own advice (no hint about allow_pickle: such files are never loaded in a way that runs code).
    Failed torch loads are described by training/load_errors.py."""
    text = " ".join(str(error).split())
    lowered = text.lower()
    if isinstance(error, EOFError) or "ran out of input" in lowered:
        return "the file is empty or truncated"
    if "object arrays cannot be loaded" in lowered:
        return "it holds Python objects, not plain numeric arrays"
    if "contains pickled" in lowered or "allow_pickle" in lowered:
        return "it is not an npz/npy file (damaged, another format, or pickled Python objects)"
    sentence = text.split(". ")[0][:160]
    return f"{type(error).__name__}: {sentence}" if sentence else type(error).__name__


# --- the whole run ----------------------------------------------------------------------------------------------
# mode -> folders (under the workdir) that it writes; "" is the workdir itself
OUTPUT_FOLDERS = {"train": ("", "checkpoints", "tensorboard"), "sample": ("samples",), "eval": ("eval",),
                  "likelihood": ("likelihood",), "train_classifier": ("",), "inpaint": ("controllable",),
                  "colorize": ("controllable",), "interpolate": ("controllable",), "export": ("export",)}


def check_settings(config, args, mode: str, get_sde) -> None:
    """Flags, config values and memory estimates of `mode` (the runners call this; main.py via validate_run)."""
    validate_args(args, mode)
    _check_sde(config.sde)
    validate_config(config, mode, float(get_sde(config).T), bool(getattr(args, "allow_large", False)))
    validate_memory(config, mode, args)


def validate_run(config, args, workdir: str, get_sde) -> None:
    """All checks that can run before any work: flags, config values, memory, output folders (main.py calls it).

    `get_sde(config)` builds the SDE (for its end time T); it is passed in so that this module stays in the
    lowest layer. Afterwards temp files of killed writers are removed from the run's folders (rank 0 only).
    """
    from atomic_io import remove_stale_temps

    mode = str(args.mode)
    check_settings(config, args, mode, get_sde)
    for sub in OUTPUT_FOLDERS.get(mode, ("",)):
        folder = os.path.join(workdir, sub) if sub else workdir
        check_writable_folder(folder, "--workdir" if not sub else f"output folder {sub!r} of --workdir")
    if int(os.environ.get("RANK", "0")) == 0:
        for sub in ("",) + tuple({s for subs in OUTPUT_FOLDERS.values() for s in subs if s}):
            remove_stale_temps(os.path.join(workdir, sub) if sub else workdir)
