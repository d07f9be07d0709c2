"""VP SDE, a small DDPM++ (0.75M parameters) on the 8x8 scikit-learn digits (1,797 images, no download).

The image pipeline end to end on a CPU (uint8 data, dequantization, image grids); about 1-2 steps/s on two
CPU cores, so tens of minutes for the 2,000 steps; far faster on a GPU.
"""
from configs.default import get_default_config


def get_config():
    config = get_default_config()
    data = config.data
    data.dataset, data.kind = "digits", "image"
    data.image_size, data.num_channels = 8, 1
    data.centered, data.uniform_dequantization, data.random_flip = True, True, False
    config.sde.name = "vpsde"
    model = config.model
    model.name, model.nf, model.ch_mult, model.num_res_blocks = "ddpmpp", 32, (1, 2), 1
    model.attn_resolutions, model.dropout, model.embedding_type = (4,), 0.0, "positional"
    model.ema_rate = 0.999
    tr = config.training
    tr.batch_size, tr.n_iters, tr.lr, tr.warmup = 64, 2000, 1e-3, 200
    tr.reduce_mean = True
    tr.log_every, tr.snapshot_every, tr.sample_every, tr.plot_samples = 50, 1000, 0, 64
    config.sampling.nfe, config.sampling.batch_size, config.sampling.num_samples = 500, 256, 256
    config.likelihood.split = "train"  # the digits have one split (no held-out images): bits/dim of training images
    return config
