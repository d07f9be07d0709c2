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
            (over 1,500 NFE for one batch of digits at tol 1e-5), unlike a trained one.

  run       a trained run's EMA network (`--run WORKDIR`, e.g. the README's vp_digits run).

With --reference_tol (e.g. 1e-7) every method is also compared with a dopri5 reference at that tolerance on the
same images and probes: the report gives |mean bpd - reference| and the largest per-image difference.
A method is NAME[_rms|_pd][:TIME_VARIABLE[:STATE]][@RTOL[/ATOL]] (tolerances default to --tol; _rms: scipy's
error norm, _pd: the per-dimension norm, neither: torchdiffeq's; "default" = log_likelihood's defaults), optionally
followed by +DIVERGENCE[:N] (e.g. default+hutchpp:2; else --divergence with --n_probes). The per-image bits/dim of
every method are compared with the first one's (largest and RMS difference): put an exact-divergence method first
(e.g. default+exact) to measure the estimators' per-image error, on one batch (--num_images = --batch_size) so that
every method sees the same dequantization.

Examples:
  python scripts/bench_likelihood.py --data digits --score gaussian --num_images 64 --batch_size 64
  python scripts/bench_likelihood.py --data digits --score run --run runs/digits --dtype float64 \
      --reference_tol 1e-7 --methods scipy_rk45@1e-5,dopri5@1e-5,default
  python scripts/bench_likelihood.py --data digits --score ddpmpp --num_images 32 --batch_size 32 \
      --methods default+hutchinson_rademacher,default+hutchpp:1,default+hutchpp:2
  python scripts/bench_likelihood.py --data cifar10 --score ddpmpp --net_config ssde_vp_cifar10_ddpmpp_continuous \
      --device cuda --num_images 500 --batch_size 250 --repeats 1
"""
from __future__ import annotations

import argparse
import datetime
import json
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
from errors import UserError  # noqa: E402
from likelihood import bits_per_dim, mean_and_stderr  # noqa: E402
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


def ddpmpp_score(images: np.ndarray, sde_name: str, device, init_scale: float = 0.1, net_config: str = "",
                 dtype: torch.dtype = torch.float32):
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
    model = models.create_model(config).to(device=device, dtype=dtype).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return models.get_score_fn(get_sde(config), model, continuous=True, **models.score_fn_options(config))


def run_score(workdir: str, device, dtype):
    """(sde, score_fn, data scale) of a trained run's EMA network, in `dtype`."""
    from data.transforms import data_scale
    from evaluation import load_run

    run = load_run(workdir, device=device)
    run.model.to(dtype)
    return run.sde, run.score_fn, tuple(data_scale(run.config))


def combined_score(gaussian, network):
    """Gaussian score + NET_WEIGHT x network score: the network's cost on a smooth ODE."""
    return lambda x, t: gaussian(x, t) + NET_WEIGHT * network(x, t)


def run_method(method, sde, score_fn, images, batch_size, scale, args, device):
    """bpd per image, mean NFE per batch and wall seconds for one integrator.

    "dopri5_rms" is dopri5 with scipy's error norm (RMS over the whole state) instead of torchdiffeq's
    default for a tuple state (the max of the RMS norms of x and of delta log p). A suffix "+DIVERGENCE[:N]" uses
    that divergence estimator with N probes (e.g. default+hutchpp:2) instead of --divergence / --n_probes.
    """
    method, _, estimator = method.partition("+")
    divergence, _, n_probes = estimator.partition(":")
    options = {"divergence": divergence or args.divergence,
               "n_probes": int(n_probes or (1 if estimator else args.n_probes))}
    if method == "default":  # log_likelihood's own defaults (method, tolerances, variable, state)
        return _run_batches(sde, score_fn, images, batch_size, scale, args, device, options)
    method, _, tolerances = method.partition("@")
    rtol, _, atol = tolerances.partition("/")
    options.update(rtol=float(rtol or args.tol), atol=float(atol or rtol or args.tol))
    method, *variables = method.split(":")  # NAME:TIME_VARIABLE[:STATE], e.g. dopri5_rms:log_sigma:x_over_alpha
    if variables:
        options.update(time_variable=variables[0], state=variables[1] if len(variables) > 1 else "x")
    if method.endswith("_rms"):
        method, options = method[:-4], {**options, "error_norm": "joint_rms"}
    elif method.endswith("_pd"):
        method, options = method[:-3], {**options, "error_norm": "per_dim"}
    elif method != "scipy_rk45":
        options["error_norm"] = "max_rms"  # torchdiffeq's norm: the old default
    return _run_batches(sde, score_fn, images, batch_size, scale, args, device, {**options, "method": method})


