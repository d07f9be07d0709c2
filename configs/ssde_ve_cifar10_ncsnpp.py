"""Published checkpoint `ve/cifar10_ncsnpp` of Song et al. (2021): NCSN++ trained with the discrete SMLD loss (positional embedding of the noise index)."""
from configs._ssde_cifar10 import ssde_cifar10_config


def get_config():
    return ssde_cifar10_config("vesde", "ncsnpp", continuous=False, deep=False)
