"""Controllable generation from a trained run: guided sampling scores and `--mode inpaint|colorize|interpolate`.

Inputs are PNG files (one image) or npz files (key `images`, `x` or `samples`, or the only array: uint8 0..255
or float 0..1, NCHW or NHWC); masks are PNG / npz with 1 (or white) = known, 0 = missing, or the names
`left`, `right`, `top`, `bottom`, `center`. Each mode writes an npz of results, a JSON of facts and a PNG grid
(evaluation/figures.py) under `{workdir}/controllable/`, atomically, named `{mode}[_seed{S}]_h<hash>` where the
hash covers every setting of the result, the contents of the input files included (evaluation/outputs.py).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from atomic_io import save_npz, write_json
from errors import UserError
from evaluation.outputs import file_digest, result_stem
from validation import check_binary_mask, check_output_files, check_settings, describe_read_error
from evaluation.progress import ProgressScore, nfe_bar

GUIDANCE = ("none", "cfg", "classifier")
NAMED_MASKS = ("left", "right", "top", "bottom", "center")


# --- guided score for `--mode sample` ------------------------------------------------------------------------
def guided_score_fn(config, workdir: str, device: torch.device, args):
    """(sde, score_fn, checkpoint step, facts) for --class_label / --guidance / --guidance_scale.

    none: the model's score; with a class label (class-conditional model) the conditional score s(x, t, c).
    cfg: w s(x, t, c) + (1 - w) s(x, t, null), one batched network call (class-conditional model only).
    classifier: s(x, t) + lambda grad log p_t(c | x) with the run's classifier (`--mode train_classifier`);
    s is the unconditional score (the null class of a conditional model).
    """
    from evaluation.run import load_run
    from models import score_fn_options
    from models.guidance import classifier_log_prob_fn, conditional_score_fn
    from solvers.guidance import check_class_label, classifier_free_guidance, classifier_guidance, conditional_score

    guidance = str(getattr(args, "guidance", None) or "none")
    label = getattr(args, "class_label", None)
    scale = getattr(args, "guidance_scale", None)
    scale_given = scale is not None
    scale = 1.0 if scale is None else float(scale)
    num_classes = int(config.data.get("num_classes", 0))
    if guidance not in GUIDANCE:
        raise UserError(f"unknown guidance {guidance!r}; valid: {', '.join(GUIDANCE)}")
    if guidance == "cfg" and num_classes == 0:
        raise UserError("classifier-free guidance needs a class-conditional model (data.num_classes > 0, e.g. "
                        "--config vp_toy_cond); this run's model is unconditional")
    if guidance == "none" and scale_given:
        raise UserError("--guidance_scale needs --guidance cfg or --guidance classifier")
    if guidance != "none" and label is None:
        raise UserError(f"--guidance {guidance} needs --class_label")
    if guidance == "classifier":
        from data.loaders import dataset_num_classes

        label = check_class_label(label, dataset_num_classes(config))
    elif label is not None:
        label = check_class_label(label, num_classes)

    run = load_run(workdir, device, config=config)
    sde, model, step = run.sde, run.model, run.step
    continuous = bool(config.training.continuous)
    if guidance == "cfg":
        score_fn = classifier_free_guidance(conditional_score_fn(sde, model, continuous, **score_fn_options(config)), label, num_classes, scale)
    elif guidance == "classifier":
        from training.classifier import load_classifier

        classifier = load_classifier(config, workdir, device)
        score_fn = classifier_guidance(run.score_fn, classifier_log_prob_fn(classifier), label, scale)
    elif label is not None:
        score_fn = conditional_score(conditional_score_fn(sde, model, continuous, **score_fn_options(config)), label)
    else:
        score_fn = run.score_fn
    facts = {"guidance": guidance, "class_label": label,
             "guidance_scale": scale if guidance != "none" else None}
    return sde, score_fn, step, facts


# --- inputs and masks -----------------------------------------------------------------------------------------
def _require_images(config, mode: str, args=None) -> tuple[int, int]:
    if args is not None:
        from sde_lib import get_sde

        check_settings(config, args, mode, get_sde)  # also when called without main.py
    if config.data.get("kind", "toy") != "image":
        raise UserError(f"--mode {mode} works on image data (e.g. --config vp_digits); "
                        f"{config.data.dataset!r} is not an image data set")
    return int(config.data.num_channels), int(config.data.image_size)


def _read_array(path: str, what: str) -> np.ndarray:
    """The image or mask array of a PNG or npz file: real numbers (bool, integer or float), else one-line UserError."""
    array = _read_file_array(path, what)
    if array.dtype.kind not in "biuf":
        raise UserError(f"{what} {path!r} holds {array.dtype} values; expected numbers (uint8 0..255 or floats)")
    return array


def _read_file_array(path: str, what: str) -> np.ndarray:
    if not path:
        raise UserError(f"{what} is missing: pass a PNG or npz file")
    if not os.path.isfile(path):
        raise UserError(f"{what} file {path!r} does not exist")
    lower = path.lower()
    try:
        if lower.endswith(".npz"):
            with np.load(path, allow_pickle=False) as archive:
                keys = list(archive.keys())
                key = next((k for k in ("images", "x", "samples", "mask") if k in keys), keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise UserError(f"{what} npz {path!r} has keys {keys}; expected 'images', 'x', 'samples' "
                                    "or a single array")
                return np.asarray(archive[key])
        if lower.endswith(".png"):
            import matplotlib.image

            return np.asarray(matplotlib.image.imread(path))
    except UserError:
        raise
    except Exception as error:  # numpy, zipfile and PIL raise many types for damaged files
        raise UserError(f"cannot read {what} {path!r}: {describe_read_error(error)}") from None
    raise UserError(f"{what} {path!r}: expected a .png or .npz file")


def _to_unit_nchw(array: np.ndarray, channels: int, size: int, what: str, path: str) -> np.ndarray:
    """uint8 / float images in any of HW, HWC, NHW, NCHW, NHWC -> float32 (N, channels, size, size) in [0, 1]."""
    x = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)
    if x.ndim == 2:
        x = x[None, None]
    elif x.ndim == 3:
        if x.shape[-1] in (1, 3, 4) and x.shape[0] not in (1, 3):
            x = x.transpose(2, 0, 1)[None]  # one H x W x C image (a PNG)
        elif x.shape[0] in (1, 3):
            x = x[None]  # one C x H x W image
        else:
            x = x[:, None]  # N gray images
    elif x.ndim == 4 and x.shape[1] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4:
        raise UserError(f"{what} {path!r} has shape {array.shape}; expected images (N, C, H, W) or (H, W[, C])")
    if x.shape[0] == 0:
        raise UserError(f"{what} {path!r} holds no images (shape {array.shape})")
    if x.shape[1] == 4:
        x = x[:, :3]  # drop alpha
    if x.shape[1] == 3 and channels == 1:
        x = x.mean(axis=1, keepdims=True)
    elif x.shape[1] == 1 and channels == 3:
        x = np.repeat(x, 3, axis=1)
    if x.shape[1:] != (channels, size, size):
        raise UserError(f"{what} {path!r} has images of shape {tuple(x.shape[1:])}; the model needs "
                        f"({channels}, {size}, {size})")
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise UserError(f"{what} {path!r}: values must be uint8 0..255 or floats in [0, 1]")
    return x


def load_images(config, path: str, what: str = "--input") -> torch.Tensor:
    """Images from a PNG / npz file as float (N, C, H, W) in [0, 1], checked against the config."""
    channels, size = int(config.data.num_channels), int(config.data.image_size)
    return torch.from_numpy(_to_unit_nchw(_read_array(path, what), channels, size, what, path))


def named_mask(name: str, channels: int, size: int) -> torch.Tensor:
    """A (C, H, W) mask with 1 = known: `left` keeps the left half, `center` hides a central square, etc."""
    mask = torch.ones(channels, size, size)
    half, quarter = size // 2, size // 4
    if name == "left":
        mask[..., half:] = 0
    elif name == "right":
        mask[..., :half] = 0
    elif name == "top":
        mask[:, half:, :] = 0
    elif name == "bottom":
        mask[:, :half, :] = 0
    elif name == "center":
        mask[:, quarter:size - quarter, quarter:size - quarter] = 0
    else:
        raise UserError(f"unknown mask {name!r}; valid names: {', '.join(NAMED_MASKS)}, or a PNG / npz file")
    return mask


def load_mask(config, spec: str | None) -> torch.Tensor:
    """--mask as a 0/1 tensor of one image's shape (C, H, W) or (1, H, W) / (H, W) to broadcast over channels."""
    channels, size = int(config.data.num_channels), int(config.data.image_size)
    if spec is None:
        raise UserError("--mode inpaint needs --mask (a PNG / npz file, or one of: " + ", ".join(NAMED_MASKS) + ")")
    if spec in NAMED_MASKS or not (os.path.isfile(spec) or spec.lower().endswith((".png", ".npz"))):
        return named_mask(spec, channels, size)  # a name (or an unknown one: the error lists the names)
    array = check_binary_mask(_read_array(spec, "--mask"), spec)  # exactly 0 / 1 (uint8 0 / 255); NaN refused
    if array.ndim == 3 and array.shape[-1] in (3, 4) and array.shape[0] not in (1, 3):
        array = array[..., :3]  # an RGB(A) PNG: white = known, every color channel must agree
        if (array != array[..., :1]).any():
            raise UserError(f"--mask {spec!r} is a color image; use black (missing) and white (known) only")
        array = array[..., 0]
    mask = torch.from_numpy(array.astype(np.float32))
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or mask.shape[0] not in (1, channels) or mask.shape[1:] != (size, size):
        raise UserError(f"--mask {spec!r} has shape {tuple(array.shape)}; expected ({size}, {size}) or "
                        f"({channels}, {size}, {size}) for this model")
    return mask.expand(channels, size, size).clone()


