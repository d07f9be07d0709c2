"""vp_cifar (DDPM++ continuous), class-conditional on the ten CIFAR-10 classes (label dropout 0.1).

Needs --config.data.path=... as vp_cifar.
"""
from configs.vp_cifar import get_config as base_config


def get_config():
    config = base_config()
    config.data.num_classes = 10
    config.model.p_uncond = 0.1
    return config
