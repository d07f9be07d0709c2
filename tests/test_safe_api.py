"""The Python API builds no autograd graph it does not need: sampling, encode/decode, inpainting, colorization,
interpolation and the likelihood, with a score network whose parameters require grad."""
import pytest
import torch
from torch import nn

import solvers
from data import toy_mixture
from errors import UserError
from sde_lib import VESDE, VPSDE


class RecordingScore(nn.Module):
    """The exact ring score plus a zero-valued trainable term; records whether grad mode was on at each call."""

    def __init__(self, sde, dim: int = 2):
        super().__init__()
        self.exact = toy_mixture("ring2d").score_fn(sde) if dim == 2 else None
        self.weight = nn.Parameter(torch.zeros(dim))  # requires grad, enters every output
        self.grad_modes: list[bool] = []

    def forward(self, x, t):
        self.grad_modes.append(torch.is_grad_enabled())
        base = self.exact(x, t) if self.exact is not None else -x
        return base + self.weight * x


def _sde_for(solver):
    """A VP SDE unless the solver needs VE (ald)."""
    return VESDE(0.01, 5.0, 100) if solver in ("ald",) else VPSDE(0.1, 20.0, 100)


@pytest.mark.parametrize("solver", solvers.available_solvers())
def test_every_sampler_returns_a_plain_tensor_and_never_records_a_graph(solver):
    sde = _sde_for(solver)
    score = RecordingScore(sde)
    with torch.enable_grad():  # even with grad mode on in the caller
        x, used = solvers.sample(sde, score, (16, 2), solver=solver, nfe=2000 if solver in ("adaptive", "ode", "ode_scipy") else 60,
                                 generator=torch.Generator().manual_seed(0))
    assert not x.requires_grad and x.grad_fn is None
    assert score.grad_modes and not any(score.grad_modes), "a score evaluation ran with grad mode on"
    assert len(score.grad_modes) == used and torch.isfinite(x).all()


@pytest.mark.parametrize("name", ["em", "pc", "ddim", "heun", "dpm2"])
def test_registered_samplers_called_directly_are_safe_too(name):
    sde = VPSDE(0.1, 20.0, 100)
    score = RecordingScore(sde)
    x, _ = solvers.SAMPLERS[name](sde, score, (8, 2), nfe=60, generator=torch.Generator().manual_seed(0))
    assert x.grad_fn is None and not any(score.grad_modes)


def test_memory_does_not_grow_with_nfe():
    """Live tensors after sampling do not depend on the number of steps (no graph keeps the chain alive)."""
    import gc

    sde = VPSDE(0.1, 20.0, 1000)
    score = RecordingScore(sde)

    def live_after(nfe):
        x, _ = solvers.sample(sde, score, (64, 2), solver="em", nfe=nfe, generator=torch.Generator().manual_seed(0))
        gc.collect()
        count = sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter))
        del x
        return count

    assert live_after(200) == live_after(20)


def test_encode_decode_inpaint_colorize_interpolate_build_no_graph():
    from solvers.inpainting import colorize, inpaint
    from solvers.interpolation import interpolate

    sde = VPSDE(0.1, 20.0, 100)
    score = RecordingScore(sde, dim=12)
    x = torch.rand(2, 3, 2, 2) * 2 - 1
    score.exact = None

    def image_score(y, t):  # (N, 3, 2, 2) images through the 12-dim recording network
        return score(y.reshape(len(y), -1), t).reshape(y.shape)

    z, _ = solvers.encode(sde, image_score, x, method="rk4", nfe=8)
    back, _ = solvers.decode(sde, image_score, z, method="rk4", nfe=8)
    mask = torch.ones_like(x[0])
    mask[:, :, 1] = 0
    filled, _ = inpaint(sde, image_score, x, mask, nfe=60, generator=torch.Generator().manual_seed(0))
    colored, _ = colorize(sde, image_score, x.mean(1, keepdim=True), nfe=60, generator=torch.Generator().manual_seed(0))
    frames, _ = interpolate(sde, image_score, x, -x, num_frames=3, method="rk4", nfe=8)
    for out in (z, back, filled, colored, frames):
        assert out.grad_fn is None and not out.requires_grad
    assert not any(score.grad_modes)


