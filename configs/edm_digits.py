"""EDM recipe (Karras et al. 2022) on the 8x8 digits with vp_digits' small DDPM++: the CPU-sized counterpart of
edm_cifar, for comparing against the reference recipe (vp_digits) at equal steps."""
from configs._edm import edm_recipe
from configs.vp_digits import get_config as vp_digits_config


def get_config():
    return edm_recipe(vp_digits_config(), sigma_max=80.0)
