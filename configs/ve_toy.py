"""VE SDE, MLP score network, 2-D ring of eight Gaussians (sigma_max about the data's diameter x 5)."""
from configs.default import get_default_config


def get_config():
    config = get_default_config()
    config.data.dataset = "ring2d"
    config.sde.name = "vesde"
    config.sde.sigma_min = 0.01
    config.sde.sigma_max = 20.0
    config.model.scale_by_sigma = True
    config.sampling.solver = "pc"
    return config
