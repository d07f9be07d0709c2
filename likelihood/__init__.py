"""Likelihoods: PF-ODE log-likelihood (exact, Hutchinson-Skilling or Hutch++ divergence), bits/dim, DDPM bound."""
from likelihood.bpd import (bits_per_dim, bpd_offset, check_uint8_images, dequantize, logp_to_bpd,
                            mean_and_stderr)
from likelihood.ddpm_bound import ddpm_bound_bpd, ddpm_bound_terms, eps_fn_from_score
from likelihood.divergence import DIVERGENCES, exact_divergence, hutchinson_divergence, hutchpp_divergence
from likelihood.ode import (ERROR_NORMS, SCIPY_METHOD, joint_rms_norm, log_likelihood, max_rms_norm, nats_per_dim,
                            nats_to_bits, per_dim_norm, torchdiffeq_methods)

__all__ = ["log_likelihood", "bits_per_dim", "bpd_offset", "logp_to_bpd", "dequantize", "check_uint8_images",
           "mean_and_stderr", "ddpm_bound_bpd", "ddpm_bound_terms", "eps_fn_from_score", "DIVERGENCES",
           "exact_divergence", "hutchinson_divergence", "hutchpp_divergence",
           "SCIPY_METHOD", "ERROR_NORMS", "joint_rms_norm", "max_rms_norm",
           "per_dim_norm", "torchdiffeq_methods",
           "nats_per_dim", "nats_to_bits"]
