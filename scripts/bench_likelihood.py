"""Benchmark: batched torchdiffeq PF-ODE likelihood against the scipy RK45 reference path.

Both paths compute bits/dim of the same uniformly dequantized 8-bit images with the same Hutchinson
probes (same generator seed) at the same tolerance; the report gives bits/dim (mean ± standard error),
mean NFE per batch, images/s and the largest per-image disagreement between the paths.

Score functions:
  gaussian  the exact score of a per-pixel Gaussian fitted to the data in the model range (a real density,
            so bits/dim is meaningful and its exact value at eps is reported next to the ODE estimates);
  ddpmpp    the same Gaussian score plus NET_WEIGHT x the output of a small randomly initialised DDPM++
            U-Net (as a noise prediction): the cost per evaluation of a network (forward + VJP through it)
            on an ODE as smooth as a real density's. An untrained network alone makes the ODE very stiff
            (over 1,500 NFE for one batch of digits at tol 1e-5), unlike a trained one;
  run       the EMA network of the trained run in --workdir (its SDE and data scaling; --sde is ignored).

With several methods, the per-image bits/dim of each is compared with the first (largest and RMS difference):
put an exact-divergence method first (e.g. dopri5@exact) to measure the estimators' per-image error. Use one
batch (--num_images = --batch_size) so that every method sees the same dequantization.

Examples:
  python scripts/bench_likelihood.py --data digits --score gaussian --num_images 64 --batch_size 64
  python scripts/bench_likelihood.py --data digits --score ddpmpp --methods dopri5,dopri5@hutchpp:1,dopri5@hutchpp:2
  python scripts/bench_likelihood.py --data digits --score run --workdir runs/digits --num_images 16 --batch_size 16 \
      --methods dopri5@exact,dopri5@hutchinson_rademacher,dopri5@hutchpp:2 --repeats 1
  python scripts/bench_likelihood.py --data cifar10 --score ddpmpp --net_config ssde_vp_cifar10_ddpmpp_continuous \
      --device cuda --num_images 500 --batch_size 250 --repeats 1
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from atomic_io import write_json  # noqa: E402
from data import GaussianMixture  # noqa: E402
from likelihood import bits_per_dim, joint_rms_norm, mean_and_stderr  # noqa: E402
from likelihood.divergence import draw_probes  # noqa: E402
from sde_lib import VESDE, VPSDE, subVPSDE  # noqa: E402

SDES = {"vp": VPSDE, "subvp": subVPSDE, "ve": VESDE}
NET_WEIGHT = 1e-3


def load_images(name: str, num: int) -> np.ndarray:
    """The first `num` test images (N, C, H, W) uint8 of digits or CIFAR-10 (npz parts in /work/shared)."""
    if name == "digits":
        from data.digits import load_digits_uint8

        return load_digits_uint8()[0][-num:]  # the last images: a held-out-style slice
    path = os.environ.get("CIFAR10_NPZ", "/work/shared/data/cifar10/test.npz")
    with np.load(path, allow_pickle=False) as archive:
        return np.ascontiguousarray(archive["x"][:num].transpose(0, 3, 1, 2))


def gaussian_score(images: np.ndarray, sde, scale):
    """A per-pixel Gaussian fitted to the scaled images; returns (score_fn, mixture) with the exact score."""
    a, b = scale
    y = a * torch.from_numpy(images).double().reshape(images.shape[0], -1) / 255.0 + b
    mixture = GaussianMixture([1.0], y.mean(0, keepdim=True), y.std(0).clamp(min=0.05)[None])

    def score_fn(x, t):
        flat = x.reshape(x.shape[0], -1)
        return mixture.marginal_score(flat.double(), t.double(), sde).to(x.dtype).reshape(x.shape)

    return score_fn, mixture


def ddpmpp_score(images: np.ndarray, sde_name: str, device, init_scale: float = 0.1, net_config: str = ""):
    """A randomly initialised network and its score function: a small DDPM++, or the one of `net_config`."""
    import configs
    import models
    from sde_lib import get_sde

    if net_config:  # e.g. ssde_vp_cifar10_ddpmpp_continuous: the paper-size network, random weights
        config = configs.get_config(net_config)
    else:
        config = configs.get_config({"vp": "vp_toy", "subvp": "subvp_toy", "ve": "ve_toy"}[sde_name])
        config.model.update(name="ddpmpp", nf=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,))
    config.data.update(kind="image", image_size=images.shape[-1], num_channels=images.shape[1], centered=True)
    config.model.init_scale = init_scale
    torch.manual_seed(0)
    model = models.create_model(config).to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return models.get_score_fn(get_sde(config), model, continuous=True, **models.score_fn_options(config))


def combined_score(gaussian, network):
    """Gaussian score + NET_WEIGHT x network score: the network's cost on a smooth ODE."""
    return lambda x, t: gaussian(x, t) + NET_WEIGHT * network(x, t)