def test_classifier_guidance_enables_grads_locally_inside_a_no_grad_sampler():
    """grad log p_t(y|x) of an exact two-class posterior still reaches the sampler, and the result has no graph."""
    from solvers.guidance import classifier_guidance

    sde = VPSDE(0.1, 20.0, 100)
    mixture = toy_mixture("ring2d")
    score = RecordingScore(sde)

    def log_prob(x, t):  # log p_t(c | x) of the ring's components (exact)
        return torch.log(mixture.component_posterior(x, t, sde).clamp_min(1e-30))

    guided = classifier_guidance(score, log_prob, 0, scale=4.0)
    x, _ = solvers.sample(sde, guided, (256, 2), solver="em", nfe=100, generator=torch.Generator().manual_seed(0))
    assert x.grad_fn is None and not any(score.grad_modes)
    center = mixture.means[0] if hasattr(mixture, "means") else None
    posterior = mixture.component_posterior(x, 0.0, sde).argmax(1)
    assert (posterior == 0).float().mean() > 0.9, "the guidance gradient was lost"
    del center


def test_likelihood_keeps_no_graph_and_needs_grads_only_for_its_divergence():
    from likelihood import log_likelihood

    sde = VPSDE(0.1, 20.0, 100)
    score = RecordingScore(sde)
    x = toy_mixture("ring2d").sample(8, generator=torch.Generator().manual_seed(0))
    logp, z, nfe = log_likelihood(sde, score, x, method="rk4", options={"step_size": 0.1}, divergence="exact")
    assert logp.grad_fn is None and z.grad_fn is None and nfe > 0
    assert all(score.grad_modes)  # the divergence's VJP is the one place grads are on
    assert score.weight.grad is None  # and it never reaches the parameters
    with pytest.raises(UserError):
        log_likelihood(sde, score, x, rtol=-1.0)


# --- bad input to the Python API: one-line UserErrors, never silently wrong results ------------------------------
def _ring_vp():
    sde = VPSDE()
    return sde, toy_mixture("ring2d").score_fn(sde)


@pytest.mark.parametrize("solver", ["em", "reverse_diffusion", "ancestral", "pc", "ode", "ode_euler", "ode_scipy",
                                    "sde_torchsde", "ddim", "heun"])
@pytest.mark.parametrize("eps", [0.0, -0.1, 1.0, 2.0])
def test_every_sampler_refuses_eps_outside_0_T(solver, eps):
    """Half the samplers used to return inf / NaN samples (eps = 0) or integrate past T (eps = 2) silently."""
    sde, score = _ring_vp()
    with pytest.raises(UserError, match=rf"{solver}: eps must lie in \(0, 1"):
        solvers.sample(sde, score, (4, 2), solver=solver, nfe=4, eps=eps)


