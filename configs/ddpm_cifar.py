"""Discrete VP (DDPM, Ho et al. 2020) on CIFAR-10: the reference `vp/ddpm/cifar10`: N = 1000 steps,
the DDPM U-Net, the simple noise-prediction loss and ancestral sampling. Needs --config.data.path=...
"""
from configs._cifar_training import for_training
from configs._ssde_cifar10 import ssde_cifar10_config


def get_config():
    config = for_training(ssde_cifar10_config("vpsde", "ddpm", continuous=False))
    config.training.loss = "ddpm"
    return config