def _run_batches(sde, score_fn, images, batch_size, scale, args, device, options):
    """bpd per image, mean NFE per batch and wall seconds of bits_per_dim with these likelihood options."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    bpds, nfes = [], []
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for lo in range(0, images.shape[0], batch_size):
        batch = torch.from_numpy(images[lo:lo + batch_size]).to(device)
        bpd, nfe = bits_per_dim(sde, score_fn, batch, data_scale=scale, generator=generator, dtype=args.torch_dtype,
                                eps=args.eps, **options)
        bpds.append(bpd.cpu())
        nfes.append(nfe)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return torch.cat(bpds), float(np.mean(nfes)), time.perf_counter() - start


REFERENCE_KEYS = ("data", "score", "sde", "num_images", "dims", "divergence", "n_probes", "seed", "dtype", "eps",
                  "run", "net_config")


def read_reference(path: str) -> dict:
    """An earlier result of this script that holds a "reference" (one-line UserError otherwise)."""
    try:
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
        reference = saved["reference"]
        count = len(reference["bpd_per_image"])
        float(reference["tol"]), float(reference["mean_nfe_per_batch"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"--reference_from {path}: not a result of this script with a reference "
                        f"({type(error).__name__}: {error})") from None
    if saved.get("num_images") not in (None, count):
        raise UserError(f"--reference_from {path}: {count} per-image values for {saved.get('num_images')} images")
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="digits", choices=["digits", "cifar10"])
    parser.add_argument("--score", default="gaussian", choices=["gaussian", "ddpmpp", "run"])
    parser.add_argument("--run", default="", help="with --score run: the trained run's folder (its EMA weights)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                        help="precision of the images, the ODE and (float64) the network")
    parser.add_argument("--reference_tol", type=float, default=0.0,
                        help="also integrate with dopri5 at this rtol = atol (e.g. 1e-7) and compare every method")
    parser.add_argument("--reference_from", default="",
                        help="take the reference per-image bpd from this earlier --out JSON (same images, seed, dtype)")
    parser.add_argument("--sde", default="vp", choices=list(SDES))
    parser.add_argument("--net_config", default="", help="with --score ddpmpp: take the network of this named "
                        "config (random weights), e.g. ssde_vp_cifar10_ddpmpp_continuous; default a small DDPM++")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--methods", default="dopri5,dopri5_rms,scipy_rk45",
                        help="comma-separated: torchdiffeq methods, NAME_rms (scipy's error norm), scipy_rk45; "
                        "NAME:log_sigma[:x_over_alpha] integrates in s = log(sigma/alpha) [and the state x/alpha]")
    parser.add_argument("--tol", type=float, default=1e-5, help="rtol = atol for both paths")
    parser.add_argument("--eps", type=float, default=1e-5)
    parser.add_argument("--divergence", default="hutchinson_rademacher")
    parser.add_argument("--n_probes", type=int, default=1, help="probes (Hutch++: sketch size k, 3k VJPs)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per method (best is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="1: one untimed warm-up batch per method first")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()
    for key in ("num_images", "batch_size", "repeats", "threads", "n_probes"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key} must be a positive integer, got {getattr(args, key)}")
    if args.out and os.path.exists(args.out):
        raise UserError(f"{args.out} exists (an earlier result); choose another --out")
    saved = read_reference(args.reference_from) if args.reference_from else None

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.torch_dtype = getattr(torch, args.dtype)
    images = load_images(args.data, args.num_images)
    sde, scale = SDES[args.sde](), (2.0, -1.0)
    score_fn, mixture = gaussian_score(images, sde, scale)
    if args.score == "ddpmpp":
        score_fn = combined_score(score_fn, ddpmpp_score(images, args.sde, device, net_config=args.net_config,
                                                             dtype=args.torch_dtype))
    elif args.score == "run":
        sde, score_fn, scale = run_score(args.run, device, args.torch_dtype)
        args.sde = type(sde).__name__  # the run's own SDE (once: recorded as --sde's default "vp")

    results = {"command": " ".join(["python"] + sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
                          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
               "threads": args.threads, "data": args.data, "score": args.score, "sde": args.sde,
               "num_images": int(images.shape[0]), "dims": int(images[0].size), "tol": args.tol,
               "divergence": args.divergence, "n_probes": args.n_probes, "seed": args.seed, "dtype": args.dtype,
               "eps": args.eps, "run": args.run, "net_config": args.net_config, "methods": {}}
    if saved is not None:  # the reference must be of the same images, score, probes and precision
        differ = [f"{key} {saved[key]!r} there, {results[key]!r} here" for key in REFERENCE_KEYS
                  if key in saved and saved[key] != results[key]]
        if differ:
            raise UserError(f"--reference_from {args.reference_from} was computed with other settings: "
                            + "; ".join(differ))
    per_image, nfes, times = {}, {}, {}
    methods = args.methods.split(",")
    for method in methods if args.warmup else ():  # warm-up on one batch (first-call allocations), not timed
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
        print(f"{method:>11}: {mean:.4f} ± {stderr:.4f} bits/dim, NFE {nfes[method]:.0f}/batch, "
              f"{images.shape[0] / seconds:.2f} images/s ({seconds:.2f} s, best of {args.repeats})", flush=True)
    for method in methods:
        results["methods"][method]["bpd_per_image"] = per_image[method].tolist()
    if args.reference_from:
        results["reference"] = saved["reference"]
        reference = torch.tensor(results["reference"]["bpd_per_image"], dtype=torch.float64)
        args.reference_tol = results["reference"]["tol"]
    elif args.reference_tol > 0:
        reference, ref_nfe, _ = run_method(f"dopri5@{args.reference_tol}", sde, score_fn, images, args.batch_size,
                                           scale, args, device)
        results["reference"] = {"tol": args.reference_tol, "bits_per_dim": float(reference.mean()),
                                "mean_nfe_per_batch": ref_nfe, "bpd_per_image": reference.tolist()}
    if args.reference_tol > 0:
        ref_nfe = results["reference"]["mean_nfe_per_batch"]
        print(f"reference dopri5 at rtol = atol = {args.reference_tol:g}: {float(reference.mean()):.5f} bits/dim, "
              f"NFE {ref_nfe:.0f}/batch")
        for method in methods:
            mean_diff = abs(float(per_image[method].double().mean() - reference.double().mean()))
            max_diff = float((per_image[method].double() - reference.double()).abs().max())
            results["methods"][method].update(reference_mean_bpd_difference=mean_diff,
                                              reference_max_image_bpd_difference=max_diff)
            print(f"{method:>11}: |mean bpd - reference| {mean_diff:.1e}, largest per-image {max_diff:.1e}, "
                  f"NFE {nfes[method]:.0f}/batch")
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
            u = torch.rand(batch.shape, generator=generator, device=device, dtype=args.torch_dtype)
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
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