# --- the three modes -----------------------------------------------------------------------------------------
def _setup(config, workdir: str):
    from evaluation.run import load_run

    run = load_run(workdir, config=config)
    return run.device, run.sde, run.score_fn, run.step


# --solver -> (predictor, corrector) of the PC inpainting; "pc" takes sampling.predictor / sampling.corrector
PC_SOLVERS = {"pc": None, "em": ("euler_maruyama", "none"), "reverse_diffusion": ("reverse_diffusion", "none"),
              "ancestral": ("ancestral", "none"), "ald": ("none", "ald")}
ODE_SOLVERS = {"ode": None, "ode_euler": "euler", "ode_midpoint": "midpoint", "ode_rk4": "rk4"}


def _pc_options(config, args, mode: str) -> dict:
    """Options of the PC inpainting for --solver (default pc: config.sampling.predictor / corrector)."""
    s = config.sampling
    solver = getattr(args, "solver", None) or "pc"
    if solver not in PC_SOLVERS:
        raise UserError(f"--mode {mode} runs the PC inpainting of Song et al. (app. I), which --solver {solver} "
                        f"has no form of; use --solver {' | '.join(PC_SOLVERS)} (pc: set sampling.predictor and "
                        "sampling.corrector)")
    predictor, corrector = PC_SOLVERS[solver] or (str(s.predictor), str(s.corrector))
    return {"nfe": getattr(args, "nfe", None) or int(s.nfe), "eps": float(s.eps), "predictor": predictor,
            "corrector": corrector, "snr": float(s.snr), "corrector_steps": int(s.n_steps_each)}


