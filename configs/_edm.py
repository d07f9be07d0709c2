"""The EDM recipe of Karras et al. (2022, Table 1 and sec. 5) on any config: SDE, preconditioning, loss, sampler."""
from __future__ import annotations

import ml_collections


def edm_recipe(config: ml_collections.ConfigDict, sigma_max: float = 80.0) -> ml_collections.ConfigDict:
    """sigma(t) = t SDE to sigma_max, edm parameterization (sigma_data 0.5), EDM weighting with the log-normal
    proposal (P_mean -1.2, P_std 1.2), and the deterministic Heun sampler (18 steps = 35 NFE, sigma_min 0.002)."""
    config.sde.name, config.sde.sigma_max = "edm", float(sigma_max)
    config.model.parameterization, config.model.sigma_data = "edm", 0.5
    config.model.scale_by_sigma, config.model.embedding_type = False, "positional"  # c_noise = ln(sigma) / 4
    tr = config.training
    tr.continuous, tr.weighting, tr.proposal, tr.p_mean, tr.p_std = True, "edm", "lognormal", -1.2, 1.2
    tr.likelihood_weighting, tr.importance_sampling = False, False
    config.sampling.solver, config.sampling.nfe, config.sampling.eps = "heun", 35, 2e-3
    return config
