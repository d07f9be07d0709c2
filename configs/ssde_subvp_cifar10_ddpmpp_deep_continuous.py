"""Published checkpoint `subvp/cifar10_ddpmpp_deep_continuous` of Song et al. (2021): DDPM++ cont. deep (sub-VP SDE): 2.99 bits/dim in Table 2."""
from configs._ssde_cifar10 import ssde_cifar10_config


def get_config():
    return ssde_cifar10_config("subvpsde", "ddpmpp", continuous=True, deep=True)
