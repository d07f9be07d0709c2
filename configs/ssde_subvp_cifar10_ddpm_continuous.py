"""Published checkpoint `subvp/cifar10_ddpm_continuous` of Song et al. (2021): DDPM network trained with the sub-VP SDE."""
from configs._ssde_cifar10 import ssde_cifar10_config


def get_config():
    return ssde_cifar10_config("subvpsde", "ddpm", continuous=True, deep=False)
