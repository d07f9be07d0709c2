"""VE SDE, NCSN++ (continuous) on CIFAR-10: the reference `ve/cifar10_ncsnpp_continuous` (Song et al., 2021).

Data in [0, 1] (not centered), output divided by sigma, Fourier features of log sigma, FIR resampling.
Needs --config.data.path=...
"""
from configs._cifar_training import for_training
from configs._ssde_cifar10 import ssde_cifar10_config


def get_config():
    return for_training(ssde_cifar10_config("vesde", "ncsnpp", continuous=True, deep=False))
