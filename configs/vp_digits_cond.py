"""vp_digits, class-conditional: the 8x8 scikit-learn digits with their labels 0..9."""
from configs.vp_digits import get_config as base_config


def get_config():
    config = base_config()
    config.data.num_classes = 10
    config.model.p_uncond = 0.1
    return config
