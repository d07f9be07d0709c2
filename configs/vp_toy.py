"""VP SDE, MLP score network, 2-D ring of eight Gaussians (the default main job)."""
from configs.default import get_default_config


def get_config():
    config = get_default_config()
    config.data.dataset = "ring2d"
    config.sde.name = "vpsde"
    return config
