"""FID, KID and Inception Score of uint8 image samples against a data split, with the standard FID Inception."""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from atomic_io import write_json
from errors import UserError
from evaluation.image_metrics import frechet_distance_to_features, inception_features, inception_score, kid
from evaluation.inception import build_inception, describe, resolve_weights
from evaluation.reference_stats import check_reference_request, reference_statistics


class ImageQuality:
    """The Inception network and one split's reference statistics; call it on uint8 samples for the metrics.

    Construction resolves the weights first (one-line UserError when they are missing), then loads or
    computes the reference statistics (cached next to the data).
    """

    def __init__(self, config, split: str | None = None, device: torch.device | str = "cpu", progress: bool = True,
                 network: torch.nn.Module | None = None):
        self.config = config
        self.split = str(split or config.eval.split)
        weights = resolve_weights(str(config.eval.inception_weights))
        self.network = build_inception(weights, device) if network is None else network.to(device)
        self.inception = describe(weights)
        self.reference = reference_statistics(config, self.split, self.network, self.inception, progress)

    def __call__(self, samples: np.ndarray, seed: int = 0) -> dict[str, Any]:
        """FID, KID (mean, std over subsets) and IS (mean, std over splits) of uint8 (N, C, H, W) samples."""
        ev = self.config.eval
        pool, logits = inception_features(samples, self.network, int(ev.batch_size))
        n = pool.shape[0]
        ref = self.reference
        kid_mean, kid_std = kid(pool, ref["features"], int(ev.kid_subsets), int(ev.kid_subset_size), seed=seed)
        splits = max(1, min(int(ev.isc_splits), n))
        is_mean, is_std = inception_score(logits, splits=splits)
        return {
            "fid": frechet_distance_to_features(pool, ref["mu"], ref["sigma"]),
            "kid": kid_mean, "kid_std": kid_std,
            "inception_score": is_mean, "inception_score_std": is_std,
            "num_samples": n, "split": self.split, "reference_num_images": int(ref["num_images"]),
            "reference_inception_score": ref["inception_score"][0],
            "kid_subsets": int(ev.kid_subsets),
            "kid_subset_size": min(int(ev.kid_subset_size), n, ref["features"].shape[0]),
            "isc_splits": splits, "reference_stats": ref["path"], "inception": self.inception,
        }


def format_metrics(metrics: dict[str, Any]) -> str:
    """One line: FID, KID and IS with the sample count and split."""
    return (f"FID {metrics['fid']:.3f}  KID {metrics['kid']:.5f} +- {metrics['kid_std']:.5f}  "
            f"IS {metrics['inception_score']:.3f} +- {metrics['inception_score_std']:.3f}  "
            f"({metrics['num_samples']} samples vs {metrics['reference_num_images']} {metrics['split']} images)")


class ImageMetricsCallback:
    """Training callback (training.trainer seam): FID/KID/IS of `num_samples` EMA samples every `every` steps.

    Samples with config.sampling's solver and NFE (seeded by config.seed: the same noise at every step) and
    writes each report to WORKDIR/eval/fid_train_step{K}.json. What could fail later is checked at construction,
    so `--mode train` stops before training, in one line: the weights are loaded into the network (on the CPU;
    moved to the training device at the first call), the data path, split and eval.reference_num_images are
    checked. The reference statistics are computed or loaded at the first call (on the main process only).
    """

    def __init__(self, config, every: int, num_samples: int, split: str | None = None):
        if int(num_samples) < 2:
            raise UserError(f"eval.fid_num_samples must be at least 2, got {num_samples}")
        self.config, self.every, self.num_samples, self.split = config, int(every), int(num_samples), split
        self.network: torch.nn.Module | None = build_inception(resolve_weights(str(config.eval.inception_weights)))
        check_reference_request(config, str(split or config.eval.split))
        self.quality: ImageQuality | None = None
        self.last: dict[str, Any] | None = None  # the full report of the last call

    def __call__(self, event) -> dict[str, float]:
        from evaluation.sample_runner import generate, to_data_space

        config = event.config
        if self.quality is None:
            self.quality = ImageQuality(config, self.split, device=event.device, network=self.network)
            self.network = None  # ImageQuality holds it now
        solver, nfe = str(config.sampling.solver), int(config.sampling.nfe)
        x, nfes = generate(config, event.sde, event.score_fn, solver, nfe, self.num_samples, int(config.seed),
                           event.device, progress=False)
        metrics = self.quality(to_data_space(config, x), seed=int(config.seed))
        self.last = {"step": event.step, "solver": solver, "nfe_requested": nfe, "nfe_used": max(nfes), **metrics}
        write_json(os.path.join(event.workdir, "eval", f"fid_train_step{event.step}.json"), self.last)
        return {"fid": metrics["fid"], "kid": metrics["kid"], "inception_score": metrics["inception_score"]}
