"""Forward SDEs of score-based generative modeling: VP (DDPM), sub-VP, VE (SMLD/NCSN) and EDM (sigma = t)."""
from errors import UserError
from sde_lib.base import SDE, ReverseSDE, batch_time, broadcast_to
from sde_lib.edm import EDMSDE
from sde_lib.ve import VESDE
from sde_lib.vp import VPSDE, subVPSDE

SDES = {"vpsde": VPSDE, "subvpsde": subVPSDE, "vesde": VESDE, "edm": EDMSDE}


def get_sde(config) -> SDE:
    """Build the SDE named by `config.sde.name` with its parameters from `config.sde`."""
    name = config.sde.name.lower()
    if name not in SDES:
        raise UserError(f"unknown SDE {config.sde.name!r}; valid: {', '.join(SDES)}")
    steps = config.sde.num_scales
    if isinstance(steps, float) and steps.is_integer():  # e.g. --config.sde.num_scales=1000.0
        steps = int(steps)
    try:
        if name == "vesde":
            return VESDE(config.sde.sigma_min, config.sde.sigma_max, steps)
        if name == "edm":
            return EDMSDE(config.sde.sigma_max, steps)
        return SDES[name](config.sde.beta_min, config.sde.beta_max, steps)
    except ValueError as error:  # the constructors' checks, in the config's terms
        raise UserError(f"config.sde ({name}): {error}") from None


__all__ = ["SDE", "ReverseSDE", "VPSDE", "subVPSDE", "VESDE", "EDMSDE", "SDES", "get_sde", "batch_time", "broadcast_to"]
