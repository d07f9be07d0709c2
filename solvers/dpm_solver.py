"""DPM-Solver (Lu et al. 2022) single- and multistep, and DPM-Solver++ multistep (Lu et al. 2022b).

In log-SNR lambda = log(alpha / sigma) the PF-ODE has the exact solution (DPM-Solver eq. 3.4 / ++ eq. 8)

    x_t = (alpha_t / alpha_s) x_s - alpha_t int_{lambda_s}^{lambda_t} e^{-lambda} eps_hat(x_lambda, lambda) dlambda
        = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^{lambda} x0_hat(x_lambda, lambda) dlambda,

with eps_hat = -sigma score (noise prediction) and x0_hat = (x + sigma^2 score) / alpha (data prediction).
Expanding the prediction in Taylor series around lambda_s (h = lambda_t - lambda_s > 0) gives the weights

    psi_n(h) = sigma_t-free part of alpha_t int e^{-lambda} (lambda - lambda_s)^n / n!  = e^h - sum_{j<=n} h^j / j!
    chi_n(h) = sigma_t int e^{lambda} (lambda - lambda_s)^n / n! / alpha_t            = (-1)^{n+1} (e^{-h} - sum_{j<=n} (-h)^j / j!)

Singlestep (`dpm2`, `dpm3`): algorithms 1 and 2 of the paper (r1 = 1/2; r1 = 1/3, r2 = 2/3). A budget of K
evaluations is spent with the paper's order schedule (sec. 3.4, "DPM-Solver-fast"; `singlestep_orders`):
order 3 uses [3] * (K // 3 - 1) + [2, 1], [3] * (K // 3) + [1] or [3] * (K // 3) + [2] for K % 3 = 0, 1, 2;
order 2 uses [2] * (K // 2) (+ [1] for odd K). With the logSNR schedule the len(orders) steps are uniform in
lambda; other schedules place the step ends on the K-step grid at the cumulative orders (official code).

Multistep, one evaluation per step, predictions of earlier steps reused:
- `dpm2m`, `dpm3m`: multistep DPM-Solver (noise prediction);
- `dpmpp2m`, `dpmpp3m`: DPM-Solver++(2M) / (3M) of Lu et al. 2022b, multistep with data prediction
  (the ODE solved in x0_hat, eq. 8 above), no thresholding.
Order 2 is the DPM-Solver++ paper's algorithm 2 update, x_t = decay x_s + phi_0 ((1 + 1/(2r)) m_s - 1/(2r) m_prev)
(the official code's default `solver_type="dpmsolver"`), used also in noise prediction for `dpm2m`. Order 3 is
the third-order Taylor form of the exact solution with the derivatives at lambda_s of the quadratic through the
last three predictions. (The official code's third-order multistep update weights its second divided
difference by half of this Taylor weight; with that weight we measured second-order convergence on a Gaussian
flow.) Warm-up steps have order 1, 2, ..; below 10 steps (DPM-Solver) / 15 steps (DPM-Solver++) the final steps
drop back to order min(order, steps left), the official `lower_order_final`, which stabilises small budgets.
Every variant is valid for VP and sub-VP; the step grid is logSNR-uniform by default.
"""
from __future__ import annotations

import math

import torch

from solvers.common import VP_FAMILY, check_budget, check_choice, initial_state, require_sde
from solvers.registry import register
from solvers.timesteps import check_eps, log_snr, time_grid, time_of_log_snr


def psi(n: int, h: float) -> float:
    """e^h - sum_{j<=n} h^j / j! (noise-prediction Taylor weight), free of cancellation for small h."""
    if h < 1.0:
        return sum(h ** j / math.factorial(j) for j in range(n + 1, n + 30))
    return math.exp(h) - sum(h ** j / math.factorial(j) for j in range(n + 1))


def chi(n: int, h: float) -> float:
    """int_0^h e^{-(h-u)} u^n / n! du = (-1)^{n+1} (e^{-h} - sum_{j<=n} (-h)^j / j!) (data-prediction weight)."""
    if h < 1.0:
        return (-1) ** (n + 1) * sum((-h) ** j / math.factorial(j) for j in range(n + 1, n + 30))
    return (-1) ** (n + 1) * (math.exp(-h) - sum((-h) ** j / math.factorial(j) for j in range(n + 1)))