def run_method(method, sde, score_fn, images, batch_size, scale, args, device):
    """bpd per image, mean NFE per batch and wall seconds for one integrator.

    "dopri5_rms" is dopri5 with scipy's error norm (RMS over the whole state) instead of torchdiffeq's
    default for a tuple state (the max of the RMS norms of x and of delta log p). "METHOD@DIVERGENCE[:N]" uses that
    divergence estimator with N probes (e.g. dopri5@hutchpp:2) instead of --divergence / --n_probes.
    """
    options = {}
    method, _, estimator = method.partition("@")
    divergence, _, n_probes = estimator.partition(":")
    divergence, n_probes = divergence or args.divergence, int(n_probes or (1 if estimator else args.n_probes))
    method, *variables = method.split(":")  # NAME:TIME_VARIABLE[:STATE], e.g. dopri5_rms:log_sigma:x_over_alpha
    if variables:
        options.update(time_variable=variables[0], state=variables[1] if len(variables) > 1 else "x")
    if method.endswith("_rms"):
        method, options = method[:-4], {**options, "options": {"norm": joint_rms_norm}}
    generator = torch.Generator(device=device).manual_seed(args.seed)
    bpds, nfes = [], []
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for lo in range(0, images.shape[0], batch_size):
        batch = torch.from_numpy(images[lo:lo + batch_size]).to(device)
        bpd, nfe = bits_per_dim(sde, score_fn, batch, data_scale=scale, generator=generator, method=method,
                                rtol=args.tol, atol=args.tol, divergence=divergence, n_probes=n_probes, eps=args.eps,
                                **options)
        bpds.append(bpd.cpu())
        nfes.append(nfe)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return torch.cat(bpds), float(np.mean(nfes)), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="digits", choices=["digits", "cifar10"])
    parser.add_argument("--score", default="gaussian", choices=["gaussian", "ddpmpp", "run"])
    parser.add_argument("--workdir", default="", help="with --score run: the trained run to evaluate")
    parser.add_argument("--sde", default="vp", choices=list(SDES))
    parser.add_argument("--net_config", default="", help="with --score ddpmpp: take the network of this named "
                        "config (random weights), e.g. ssde_vp_cifar10_ddpmpp_continuous; default a small DDPM++")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--methods", default="dopri5,dopri5_rms,scipy_rk45",
                        help="comma-separated: torchdiffeq methods, NAME_rms (scipy's error norm), scipy_rk45; "
                        "NAME:log_sigma[:x_over_alpha] integrates in s = log(sigma/alpha) [and the state x/alpha]; "
                        "NAME@DIVERGENCE[:N] overrides the divergence estimator (e.g. dopri5@hutchpp:2)")
    parser.add_argument("--tol", type=float, default=1e-5, help="rtol = atol for both paths")
    parser.add_argument("--eps", type=float, default=1e-5)
    parser.add_argument("--divergence", default="hutchinson_rademacher")
    parser.add_argument("--n_probes", type=int, default=1, help="probes (Hutch++: sketch size k, 3k VJPs)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per method (best is reported)")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images = load_images(args.data, args.num_images)
    sde, scale = SDES[args.sde](), (2.0, -1.0)
    score_fn, mixture = gaussian_score(images, sde, scale)
    if args.score == "ddpmpp":
        score_fn = combined_score(score_fn, ddpmpp_score(images, args.sde, device, net_config=args.net_config))
    elif args.score == "run":
        from data.transforms import data_scale
        from evaluation import load_run

        run = load_run(args.workdir, device)
        sde, score_fn, scale = run.sde, run.score_fn, data_scale(run.config)

    results = {"command": " ".join(["python"] + sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
                          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
               "threads": args.threads, "data": args.data, "score": args.score, "sde": args.sde,
               "num_images": int(images.shape[0]), "dims": int(images[0].size), "tol": args.tol,
               "divergence": args.divergence, "n_probes": args.n_probes, "methods": {}}
    per_image, nfes, times = {}, {}, {}
    methods = args.methods.split(",")
    for method in methods:  # warm-up on one full batch (first-call allocations, autograd set-up), not timed
        run_method(method, sde, score_fn, images[:args.batch_size], args.batch_size, scale, args, device)
    for _ in range(args.repeats):  # interleaved repeats; the fastest one counts (shared machines are noisy)
        for method in methods:
            per_image[method], nfes[method], seconds = run_method(method, sde, score_fn, images, args.batch_size,
                                                                  scale, args, device)  # same in every repeat
            times.setdefault(method, []).append(seconds)
    for method in methods:
        mean, stderr = mean_and_stderr(per_image[method])
        seconds = min(times[method])
        results["methods"][method] = {"bits_per_dim": mean, "stderr": stderr, "mean_nfe_per_batch": nfes[method],
                                      "seconds": seconds, "all_seconds": times[method],
                                      "images_per_s": images.shape[0] / seconds}
        print(f"{method:>18}: {mean:.4f} ± {stderr:.4f} bits/dim, NFE {nfes[method]:.0f}/batch, "
              f"{images.shape[0] / seconds:.2f} images/s ({seconds:.2f} s, best of {args.repeats})", flush=True)
    for other in methods[1:]:
        diff = (per_image[methods[0]] - per_image[other]).abs().max().item()
        rms = (per_image[methods[0]] - per_image[other]).pow(2).mean().sqrt().item()
        results[f"max_abs_bpd_difference_{methods[0]}_vs_{other}"] = diff
        results[f"rms_bpd_difference_{methods[0]}_vs_{other}"] = rms
        print(f"per-image |bpd difference| between {methods[0]} and {other}: largest {diff:.2e}, RMS {rms:.2e}")
    if args.score == "gaussian":
        # The exact bpd of the same dequantized images (same generator draws the same u first).
        generator = torch.Generator(device=device).manual_seed(args.seed)
        exact = []
        for lo in range(0, images.shape[0], args.batch_size):
            batch = torch.from_numpy(images[lo:lo + args.batch_size]).to(device)
            u = torch.rand(batch.shape, generator=generator, device=device, dtype=torch.float32)
            y = (scale[0] * (batch.float() + u) / 256 + scale[1]).reshape(batch.shape[0], -1)
            logp = mixture.marginal_log_prob(y.double().cpu(), args.eps, sde)
            exact.append(-logp / (y.shape[1] * math.log(2)) + 8 - math.log2(scale[0]))
            # keep the generator in step with the probe draws of bits_per_dim (--divergence, --n_probes)
            draw_probes(y.reshape(batch.shape), args.divergence, args.n_probes, generator)
        mean, stderr = mean_and_stderr(torch.cat(exact))
        results["exact_bits_per_dim"] = mean
        print(f"exact (closed-form density at eps): {mean:.4f} ± {stderr:.4f} bits/dim")
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