def _ode_options(config, args) -> tuple[str, dict]:
    """(solver, encode/decode options) for --mode interpolate: --solver ode (sampling.method / rtol / atol, an
    adaptive method capped by --nfe per direction) or a fixed-step ode_* spending --nfe per direction."""
    s = config.sampling
    solver = getattr(args, "solver", None) or "ode"
    if solver not in ODE_SOLVERS:
        raise UserError(f"--mode interpolate encodes and decodes along the PF-ODE, --solver {solver} cannot; use "
                        f"--solver {' | '.join(ODE_SOLVERS)} (ode: set sampling.method, sampling.rtol, sampling.atol)")
    options = {"method": ODE_SOLVERS[solver] or str(s.get("method") or "dopri5"),
               "rtol": float(s.rtol if s.get("rtol") is not None else 1e-5),
               "atol": float(s.atol if s.get("atol") is not None else 1e-5)}
    nfe = getattr(args, "nfe", None)
    if nfe is not None or options["method"] in ("euler", "midpoint", "rk4"):
        options["nfe"] = int(nfe or s.nfe)
    return solver, options


def _pc_label(options: dict) -> str:
    return f"PC {options['predictor']}+{options['corrector']}"


def _output_stem(workdir: str, name: str, settings: dict) -> str:
    """The path stem of a mode's outputs (name + hash of the settings), checked writable before any work."""
    stem = os.path.join(workdir, "controllable", result_stem(name, settings, None))
    check_output_files([stem + ext for ext in (".png", ".npz", ".json")])
    return stem