def singlestep_orders(budget: int, order: int) -> list[int]:
    """Orders of the singlestep steps spending exactly `budget` = K evaluations (DPM-Solver sec. 3.4, "fast").

    order 3: K % 3 == 0 -> [3] * (K // 3 - 1) + [2, 1]; K % 3 == 1 -> [3] * (K // 3) + [1];
             K % 3 == 2 -> [3] * (K // 3) + [2].   order 2: [2] * (K // 2), plus [1] when K is odd.
    """
    k = int(budget)
    if order == 3:
        if k % 3 == 0:
            return [3] * (k // 3 - 1) + [2, 1]
        return [3] * (k // 3) + ([1] if k % 3 == 1 else [2])
    if order == 2:
        return [2] * (k // 2) + ([1] if k % 2 else [])
    return [1] * k


# Multistep: lower-order final steps below these step counts (the official DPM-Solver code's
# `lower_order_final`: steps < 10 for DPM-Solver, < 15 for DPM-Solver++ as in its multistep scheduler).
LOWER_ORDER_FINAL_BELOW = {False: 10, True: 15}


def multistep_orders(steps: int, order: int, data: bool) -> list[int]:
    """Order of each multistep step: warm-up 1, 2, ..., then `order`; with fewer than 10 (DPM-Solver) / 15
    (DPM-Solver++) steps the last steps go down to order 1 again (min(order, steps - i) at step i)."""
    final = steps < LOWER_ORDER_FINAL_BELOW[data]
    return [min(order, i + 1, steps - i) if final else min(order, i + 1) for i in range(steps)]


class _Table:
    """Per-step float64 scalars moved to the sample's device and dtype in one transfer."""

    def __init__(self, rows: list[dict[str, float]], like: torch.Tensor):
        flat = torch.tensor([v for row in rows for v in row.values()], dtype=torch.float64)
        flat = flat.to(device=like.device, dtype=like.dtype)
        self.rows, start = [], 0
        for row in rows:
            self.rows.append(dict(zip(row, flat[start:start + len(row)].unbind())))
            start += len(row)


def _coeffs(sde, t: float) -> tuple[float, float, float]:
    """alpha(t), sigma(t), lambda(t) as Python floats (float64)."""
    tt = torch.tensor(t, dtype=torch.float64)
    return sde.mean_coeff(tt).item(), sde.marginal_std(tt).item(), log_snr(sde, tt).item()


def _singlestep_row(sde, t_s: float, t_t: float, order: int) -> dict[str, float]:
    """Scalars of one DPM-Solver-k step from t_s to t_t (algorithms 1 and 2)."""
    a_s, s_s, l_s = _coeffs(sde, t_s)
    a_t, s_t, l_t = _coeffs(sde, t_t)
    h = l_t - l_s
    row = {"t": t_s, "sigma": s_s, "decay": a_t / a_s, "first": s_t * math.expm1(h)}
    ratios = {1: [], 2: [0.5], 3: [1.0 / 3.0, 2.0 / 3.0]}[order]
    for k, r in enumerate(ratios, start=1):
        t_k = time_of_log_snr(sde, l_s + r * h).item()
        a_k, s_k, _ = _coeffs(sde, t_k)
        row.update({f"t{k}": t_k, f"sigma{k}": s_k, f"decay{k}": a_k / a_s, f"first{k}": s_k * math.expm1(r * h)})
    if order == 2:  # algorithm 1, last line
        row["corr"] = s_t / (2.0 * ratios[0]) * math.expm1(h)
    if order == 3:  # algorithm 2: correction of u2 by D1 and of x_t by D2
        r1, r2 = ratios
        row["corr2"] = row["sigma2"] * r2 / r1 * (psi(1, r2 * h) / (r2 * h))
        row["corr"] = s_t / r2 * psi(1, h) / h
    return row


def _singlestep(sde, score_fn, x, grid, orders):
    rows = _Table([_singlestep_row(sde, s, t, k) for s, t, k in zip(grid[:-1].tolist(), grid[1:].tolist(), orders)],
                  x).rows
    batch = x.shape[0]

    def eps_at(y, c, key=""):  # noise prediction eps_hat = -sigma score at the row's time `key`
        return -c["sigma" + key] * score_fn(y, c["t" + key].expand(batch))

    for c, order in zip(rows, orders):
        e_s = eps_at(x, c)
        x_t = c["decay"] * x - c["first"] * e_s
        if order == 2:
            u = c["decay1"] * x - c["first1"] * e_s
            x_t = x_t - c["corr"] * (eps_at(u, c, "1") - e_s)
        elif order == 3:
            u1 = c["decay1"] * x - c["first1"] * e_s
            d1 = eps_at(u1, c, "1") - e_s
            u2 = c["decay2"] * x - c["first2"] * e_s - c["corr2"] * d1
            x_t = x_t - c["corr"] * (eps_at(u2, c, "2") - e_s)
        x = x_t
    return x


def _multistep_row(sde, history: list[float], t_t: float, data: bool) -> dict[str, float]:
    """Scalars of a multistep update x_t = decay x_s + sum_j w_j m_j from the predictions m_j at `history`.

    history[0] = s is the current time, history[1:] earlier ones; k = len(history) is the step's order.
    k = 2: the DPM-Solver++ paper's (2M) update (Lu et al. 2022b, alg. 2; noise-prediction analogue for
    DPM-Solver), x_t = decay x_s + phi_0 ((1 + 1/(2r)) m_s - 1/(2r) m_prev), r = (lambda_s - lambda_prev) / h.
    k = 1, 3: the Taylor expansion of the exact solution to order k - 1, with the derivatives at lambda_s of the
    interpolating polynomial of the last k predictions: m_j = sum_n m^(n)(lambda_s) delta_j^n / n!,
    delta_j = lambda_j - lambda_s, so the weights solve V w = phi with V[n, j] = delta_j^n / n!.
    """
    a_s, s_s, l_s = _coeffs(sde, history[0])
    a_t, s_t, l_t = _coeffs(sde, t_t)
    h, k = l_t - l_s, len(history)
    deltas = torch.tensor([_coeffs(sde, t)[2] - l_s for t in history], dtype=torch.float64)
    if data:  # DPM-Solver++: x_t = (sigma_t / sigma_s) x_s + alpha_t sum_n chi_n(h) x0^(n)
        phi = torch.tensor([a_t * chi(n, h) for n in range(k)], dtype=torch.float64)
        decay = s_t / s_s
    else:  # DPM-Solver: x_t = (alpha_t / alpha_s) x_s - sigma_t sum_n psi_n(h) eps^(n)
        phi = torch.tensor([-s_t * psi(n, h) for n in range(k)], dtype=torch.float64)
        decay = a_t / a_s
    if k == 2:
        half_over_r = 0.5 * h / (-deltas[1].item())
        weights = [phi[0].item() * (1.0 + half_over_r), -phi[0].item() * half_over_r]
    else:
        vander = torch.stack([deltas ** n / math.factorial(n) for n in range(k)])
        weights = torch.linalg.solve(vander, phi).tolist()
    return {"t": history[0], "alpha": a_s, "sigma": s_s, "decay": decay, **{f"w{j}": w for j, w in enumerate(weights)}}


def _multistep(sde, score_fn, x, grid, order, data):
    times = grid.tolist()
    orders = multistep_orders(len(times) - 1, order, data)
    rows = _Table([_multistep_row(sde, times[i - k + 1:i + 1][::-1], times[i + 1], data)
                   for i, k in enumerate(orders)], x).rows
    batch, past = x.shape[0], []
    for c, k in zip(rows, orders):
        score = score_fn(x, c["t"].expand(batch))
        m = (x + c["sigma"] ** 2 * score) / c["alpha"] if data else -c["sigma"] * score
        past = [m] + past[:order - 1]
        x = c["decay"] * x + sum(c[f"w{j}"] * past[j] for j in range(k))
    return x


def _dpm(sde, score_fn, shape, nfe, eps, x_T, generator, name, order, multistep, data, schedule, device, dtype):
    require_sde(sde, VP_FAMILY, name)
    budget = check_budget(nfe, 20, name)
    eps = check_eps(sde, eps, name)
    check_choice(schedule, ("logsnr", "uniform", "quadratic", "karras"), f"{name} schedule")
    x = initial_state(sde, shape, x_T, generator, device, dtype)
    if multistep:
        return _multistep(sde, score_fn, x, time_grid(sde, budget, eps, schedule), order, data), budget
    orders = singlestep_orders(budget, order)
    if schedule == "logsnr":  # DPM-Solver-fast: the len(orders) outer steps uniform in lambda
        grid = time_grid(sde, len(orders), eps, schedule)
    else:  # other schedules: the step ends are the grid of `budget` steps at the cumulative orders (official)
        grid = time_grid(sde, budget, eps, schedule)[torch.tensor([0] + orders).cumsum(0)]
    return _singlestep(sde, score_fn, x, grid, orders), budget


def _make(name: str, order: int, multistep: bool, data: bool):
    def sampler(sde, score_fn, shape, *, nfe=None, eps=1e-3, x_T=None, generator=None, schedule: str = "logsnr",
                device=None, dtype=None):
        return _dpm(sde, score_fn, shape, nfe, eps, x_T, generator, name, order, multistep, data, schedule,
                    device, dtype)
    if data:
        kind = f"DPM-Solver++({order}M) (Lu et al. 2022b: multistep, data prediction)"
    else:
        kind = f"DPM-Solver-{order} ({'multistep' if multistep else 'singlestep'}, noise prediction)"
    sampler.__name__ = f"{name}_sampler"
    sampler.__doc__ = f"{kind} spending exactly `nfe` evaluations; returns (samples, nfe)."
    return register(name)(sampler)


dpm2_sampler = _make("dpm2", 2, multistep=False, data=False)
dpm3_sampler = _make("dpm3", 3, multistep=False, data=False)
dpm2m_sampler = _make("dpm2m", 2, multistep=True, data=False)
dpm3m_sampler = _make("dpm3m", 3, multistep=True, data=False)
dpmpp2m_sampler = _make("dpmpp2m", 2, multistep=True, data=True)
dpmpp3m_sampler = _make("dpmpp3m", 3, multistep=True, data=True)
