"""Published checkpoint `subvp/cifar10_ddpmpp_continuous` of Song et al. (2021): DDPM++ cont. (sub-VP SDE)."""
from configs._ssde_cifar10 import ssde_cifar10_config


def get_config():
    return ssde_cifar10_config("subvpsde", "ddpmpp", continuous=True, deep=False)
