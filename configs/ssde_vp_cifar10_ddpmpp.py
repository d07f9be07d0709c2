"""Published checkpoint `vp/cifar10_ddpmpp` of Song et al. (2021): DDPM++ trained in discrete time (VP SDE, 1000 steps)."""
from configs._ssde_cifar10 import ssde_cifar10_config


def get_config():
    return ssde_cifar10_config("vpsde", "ddpmpp", continuous=False, deep=False)
