"""Published checkpoint `vp/cifar10_ddpm` of Song et al. (2021): DDPM (Ho et al.) trained in discrete time (1000 steps, VP SDE)."""
from configs._ssde_cifar10 import ssde_cifar10_config


def get_config():
    return ssde_cifar10_config("vpsde", "ddpm", continuous=False, deep=False)
