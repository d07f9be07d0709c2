"""`--mode eval`: sample quality of a trained run, written as JSON to `eval/eval_{solver}_nfe{K}_seed{S}[_h<hash>].json`
(the hash as for `--mode sample`, evaluation/outputs.py).

Toy data: sliced Wasserstein-2 distance to exact data samples, with the metric's noise floor (two exact
sets of the same size); for the analytic mixtures also the mode-weight TV error and the mean log-density gap.
Images: FID, KID and Inception Score with the standard FID Inception (evaluation/image_eval.py) against the
reference statistics of a data split (`--split`, default eval.split), plus the samples' per-channel mean/std.
Without the Inception weights the command stops before sampling with one line saying how to get them.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from atomic_io import write_json
from errors import UserError
from evaluation.metrics import mean_log_density_gap, mode_weight_tv, sliced_wasserstein
from evaluation.sample_runner import JOURNAL_SUFFIX, finish_journal, output_stem, sample_from_run
from validation import check_output_files, check_settings


def toy_report(config, samples: np.ndarray, seed: int) -> dict:
    """SW-2 to exact samples (and its noise floor); mode TV and log-density gap for analytic mixtures."""
    from data.mixtures import TOY_MIXTURES, toy_mixture
    from data.toys import sample_toy

    name = str(config.data.dataset)
    x = torch.from_numpy(samples).double()
    n = x.shape[0]
    g = torch.Generator().manual_seed(1_000_003 + seed)
    try:
        reference = sample_toy(name, n, generator=g, dtype=torch.float64)
        second = sample_toy(name, n, generator=g, dtype=torch.float64)
    except ValueError as error:
        raise UserError(f"no exact sampler for dataset {name!r}: {error}") from None
    report = {
        "sw2": sliced_wasserstein(x, reference, generator=torch.Generator().manual_seed(seed)),
        "sw2_noise_floor": sliced_wasserstein(second, reference, generator=torch.Generator().manual_seed(seed)),
        "non_finite": int((~torch.isfinite(x)).any(dim=1).sum()),
    }
    if name in TOY_MIXTURES:
        mixture = toy_mixture(name)
        report["mode_tv"] = mode_weight_tv(x, mixture)
        report["mode_tv_noise_floor"] = mode_weight_tv(second, mixture)
        report["logp_gap"] = mean_log_density_gap(x, mixture, reference)
        report["logp_gap_noise_floor"] = mean_log_density_gap(second, mixture, reference)
    return report


def image_report(samples: np.ndarray) -> dict:
    """Per-channel mean and std of uint8 image samples in [0, 1]."""
    pixels = samples.astype(np.float64) / 255.0
    return {
        "channel_mean": pixels.mean(axis=(0, 2, 3)).round(4).tolist(),
        "channel_std": pixels.std(axis=(0, 2, 3)).round(4).tolist(),
    }


def _image_quality(config, workdir: str, args):
    """The FID/KID/IS evaluator: weights first (one line when missing), then the checkpoint, then the reference."""
    from evaluation.image_eval import ImageQuality
    from evaluation.inception import resolve_weights
    from training.checkpoint import checkpoint_path
    from training.device import get_device

    resolve_weights(str(config.eval.inception_weights))
    if not os.path.isfile(checkpoint_path(workdir)):
        raise UserError(f"no checkpoint at {checkpoint_path(workdir)}; train first (--mode train)")
    return ImageQuality(config, getattr(args, "split", None), device=get_device(config))


def run(config, workdir: str, args) -> int:
    """Draw samples from the latest checkpoint and report their quality as JSON."""
    from sde_lib import get_sde

    check_settings(config, args, "eval", get_sde)  # also when called without main.py
    stem, settings = output_stem(config, args, workdir, "eval")
    path = stem + ".json"
    check_output_files([path, stem + JOURNAL_SUFFIX + "/journal.json"])  # before the work, not after
    image = config.data.get("kind", "toy") == "image"
    quality = _image_quality(config, workdir, args) if image else None  # weights checked before sampling
    # the batches are saved in eval/<stem>.partial/ until the report is written: a killed run resumes
    samples, facts = sample_from_run(config, workdir, args, journal_folder=stem + JOURNAL_SUFFIX)
    report = {key: facts[key] for key in ("solver", "nfe_requested", "nfe_used", "num_samples", "seed",
                                          "checkpoint_step", "dataset", "seconds")}
    if image:
        report.update(quality(samples, seed=facts["seed"]))
        report.update(image_report(samples))
    else:
        report.update(toy_report(config, samples, facts["seed"]))
    write_json(path, {**report, "settings": settings})
    finish_journal(stem + JOURNAL_SUFFIX)
    for key, value in report.items():
        if key != "inception":
            print(f"{key}: {value}")
    if image:
        from evaluation.image_eval import format_metrics

        print(f"{format_metrics(report)}; {report['solver']}, NFE {report['nfe_used']}, "
              f"step {report['checkpoint_step']}")
    print(f"-> {path}")
    return 0
