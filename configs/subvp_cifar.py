"""sub-VP SDE, DDPM++ (continuous, 4 blocks per level) on CIFAR-10: reference `subvp/cifar10_ddpmpp_continuous`.

The paper's best sub-VP numbers use the deep variant (8 blocks): --config.model.num_res_blocks=8.
Needs --config.data.path=...
"""
from configs._cifar_training import for_training
from configs._ssde_cifar10 import ssde_cifar10_config


def get_config():
    return for_training(ssde_cifar10_config("subvpsde", "ddpmpp", continuous=True, deep=False))
