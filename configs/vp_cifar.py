"""VP SDE, DDPM++ (continuous) on CIFAR-10: the reference `vp/cifar10_ddpmpp_continuous` (Song et al., 2021).

Needs --config.data.path=... (CIFAR-10 pickle folder, folder of npz parts, or npz files).
"""
from configs._cifar_training import for_training
from configs._ssde_cifar10 import ssde_cifar10_config


def get_config():
    return for_training(ssde_cifar10_config("vpsde", "ddpmpp", continuous=True, deep=False))