def _input_settings(args, *names: str) -> dict:
    """The input files (and mask) of a mode as settings: the path and a digest of the contents."""
    out = {}
    for name in names:
        value = getattr(args, name, None)
        out[name] = value if value is None else {"path": os.path.basename(str(value)),
                                                 "sha256": file_digest(str(value))}
    return out


def _save(stem: str, panels: list[torch.Tensor], results: np.ndarray, facts: dict,
          title: str = "", labels: list[str] | None = None) -> str:
    """Grid with one row per input and the panels side by side (titled, columns labelled); npz of results;
    JSON facts. Returns the PNG path."""
    from evaluation.figures import save_image_grid

    tiles = torch.stack([p.clamp(0, 1).float() for p in panels], dim=1)  # (N, panels, C, H, W)
    save_npz(stem + ".npz", results=results)
    write_json(stem + ".json", facts)
    return save_image_grid(stem + ".png", tiles.reshape(-1, *tiles.shape[2:]), nrow=len(panels), title=title,
                           col_labels=labels)


def _generator(config, device):
    return torch.Generator(device=device).manual_seed(int(config.seed))


def _uint8(config, x: torch.Tensor) -> np.ndarray:
    from data.images import from_unit_interval

    return from_unit_interval(x, bool(config.data.get("uniform_dequantization", False))).numpy()


def run_inpaint(config, workdir: str, args) -> int:
    """Fill the masked part of --input images (PC inpainting); grid rows: input | masked input | result."""
    from data.transforms import get_data_inverse_scaler, get_data_scaler
    from solvers.inpainting import check_mask, inpaint

    _require_images(config, "inpaint", args)
    images = load_images(config, getattr(args, "input", None))
    mask = load_mask(config, getattr(args, "mask", None))
    options = _pc_options(config, args, "inpaint")
    settings = {**_input_settings(args, "input", "mask"), **options, "seed": int(config.seed)}
    stem = _output_stem(workdir, f"inpaint_seed{config.seed}", settings)
    device, sde, score_fn, step = _setup(config, workdir)
    x0 = get_data_scaler(config)(images).to(device)
    mask = check_mask(mask, x0)
    with nfe_bar(options["nfe"], f"inpaint ({_pc_label(options)}, NFE budget {options['nfe']})") as bar:
        out, used = inpaint(sde, ProgressScore(score_fn, bar), x0, mask, generator=_generator(config, device),
                            **options)
    result = get_data_inverse_scaler(config)(out.float().cpu()).clamp(0, 1)
    shown = images * mask.cpu() + 0.5 * (1 - mask.cpu())  # missing pixels in gray
    facts = {"mode": "inpaint", "input": args.input, "mask": args.mask, "nfe_used": used,
             "nfe_budget": options["nfe"], "checkpoint_step": step, "seed": int(config.seed),
             **{k: v for k, v in options.items() if k != "nfe"}, "settings": settings}
    png = _save(stem, [images, shown, result], _uint8(config, result), facts,
                f"inpaint, {_pc_label(options)}, NFE {used}, step {step}", ["input", "known", "result"])
    print(f"inpainted {len(images)} image(s) with {_pc_label(options)}, NFE {used} of budget {options['nfe']} "
          f"-> {png}")
    return 0


