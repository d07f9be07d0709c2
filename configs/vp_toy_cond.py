"""vp_toy, class-conditional: the 2-D ring of eight Gaussians whose components are the classes (0..7)."""
from configs.vp_toy import get_config as base_config


def get_config():
    config = base_config()
    config.data.num_classes = 8  # class k = mixture component k of ring2d
    config.model.p_uncond = 0.1
    return config
