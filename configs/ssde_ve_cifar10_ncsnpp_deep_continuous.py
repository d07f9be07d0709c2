"""Published checkpoint `ve/cifar10_ncsnpp_deep_continuous` of Song et al. (2021): NCSN++ cont. deep (VE SDE, 8 residual blocks per level)."""
from configs._ssde_cifar10 import ssde_cifar10_config


def get_config():
    return ssde_cifar10_config("vesde", "ncsnpp", continuous=True, deep=True)
