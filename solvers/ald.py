"""Annealed Langevin dynamics of NCSN (Song & Ermon, 2019, alg. 1) as a sampler for (discrete) VE models."""
from __future__ import annotations

import math

from solvers.common import VE_ONLY, require_sde
from solvers.pc import pc_sample
from solvers.registry import register

# Song & Ermon's default step eps = 2e-5 at sigma_L = 0.01, i.e. eps = 0.2 sigma_L^2: the annealed Langevin
# corrector's snr = sqrt(eps) / (2 sigma_L) = sqrt(0.2) / 2.
NCSN_SNR = math.sqrt(0.2) / 2.0


@register("ald")
def ald_sample(sde, score_fn, shape, *, nfe=None, eps=1e-3, x_T=None, generator=None, corrector_steps: int = 2,
               step_size: float | None = None, noise_removal: bool = True, denoise: bool = True,
               device=None, dtype=None):
    """corrector_steps Langevin steps at each of L noise levels sigma(t), t = T..eps, step step_size sigma_i^2 / sigma_L^2.

    The budget buys L = (nfe - denoise) // corrector_steps levels; `denoise` adds the final Tweedie step (NCSNv2).
    Returns (samples, nfe_used).
    """
    require_sde(sde, VE_ONLY, "ald")
    return pc_sample(sde, score_fn, shape, nfe=nfe, eps=eps, x_T=x_T, generator=generator, predictor="none",
                     corrector="ald", snr=NCSN_SNR, corrector_steps=corrector_steps, step_size=step_size,
                     noise_removal=noise_removal,
                     denoise=denoise, device=device, dtype=dtype, name="ald")
