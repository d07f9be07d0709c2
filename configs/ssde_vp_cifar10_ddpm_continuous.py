"""Published checkpoint `vp/cifar10_ddpm_continuous` of Song et al. (2021): DDPM network trained with the continuous VP SDE."""
from configs._ssde_cifar10 import ssde_cifar10_config


def get_config():
    return ssde_cifar10_config("vpsde", "ddpm", continuous=True, deep=False)
