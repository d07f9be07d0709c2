"""EDM recipe on the ring: sigma(t) = t SDE, edm preconditioning, EDM weighting with log-normal sigma proposal."""
from configs._edm import edm_recipe
from configs.default import get_default_config


def get_config():
    config = get_default_config()
    config.data.dataset = "ring2d"
    # sigma_max about the ring's diameter x 5, as ve_toy (EDM uses 80 for images in [-1, 1])
    return edm_recipe(config, sigma_max=20.0)
