"""EDM's CIFAR-10 setup (Karras et al. 2022, Table 7 config F, unconditional, DDPM++ network) in this toolkit.

Network as EDM's `ddpmpp` SongUNet: 128 channels, ch_mult (2, 2, 2), 4 blocks per resolution, attention at 16x16,
dropout 0.13, positional noise embedding; edm preconditioning (sigma_data 0.5), EDM weighting with log-normal
sigma (P_mean -1.2, P_std 1.2), sigma(t) = t SDE to 80; Adam lr 1e-3 with a 10 Mimg linear ramp-up
(19,531 steps of 512), batch 512, 200 Mimg (390,625 steps), EMA half-life 0.5 Mimg (rate 0.5^(512/500000) per
step; EDM's EMA ramp-up is not modelled), no gradient clipping (EDM clips none), augmentation off (no flips; EDM's
non-leaking augmentation is not implemented). Sampling: Heun, 18 steps (35 NFE), rho 7, sigma_min 0.002.
Needs --config.data.path=... (CIFAR-10 pickle folder, folder of npz parts, or npz files).
"""
from configs._cifar_training import for_training
from configs._edm import edm_recipe
from configs._ssde_cifar10 import ssde_cifar10_config


def get_config():
    config = edm_recipe(for_training(ssde_cifar10_config("vpsde", "ddpmpp", continuous=True, deep=False)), 80.0)
    config.data.random_flip = False
    model = config.model
    model.ch_mult, model.num_res_blocks, model.attn_resolutions, model.dropout = (2, 2, 2), 4, (16,), 0.13
    model.ema_rate = 0.5 ** (512 / 500_000)
    tr = config.training
    tr.batch_size, tr.lr, tr.warmup, tr.grad_clip = 512, 1e-3, 19531, 0.0
    tr.n_iters = 390625
    return config
