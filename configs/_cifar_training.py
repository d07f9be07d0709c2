"""Shared pieces of the CIFAR-10 training configs (`vp_cifar`, `subvp_cifar`, `ve_cifar`, `ddpm_cifar`, `ncsn_cifar`).

The network, SDE and optimizer values are those of the reference configs of Song et al. (2021) (see
docs/MODELS.md for the model keys); the data location comes from `--config.data.path=...`
(a `cifar-10-batches-py` folder, a folder of npz parts, or npz files / a glob).
"""
from __future__ import annotations

import ml_collections


def for_training(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Training-loop settings common to the CIFAR-10 runs: logging, snapshots, sample grids."""
    config.data.path = ""  # required: --config.data.path=...
    config.data.random_flip = True
    config.data.uniform_dequantization = False
    tr = config.training
    tr.log_every = 50
    tr.snapshot_every = 10000
    tr.sample_every = 50000
    tr.plot_samples = 64  # an 8x8 grid
    tr.bf16 = True
    config.likelihood.error_norm = "per_dim"  # the toolkit's likelihood step control (the ssde_* keep the paper's)
    return config
