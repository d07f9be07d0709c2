"""Published checkpoint `vp/cifar10_ddpmpp_deep_continuous` of Song et al. (2021): DDPM++ cont. deep (VP SDE, 8 residual blocks per level)."""
from configs._ssde_cifar10 import ssde_cifar10_config


def get_config():
    return ssde_cifar10_config("vpsde", "ddpmpp", continuous=True, deep=True)
