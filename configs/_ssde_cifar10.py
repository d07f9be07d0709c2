"""Shared builder of the `ssde_*` configs: the published CIFAR-10 checkpoints of Song et al. (2021).

Each `ssde_<sde>_cifar10_<net>[_deep][_continuous]` config reproduces the reference config of the same path
in `yang-song/score_sde_pytorch` (configs/<sde>/cifar10_<net>...), so that `scripts/convert_score_sde_checkpoint.py`
can load that checkpoint into our network and `main.py` can sample it and compute its bits/dim.
Values are the reference's (configs/default_cifar10_configs.py plus the per-model file); the likelihood
section is the paper's Table 2 protocol. Not a config itself (the leading underscore hides it).
"""
from __future__ import annotations

import ml_collections

from configs.default import get_default_config

# DDPM++ / NCSN++ settings shared by every published CIFAR-10 U-Net of the paper (app. H).
_UNET = dict(nf=128, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,), resamp_with_conv=True, conditional=True,
             dropout=0.1, nonlinearity="swish", fir_kernel=(1, 3, 3, 1), skip_rescale=True,
             resblock_type="biggan", progressive="none", progressive_combine="sum", init_scale=0.0,
             fourier_scale=16.0, conv_size=3)


def ssde_cifar10_config(sde: str, net: str, continuous: bool, deep: bool = False) -> ml_collections.ConfigDict:
    """Config of a published CIFAR-10 checkpoint: sde in vpsde/subvpsde/vesde, net in ddpm/ddpmpp/ncsnpp."""
    config = get_default_config()
    data = config.data
    data.dataset, data.kind = "cifar10", "image"
    data.image_size, data.num_channels = 32, 3
    data.random_flip, data.uniform_dequantization = True, False
    data.centered = sde != "vesde"  # VP / sub-VP models see [-1, 1]; VE models [0, 1]

    config.sde.name = sde
    config.sde.beta_min, config.sde.beta_max = 0.1, 20.0
    config.sde.sigma_min, config.sde.sigma_max = 0.01, 50.0
    config.sde.num_scales = 1000

    model = config.model
    if net == "ddpm":
        # DDPM (Ho et al.): the class fixes embedding, blocks and normalization (models/ddpm.py: DDPM_FIXED)
        model.update(dict(name="ddpm", nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                          resamp_with_conv=True, conditional=True, dropout=0.1, nonlinearity="swish",
                          scale_by_sigma=False, embedding_type="positional"))
    else:
        model.update(_UNET)
        model.name = net
        model.num_res_blocks = 8 if deep else 4
        if sde == "vesde":  # NCSN++: FIR resampling, residual input pyramid, output divided by sigma
            model.fir, model.progressive_input, model.scale_by_sigma = True, "residual", True
            model.embedding_type = "fourier" if continuous else "positional"
        else:  # DDPM++
            model.fir, model.progressive_input, model.scale_by_sigma = False, "none", False
            model.embedding_type = "positional"
    model.ema_rate = 0.999 if sde == "vesde" else 0.9999

    training = config.training
    training.continuous = continuous
    training.reduce_mean = sde != "vesde"
    training.batch_size, training.lr, training.warmup, training.grad_clip = 128, 2e-4, 5000, 1.0
    training.n_iters = 950001 if deep else 1300001
    training.snapshot_every, training.log_every = 50000, 50
    training.eps = 1e-5

    sampling = config.sampling
    sampling.solver = "pc"
    if sde == "vesde":  # the paper's PC sampler: reverse diffusion + Langevin, snr 0.16
        sampling.predictor, sampling.corrector, sampling.nfe, sampling.eps = "reverse_diffusion", "langevin", 2000, 1e-5
    else:
        predictor = "ancestral" if not continuous and sde == "vpsde" else "euler_maruyama"
        sampling.predictor, sampling.corrector, sampling.nfe, sampling.eps = predictor, "none", 1000, 1e-3
    sampling.snr, sampling.n_steps_each, sampling.noise_removal = 0.16, 1, True
    sampling.num_samples, sampling.batch_size = 1000, 250

    # Table 2 of the paper: PF-ODE from eps = 1e-5, RK45 (here dopri5, the same Dormand-Prince pair) with
    # rtol = atol = 1e-5, one Rademacher probe, 5 uniform dequantization passes, on the test split.
    lk = config.likelihood
    lk.eps, lk.method, lk.rtol, lk.atol = 1e-5, "dopri5", 1e-5, 1e-5
    lk.error_norm = "max_rms"  # the paper's protocol is kept: each of x and log p held to the tolerance
    lk.divergence, lk.n_probes, lk.num_dequant = "hutchinson_rademacher", 1, 5
    lk.batch_size, lk.split, lk.num_batches = 250, "test", 0
    return config
