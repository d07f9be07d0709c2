"""Score-matching objectives: weighted denoising score matching in continuous time (with likelihood
weighting and importance sampling of t), the discrete DDPM and SMLD/NCSN losses, and sliced score matching.

Every loss takes a `score_fn(x, t)` (t continuous in [0, T], a (batch,) tensor), so an exact analytic score
can stand in for a network. Every loss reduces its per-dimension terms per sample as the reference code of
Song et al. (2021) does (`reduce_op` in its losses.py): the mean over data dimensions with `reduce_mean`,
otherwise half their sum; the per-sample values are then averaged over the batch.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from errors import UserError
from sde_lib import SDE, VESDE, VPSDE, broadcast_to, subVPSDE
from training.weightings import PROPOSALS, WEIGHTINGS, LogNormalSigmaSampler, residual_weight

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSS_NAMES = ("dsm", "ddpm", "smld", "ssm")


def _reduce(per_dim: torch.Tensor, reduce_mean: bool) -> torch.Tensor:
    """(batch, ...) -> (batch,): mean over the non-batch dimensions with reduce_mean, else 0.5 * their sum."""
    flat = per_dim.reshape(per_dim.shape[0], -1)
    return flat.mean(dim=1) if reduce_mean else 0.5 * flat.sum(dim=1)


def _uniform_time(n: int, eps: float, T: float, x: torch.Tensor, generator) -> torch.Tensor:
    u = torch.rand(n, generator=generator, device=x.device, dtype=torch.float32)
    return (eps + (T - eps) * u).to(x.dtype)


def _normal_like(x: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


class ImportanceTimeSampler:
    """Draws t on [eps, T] with density q(t) proportional to g(t)^2 / sigma(t)^2 (Song, Durkan et al., 2021, sec. 5.1).

    Under q the likelihood-weighted DSM integrand g^2 ||s + z/sigma||^2 / q(t) becomes Z ||sigma s + z||^2 with the
    constant Z = int_eps^T g^2/sigma^2 dt, which removes most of the variance from the small-t end.
    The inverse CDF is tabulated once (float64, trapezoid rule on a geometric grid in t).
    """

    def __init__(self, sde: SDE, eps: float, grid_size: int = 8193):
        if not 0 < eps < sde.T:
            raise UserError(f"training.eps must be in (0, T={sde.T}), got {eps}")
        t = torch.exp(torch.linspace(math.log(eps), math.log(sde.T), grid_size, dtype=torch.float64))
        density = self._density(sde, t)
        increments = 0.5 * (density[1:] + density[:-1]) * torch.diff(t)
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(increments, 0)])
        self.normalizer = float(cdf[-1])  # Z
        self.grid = t
        self.cdf = cdf / cdf[-1]
        self.eps, self.T = float(eps), float(sde.T)

    @staticmethod
    def _density(sde: SDE, t: torch.Tensor) -> torch.Tensor:
        x = torch.zeros(t.shape[0], 1, dtype=torch.float64)
        _, g = sde.sde(x, t)
        return g ** 2 / sde.marginal_std(t) ** 2

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cdf.device != device:  # move once, so that sampling never synchronises with the host
            self.cdf, self.grid = self.cdf.to(device), self.grid.to(device)
        return self.cdf, self.grid

    def inverse_cdf(self, u: torch.Tensor) -> torch.Tensor:
        """t with CDF(t) = u, by linear interpolation in the table (u in [0, 1], on u's device)."""
        cdf, grid = self._tables(u.device)
        u64 = u.detach().to(torch.float64).clamp(0.0, 1.0)
        idx = torch.searchsorted(cdf, u64).clamp(1, cdf.numel() - 1)
        c0, c1 = cdf[idx - 1], cdf[idx]
        t0, t1 = grid[idx - 1], grid[idx]
        frac = torch.where(c1 > c0, (u64 - c0) / (c1 - c0), torch.zeros_like(u64))
        return t0 + frac * (t1 - t0)

    def sample(self, n: int, x: torch.Tensor, generator=None) -> torch.Tensor:
        """n draws of t from q, on x's device and dtype."""
        u = torch.rand(n, generator=generator, device=x.device, dtype=torch.float32)
        return self.inverse_cdf(u).to(x.dtype)

    def weight(self) -> float:
        """Factor Z / (T - eps) that makes the estimate's mean equal the uniform-t likelihood-weighted loss."""
        return self.normalizer / (self.T - self.eps)


def dsm_loss(score_fn: ScoreFn, sde: SDE, x0: torch.Tensor, *, eps: float = 1e-5, reduce_mean: bool = False,
             likelihood_weighting: bool = False, importance_sampler: ImportanceTimeSampler | None = None,
             generator: torch.Generator | None = None, weighting: str | None = None,
             proposal: "ImportanceTimeSampler | LogNormalSigmaSampler | None" = None, sigma_data: float = 0.5,
             min_snr_gamma: float = 5.0) -> torch.Tensor:
    """Continuous-time weighted DSM (Song et al., 2021, eq. 7), t ~ U[eps, T].

    lambda(t) = sigma(t)^2 (default): E R(sigma s(x_t, t) + z);
    likelihood weighting lambda = g(t)^2: E g^2 R(s + z / sigma) (Song, Durkan et al., 2021, eq. 9);
    with `importance_sampler`, t ~ q(t) and the estimate keeps the same mean. R(v) is mean(v^2) with
    reduce_mean, else ||v||^2 / 2 (`_reduce`).
    `weighting` (training/weightings.py: sigma2, likelihood, edm, min_snr) with a `proposal` of t (None: uniform;
    a sampler with `sample` and `weight`, e.g. `LogNormalSigmaSampler`) gives E w(t) R(std s + z) * proposal.weight().
    """
    if weighting is not None:
        return _weighted_dsm_loss(score_fn, sde, x0, weighting, proposal, eps=eps, reduce_mean=reduce_mean,
                                  sigma_data=sigma_data, gamma=min_snr_gamma, generator=generator)
    n = x0.shape[0]
    if importance_sampler is not None:
        if not likelihood_weighting:
            raise UserError("importance sampling of t is defined for the likelihood weighting only "
                            "(set training.likelihood_weighting=true)")
        t = importance_sampler.sample(n, x0, generator)
    else:
        t = _uniform_time(n, eps, sde.T, x0, generator)
    z = _normal_like(x0, generator)
    mean, std = sde.marginal_prob(x0, t)
    x_t = mean + broadcast_to(std, x0) * z
    score = score_fn(x_t, t)
    if importance_sampler is not None:
        losses = _reduce((score * broadcast_to(std, x0) + z) ** 2, reduce_mean) * importance_sampler.weight()
    elif likelihood_weighting:
        _, g = sde.sde(x0, t)
        losses = _reduce((score + z / broadcast_to(std, x0)) ** 2, reduce_mean) * g ** 2
    else:
        losses = _reduce((score * broadcast_to(std, x0) + z) ** 2, reduce_mean)
    return losses.mean()


def _weighted_dsm_loss(score_fn: ScoreFn, sde: SDE, x0: torch.Tensor, weighting: str, proposal, *, eps: float,
                       reduce_mean: bool, sigma_data: float, gamma: float, generator) -> torch.Tensor:
    """E_{t ~ proposal} w(t) R(std s(x_t, t) + z) * proposal.weight(), w from `residual_weight`."""
    if weighting not in WEIGHTINGS:
        raise UserError(f"unknown training.weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
    n = x0.shape[0]
    t = _uniform_time(n, eps, sde.T, x0, generator) if proposal is None else proposal.sample(n, x0, generator)
    z = _normal_like(x0, generator)
    mean, std = sde.marginal_prob(x0, t)
    x_t = mean + broadcast_to(std, x0) * z
    score = score_fn(x_t, t)
    weight = residual_weight(weighting, sde, t, x0, sigma_data=sigma_data, gamma=gamma)
    scale = 1.0 if proposal is None else proposal.weight()
    return (_reduce((score * broadcast_to(std, x0) + z) ** 2, reduce_mean) * weight * scale).mean()


def _step_times(sde: SDE, n: int, x: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform step indices i in 0..N-1 and their times t_i = i T / (N - 1), at which a discrete network's
    label is step i (`SDE.step_time`)."""
    if sde.N < 2:
        raise UserError(f"discrete losses need sde.num_scales >= 2, got {sde.N}")
    i = torch.randint(0, sde.N, (n,), generator=generator, device=x.device)
    return i, sde.step_time(i, x.dtype)


def ddpm_alpha_bar(sde: VPSDE, i: torch.Tensor) -> torch.Tensor:
    """alpha_bar_i = prod_{j <= i} (1 - beta_j) of DDPM's chain (Ho et al., 2020, eq. 4), float64."""
    betas = sde.discrete_betas(torch.arange(sde.N, dtype=torch.float64, device=i.device))
    return torch.exp(torch.cumsum(torch.log1p(-betas), 0))[i]


def ddpm_loss(score_fn: ScoreFn, sde: VPSDE, x0: torch.Tensor, *, reduce_mean: bool = True,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """DDPM's simple loss E R(eps_theta(x_i, i) - z) (Ho et al., 2020, eq. 14) with eps_theta = -std_i s.

    R is the reference's reduction (`_reduce`): mean of squares with reduce_mean, else half the squared norm.
    """
    if not isinstance(sde, VPSDE) or isinstance(sde, subVPSDE):
        raise UserError("the discrete DDPM loss needs the VP SDE (sde.name='vpsde')")
    i, t = _step_times(sde, x0.shape[0], x0, generator)
    alpha_bar = ddpm_alpha_bar(sde, i).to(x0.dtype)
    std = torch.sqrt(1.0 - alpha_bar)
    z = _normal_like(x0, generator)
    x_i = broadcast_to(torch.sqrt(alpha_bar), x0) * x0 + broadcast_to(std, x0) * z
    score = score_fn(x_i, t)
    return _reduce((score * broadcast_to(std, x0) + z) ** 2, reduce_mean).mean()


def smld_loss(score_fn: ScoreFn, sde: VESDE, x0: torch.Tensor, *, reduce_mean: bool = False,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """NCSN's loss with lambda(sigma_i) = sigma_i^2: E R(sigma_i s(x0 + sigma_i z) + z) (Song & Ermon, 2019, eq. 6).

    R is the reference's reduction (`_reduce`): mean of squares with reduce_mean, else half the squared norm
    (the 1/2 of Song & Ermon's objective).
    """
    if not isinstance(sde, VESDE):
        raise UserError("the discrete SMLD/NCSN loss needs the VE SDE (sde.name='vesde')")
    i, t = _step_times(sde, x0.shape[0], x0, generator)
    sigma = sde.discrete_sigmas(i.to(x0.dtype))
    z = _normal_like(x0, generator)
    x_i = x0 + broadcast_to(sigma, x0) * z
    score = score_fn(x_i, t)
    return _reduce((score * broadcast_to(sigma, x0) + z) ** 2, reduce_mean).mean()


def sliced_score_matching_loss(score_fn: ScoreFn, sde: SDE, x0: torch.Tensor, *, eps: float = 1e-5,
                               reduce_mean: bool = False, n_projections: int = 1,
                               generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise-conditional sliced score matching (Song et al., 2019, SSM-VR), weighted by sigma(t)^2.

    For x_t ~ p_t: E_v [v^T grad_x (v^T s) + ||s||^2 / 2] with v ~ N(0, I); at s = grad log p_t it equals
    -E ||grad log p_t||^2 / 2. Needs no perturbation kernel, only samples of x_t; costs one extra backward pass.
    Its per-dimension terms s_d^2 + 2 v_d d_d(v^T s) are those of E ||s - grad log p_t||^2 up to a constant,
    so `_reduce` gives that objective with reduce_mean=False and 2 / d times it with reduce_mean=True,
    the same scales as the DSM losses.
    """
    if n_projections < 1:
        raise UserError(f"training.n_projections must be >= 1, got {n_projections}")
    n = x0.shape[0]
    t = _uniform_time(n, eps, sde.T, x0, generator)
    mean, std = sde.marginal_prob(x0, t)
    x_t = (mean + broadcast_to(std, x0) * _normal_like(x0, generator)).detach().requires_grad_(True)
    score = score_fn(x_t, t)
    per_dim = score ** 2
    for _ in range(n_projections):
        v = _normal_like(x0, generator)
        (grad_v,) = torch.autograd.grad((score * v).sum(), x_t, create_graph=True)
        per_dim = per_dim + (2.0 / n_projections) * grad_v * v
    return (_reduce(per_dim, reduce_mean) * std ** 2).mean()


def drop_labels(labels: torch.Tensor, p_uncond: float, num_classes: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Label dropout (Ho & Salimans, 2022): each class label becomes the null class `num_classes` with prob. p_uncond."""
    if not 0.0 <= float(p_uncond) <= 1.0:
        raise UserError(f"model.p_uncond must be in [0, 1], got {p_uncond}")
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < float(p_uncond)
    return torch.where(drop, torch.full_like(labels, int(num_classes)), labels)


def resolve_loss_name(config, sde: SDE) -> str:
    """training.loss, with "auto" = dsm for continuous training, ddpm (VP) or smld (VE) for discrete."""
    name = str(config.training.get("loss", "auto")).lower()
    if name == "auto":
        if config.training.continuous:
            return "dsm"
        if isinstance(sde, VESDE):
            return "smld"
        if isinstance(sde, VPSDE) and not isinstance(sde, subVPSDE):
            return "ddpm"
        raise UserError("discrete training (training.continuous=false) needs the VP or VE SDE; "
                        "sub-VP has no discrete chain")
    if name not in LOSS_NAMES:
        raise UserError(f"unknown training.loss {name!r}; valid: auto, {', '.join(LOSS_NAMES)}")
    return name


def _weighting_and_proposal(config, sde: SDE, eps: float):
    """training.weighting and training.proposal, checked: (weighting, proposal sampler or None for uniform t).

    sigma2 / likelihood keep the original path (weighting "likelihood" = training.likelihood_weighting=true, either
    one selects it; training.importance_sampling);
    edm and min_snr take training.proposal ("auto": lognormal for edm, uniform for min_snr).
    """
    tr = config.training
    weighting = str(tr.get("weighting", "sigma2")).lower()
    proposal = str(tr.get("proposal", "auto")).lower()
    if weighting not in WEIGHTINGS:
        raise UserError(f"unknown training.weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
    if proposal not in PROPOSALS + ("auto",):
        raise UserError(f"unknown training.proposal {proposal!r}; valid: auto, {', '.join(PROPOSALS)}")
    if weighting in ("sigma2", "likelihood"):
        if proposal not in ("auto", "uniform", "importance"):
            raise UserError(f"training.proposal={proposal!r} is for weighting edm or min_snr; sigma2 and likelihood "
                            "use uniform t (or training.importance_sampling=true)")
        return weighting, None
    if tr.likelihood_weighting or tr.get("importance_sampling", False):
        raise UserError(f"training.weighting={weighting!r} replaces training.likelihood_weighting / "
                        "importance_sampling; set both to false")
    gamma = float(tr.get("min_snr_gamma", 5.0))
    if weighting == "min_snr" and not (math.isfinite(gamma) and gamma > 0):
        raise UserError(f"training.min_snr_gamma must be a positive number, got {gamma}")
    if proposal == "importance":
        raise UserError("training.proposal='importance' is the likelihood weighting's proposal "
                        "(training.importance_sampling=true)")
    if proposal == "lognormal" or (proposal == "auto" and weighting == "edm"):
        return weighting, LogNormalSigmaSampler(sde, eps, float(tr.get("p_mean", -1.2)), float(tr.get("p_std", 1.2)))
    return weighting, None


def get_loss_fn(config, sde: SDE) -> Callable[[ScoreFn, torch.Tensor, torch.Generator | None], torch.Tensor]:
    """loss_fn(score_fn, x0, generator) -> scalar loss, as config.training describes."""
    tr = config.training
    name = resolve_loss_name(config, sde)
    eps, reduce_mean = float(tr.eps), bool(tr.reduce_mean)
    if not 0 < eps < sde.T:
        raise UserError(f"training.eps must be in (0, T={sde.T}), got {eps}")
    if name == "dsm" and str(tr.get("weighting", "sigma2")).lower() in ("edm", "min_snr"):
        weighting, proposal = _weighting_and_proposal(config, sde, eps)
        sigma_data, gamma = float(config.model.get("sigma_data", 0.5)), float(tr.get("min_snr_gamma", 5.0))

        def loss_fn(score_fn, x0, generator=None):
            return dsm_loss(score_fn, sde, x0, eps=eps, reduce_mean=reduce_mean, generator=generator,
                            weighting=weighting, proposal=proposal, sigma_data=sigma_data, min_snr_gamma=gamma)
    elif name == "dsm":
        likelihood = _weighting_and_proposal(config, sde, eps)[0] == "likelihood" or bool(tr.likelihood_weighting)
        # training.proposal="importance" names the same thing as training.importance_sampling=true (once: ignored)
        importance = bool(tr.get("importance_sampling", False)) or str(tr.get("proposal", "auto")).lower() == "importance"
        sampler = ImportanceTimeSampler(sde, eps) if importance else None
        if sampler is not None and not likelihood:
            raise UserError("training.importance_sampling=true (or training.proposal=importance) needs likelihood "
                            "weighting (training.likelihood_weighting=true or training.weighting=likelihood)")

        def loss_fn(score_fn, x0, generator=None):
            return dsm_loss(score_fn, sde, x0, eps=eps, reduce_mean=reduce_mean,
                            likelihood_weighting=likelihood, importance_sampler=sampler, generator=generator)
    elif name == "ddpm":
        def loss_fn(score_fn, x0, generator=None):
            return ddpm_loss(score_fn, sde, x0, reduce_mean=reduce_mean, generator=generator)
    elif name == "smld":
        def loss_fn(score_fn, x0, generator=None):
            return smld_loss(score_fn, sde, x0, reduce_mean=reduce_mean, generator=generator)
    else:
        n_projections = int(tr.get("n_projections", 1))

        def loss_fn(score_fn, x0, generator=None):
            return sliced_score_matching_loss(score_fn, sde, x0, eps=eps, reduce_mean=reduce_mean,
                                              n_projections=n_projections, generator=generator)
    return loss_fn
