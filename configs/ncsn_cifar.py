"""Discrete VE (NCSNv2, Song & Ermon 2020) on CIFAR-10: the reference `ncsnv2/cifar10`.

232 geometric noise levels from 50 to 0.01, the NCSNv2 network (output / sigma), the SMLD loss with
lambda(sigma) = sigma^2, and annealed Langevin dynamics (5 steps per level) for samples.
Needs --config.data.path=...
"""
from configs._cifar_training import for_training
from configs.default import get_default_config


def get_config():
    config = get_default_config()
    data = config.data
    data.dataset, data.kind, data.image_size, data.num_channels = "cifar10", "image", 32, 3
    data.centered = False
    config.sde.name = "vesde"
    config.sde.sigma_min, config.sde.sigma_max, config.sde.num_scales = 0.01, 50.0, 232
    model = config.model
    model.name, model.nf, model.nonlinearity = "ncsnv2", 128, "elu"
    model.scale_by_sigma, model.ema_rate = True, 0.999
    tr = config.training
    tr.continuous, tr.loss, tr.reduce_mean = False, "smld", False
    tr.batch_size, tr.n_iters, tr.lr, tr.warmup, tr.grad_clip = 128, 300001, 1e-4, 0, 0.0
    sampling = config.sampling
    sampling.solver, sampling.nfe, sampling.eps = "ald", 232 * 5 + 1, 1e-5
    sampling.n_steps_each, sampling.snr, sampling.noise_removal = 5, 0.176, True
    sampling.num_samples, sampling.batch_size = 1000, 250
    return for_training(config)