def run_colorize(config, workdir: str, args) -> int:
    """Color the gray version of --input images (decoupled inpainting); grid rows: input | gray | result."""
    from data.transforms import get_data_inverse_scaler, get_data_scaler
    from solvers.inpainting import colorize

    channels, _ = _require_images(config, "colorize", args)
    if channels != 3:
        raise UserError(f"--mode colorize needs an RGB model (data.num_channels = 3), got {channels} channel(s)")
    images = load_images(config, getattr(args, "input", None))
    options = _pc_options(config, args, "colorize")
    settings = {**_input_settings(args, "input"), **options, "seed": int(config.seed)}
    stem = _output_stem(workdir, f"colorize_seed{config.seed}", settings)
    device, sde, score_fn, step = _setup(config, workdir)
    gray = images.mean(dim=1, keepdim=True)
    with nfe_bar(options["nfe"], f"colorize ({_pc_label(options)}, NFE budget {options['nfe']})") as bar:
        out, used = colorize(sde, ProgressScore(score_fn, bar), get_data_scaler(config)(gray).to(device),
                             generator=_generator(config, device), **options)
    result = get_data_inverse_scaler(config)(out.float().cpu()).clamp(0, 1)
    facts = {"mode": "colorize", "input": args.input, "nfe_used": used, "nfe_budget": options["nfe"],
             "checkpoint_step": step, "seed": int(config.seed), **{k: v for k, v in options.items() if k != "nfe"},
             "settings": settings}
    png = _save(stem, [images, gray.expand_as(images), result], _uint8(config, result),
                facts, f"colorize, {_pc_label(options)}, NFE {used}, step {step}", ["input", "gray", "result"])
    print(f"colorized {len(images)} image(s) with {_pc_label(options)}, NFE {used} of budget {options['nfe']} "
          f"-> {png}")
    return 0


def run_interpolate(config, workdir: str, args) -> int:
    """PF-ODE encode --input and --input2, slerp the latents, decode; grid rows: the frames from one to the other."""
    from data.transforms import get_data_inverse_scaler, get_data_scaler
    from solvers.interpolation import interpolate

    _require_images(config, "interpolate", args)
    first = load_images(config, getattr(args, "input", None), "--input")
    second = load_images(config, getattr(args, "input2", None), "--input2")
    if first.shape != second.shape:
        raise UserError(f"--input and --input2 must hold the same number of images, got {len(first)} and {len(second)}")
    num_frames = 8 if getattr(args, "num_frames", None) is None else int(args.num_frames)
    if num_frames < 2:
        raise UserError(f"--num_frames must be at least 2 (the two end points), got {num_frames}")
    solver, options = _ode_options(config, args)
    settings = {**_input_settings(args, "input", "input2"), "num_frames": num_frames,
                "eps": float(config.sampling.eps), "solver": solver, **options}
    stem = _output_stem(workdir, "interpolate", settings)
    device, sde, score_fn, step = _setup(config, workdir)
    scaler = get_data_scaler(config)
    budget = 2 * options["nfe"] if "nfe" in options else None  # encode + decode
    what = f"{options['method']}" + (f", NFE budget {budget}" if budget else f", rtol {options['rtol']:g}")
    with nfe_bar(budget, f"interpolate (PF-ODE {what})") as bar:
        frames, used = interpolate(sde, ProgressScore(score_fn, bar), scaler(first).to(device),
                                   scaler(second).to(device), num_frames=num_frames, eps=float(config.sampling.eps),
                                   **options)
    frames = get_data_inverse_scaler(config)(frames.float().cpu()).clamp(0, 1)  # (F, N, C, H, W)
    panels = [first] + [frames[k] for k in range(num_frames)] + [second]
    facts = {"mode": "interpolate", "input": args.input, "input2": args.input2, "num_frames": num_frames,
             "solver": solver, "nfe_used": used, "nfe_budget": budget, "checkpoint_step": step, **options,
             "settings": settings}
    labels = ["input"] + [f"a={k / (num_frames - 1):.2f}" for k in range(num_frames)] + ["input2"]
    png = _save(stem, panels, _uint8(config, frames), facts,
                f"PF-ODE interpolation ({options['method']}), NFE {used}, step {step}", labels)
    print(f"interpolated {len(first)} pair(s) in {num_frames} frames with the PF-ODE ({options['method']}), NFE {used}"
          + (f" of budget {budget}" if budget else "") + f" -> {png}")
    return 0