def test_encode_and_decode_check_eps_inputs_and_options():
    sde, score = _ring_vp()
    x = torch.zeros(4, 2)
    for eps in (0.0, 2.0):
        with pytest.raises(UserError, match="encode: eps must lie in"):
            solvers.encode(sde, score, x, eps=eps)
    with pytest.raises(UserError, match="decode: z must be a floating-point torch tensor"):
        solvers.decode(sde, score, torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(UserError, match="encode has no option 'tol'"):
        solvers.encode(sde, score, x, tol=1e-3)
    with pytest.raises(UserError, match="rtol and atol must be positive"):
        solvers.decode(sde, score, x, rtol=-1.0)


@pytest.mark.parametrize("shape,nfe,message", [
    (8, 4, "shape must be a tuple of positive integers"), ((-1, 2), 4, "shape must be"), ((8.0, 2), 4, "shape must be"),
    ((0, 2), 4, "shape must be"), ((4, 2), 2.7, "nfe must be a positive integer, got 2.7"),
    ((4, 2), True, "nfe must be a positive integer"), ((4, 2), float("inf"), "nfe must be a positive integer")])
def test_shape_and_nfe_are_checked_not_truncated(shape, nfe, message):
    sde, score = _ring_vp()
    with pytest.raises(UserError, match=message):
        solvers.sample(sde, score, shape, solver="em", nfe=nfe)


def test_x_T_must_be_a_floating_tensor():
    sde, score = _ring_vp()
    for bad in (torch.zeros(4, 2, dtype=torch.long), [[0.0, 0.0]] * 4):
        with pytest.raises(UserError, match="x_T must be a floating-point torch tensor"):
            solvers.sample(sde, score, (4, 2), solver="ddim", nfe=4, x_T=bad)


@pytest.mark.parametrize("solver", ["em", "ode", "ddim"])
def test_a_score_of_the_wrong_shape_is_refused_not_broadcast(solver):
    sde, score = _ring_vp()
    with pytest.raises(UserError, match=r"score_fn returned \(4, 1\) for x of shape \(4, 2\)"):
        solvers.sample(sde, lambda x, t: score(x, t)[:, :1], (4, 2), solver=solver, nfe=4)


def test_nan_scores_stop_the_adaptive_solvers_and_warn_for_the_fixed_step_ones():
    """adaptive used to loop forever (its cap ignored); dopri5 raised torchdiffeq's AssertionError; ode_scipy
    asked for a larger nfe; fixed-step samplers returned NaN without a word."""
    sde, score = _ring_vp()

    def nan_row(x, t):
        out = score(x, t).clone()
        out[0] = float("nan")
        return out

    for solver, message in (("adaptive", "adaptive: the score returned NaN or inf"),
                            ("ode", "ode \\(dopri5\\): the step size underflowed"),
                            ("ode_scipy", "ode_scipy \\(RK45\\): the score returned NaN or inf")):
        with pytest.raises(UserError, match=message):
            solvers.sample(sde, nan_row, (8, 2), solver=solver, nfe=200)
    with pytest.warns(RuntimeWarning, match="em: 2 of 16 sample values are NaN or inf"):
        solvers.sample(sde, nan_row, (8, 2), solver="em", nfe=5)


def test_log_likelihood_refuses_a_score_without_a_graph_and_inference_mode():
    """A detached score made the divergence of the score part zero: log p -13.2 instead of -1.5, no error."""
    from likelihood import log_likelihood

    sde, score = _ring_vp()
    x = toy_mixture("ring2d").sample(8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match="score_fn returned a tensor without an autograd graph"):
        log_likelihood(sde, lambda y, t: score(y, t).detach(), x, divergence="exact")
    with torch.inference_mode(), pytest.raises(UserError, match="outside torch.inference_mode"):
        log_likelihood(sde, score, x)
    with pytest.raises(UserError, match="score_fn returned"):
        log_likelihood(sde, lambda y, t: score(y, t)[:, :1], x)
    with pytest.raises(UserError, match="step_size"):
        log_likelihood(sde, score, x, method="euler", options={"step_size": 0.0})
    with torch.no_grad():  # fine: the divergence enables grads locally
        logp, _, _ = log_likelihood(sde, score, x, divergence="exact")
    assert torch.isfinite(logp).all()


@pytest.mark.parametrize("name", ["ddim", "em", "ode_rk4", "heun"])
def test_registered_samplers_refuse_fractional_budgets_too(name):
    """check_budget, the samplers' shared budget check, used to truncate 2.7 to 2 when called past solvers.sample."""
    from solvers.registry import SAMPLERS

    sde, score = _ring_vp()
    with pytest.raises(UserError, match="nfe must be a positive integer, got 8.5"):
        SAMPLERS[name](sde, score, (4, 2), nfe=8.5)
