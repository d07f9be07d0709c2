"""Training, sampling and likelihood throughput of the CIFAR-10 configs, with FLOPs and model FLOP utilisation.

Training: images/s of the real train step (`training.trainer.TrainStep`: data batch from a device-resident
uint8 image stream, DSM loss, backward, clipping, AdamW, EMA) in float32 and bf16 autocast, eager and
torch.compile; model FLOPs per image counted with `torch.utils.flop_counter.FlopCounterMode` on that same
step (forward + backward; float32 rows run with PyTorch's defaults, i.e. cuDNN convolutions may use TF32
on Ampere and later GPUs, exactly as `main.py --mode train` with training.bf16=False does); MFU = FLOPs/image x images/s / (dense bf16 matmul rate measured in this run).
Sampling: score evaluations/s of the bare network and of the Euler-Maruyama and PF-ODE (euler) fixed-step
samplers at one batch, and the solver overhead = solver time / (NFE x network time) - 1 (eager, and with
CUDA-graph replay on CUDA). Likelihood: images/s of bits/dim (PF-ODE, dopri5, rtol = atol = 1e-5, float32).

Weights are freshly initialised: training and fixed-step sampling throughput do not depend on them. The
adaptive likelihood solver's NFE does, so its score field is the exact score of Gaussian data plus a small
multiple of the network (`network_cost_gaussian_score`: full network cost, smooth field); its score
evaluations/s carry over to a trained model (images/s = evaluations/s / that model's NFE per image).
Data are random uint8 images (no data set needed).

    python benchmarks/throughput.py --device cuda --out throughput_h100.json          # full run (GPU)
    python benchmarks/throughput.py --quick --device cpu --out throughput_cpu.json    # CPU smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import configs  # noqa: E402
import models  # noqa: E402
from atomic_io import write_json  # noqa: E402
from data.loaders import ImageStream  # noqa: E402
from data.transforms import data_scale, get_data_scaler  # noqa: E402
from errors import UserError  # noqa: E402
from sde_lib import batch_time, broadcast_to, get_sde  # noqa: E402
from training.device import strict_float32  # noqa: E402

# --quick: a small U-Net of the same family (same blocks, attention at 16x16) and small batches
QUICK_MODEL = {"model.nf": 16, "model.ch_mult": (1, 2), "model.num_res_blocks": 1}
QUICK = dict(batch_sizes="4", steps=2, warmup=1, sample_batch=8, sample_nfe=4, likelihood_batch=2,
             matmul_size=512, compile="off")


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (timing boundaries only; never inside a measured loop)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 1, rounds: int = 1) -> float:
    """Seconds per call of fn() over `repeats` calls, synchronised at the boundaries only; the fastest of
    `rounds` such loops (a shared machine only ever adds time)."""
    best = float("inf")
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype = torch.bfloat16, repeats: int = 10,
                rounds: int = 5) -> float:
    """Measured dense matmul rate (FLOP/s) of an n x n x n product in `dtype` on `device`: the median over
    `rounds` timings of `repeats` products each (one lucky or one disturbed round does not set the MFU reference)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    seconds = statistics.median(timed(lambda: a @ b, device, repeats) for _ in range(rounds))
    return 2.0 * n ** 3 / seconds


def bench_config(name: str, overrides: list[str], device: torch.device, batch_size: int):
    """The named config with overrides, batch size and device applied."""
    config = configs.get_config(name)
    configs.apply_overrides(config, overrides)
    config.device = str(device)
    config.training.batch_size = int(batch_size)
    config.training.plot_samples = 0
    config.training.progress = False
    return config


def random_image_stream(config, batch_size: int, device: torch.device, num_images: int = 4096) -> ImageStream:
    """A device-resident uint8 stream of random CIFAR-shaped images with the config's dequantization/flips."""
    generator = torch.Generator().manual_seed(0)
    shape = (num_images, int(config.data.num_channels), int(config.data.image_size), int(config.data.image_size))
    images = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    channels_last = device.type == "cuda"
    return ImageStream(images, batch_size, int(config.seed), device=device,
                       dequantize=bool(config.data.uniform_dequantization), flip=bool(config.data.random_flip),
                       scaler=get_data_scaler(config), keep_on_device=True, channels_last=channels_last)


def train_flops_per_image(config, device: torch.device, batch: int = 2) -> tuple[float, float]:
    """(train step FLOPs, network forward FLOPs) per image, counted on the real step in float32 eager."""
    from training.trainer import new_train_step

    config = config.copy_and_resolve_references()
    config.training.batch_size = batch
    config.training.compile = False
    step = new_train_step(config, random_image_stream(config, batch, device, num_images=batch), device)
    with FlopCounterMode(display=False) as counter:
        step(0)
    train = counter.get_total_flops() / batch
    model = step.state.model
    x = torch.randn(batch, *step.stream.images.shape[1:], device=device)
    t = torch.full((batch,), 0.5, device=device)
    score_fn = models.get_score_fn(get_sde(config), model, continuous=bool(config.training.continuous),
                                   **models.score_fn_options(config))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        score_fn(x, t)
    return train, counter.get_total_flops() / batch


def bench_training(config, device: torch.device, precision: str, compiled: bool, steps: int, warmup: int) -> dict:
    """Images/s of the real train step at config.training.batch_size."""
    from training.trainer import new_train_step

    config = config.copy_and_resolve_references()
    config.training.compile = compiled
    config.training.bf16 = precision == "bf16"
    batch = int(config.training.batch_size)
    dtype = torch.bfloat16 if precision == "bf16" else None
    step = new_train_step(config, random_image_stream(config, batch, device), device, autocast_dtype=dtype)
    for i in range(warmup):
        step(i)
    losses = []
    seconds = timed(lambda: losses.append(step(warmup + len(losses))[0]), device, steps)
    loss = float(torch.stack(losses).float().mean())
    del step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"seconds_per_step": seconds, "images_per_s": batch / seconds, "loss": loss}


def bench_sampling(config, device: torch.device, batch: int, nfe: int, accel: dict) -> dict:
    """Score evaluations/s of the bare network and of EM / PF-ODE euler, and their overhead."""
    import solvers
    from solvers.accel import accelerate_score_fn

    torch.manual_seed(int(config.seed))
    model = models.create_model(config).to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    sde = get_sde(config)
    score_fn = models.get_score_fn(sde, model, continuous=bool(config.training.continuous),
                                   **models.score_fn_options(config))
    shape = (batch, int(config.data.num_channels), int(config.data.image_size), int(config.data.image_size))
    out = {}
    with torch.no_grad():
        x = sde.prior_sampling(shape, generator=torch.Generator(device=device).manual_seed(0), device=device)
        t = torch.full((batch,), 0.5, device=device)
        net = accelerate_score_fn(score_fn, **accel)  # one wrapper: one capture serves the network and the solvers
        for _ in range(2):
            net(x, t)
        per_eval = timed(lambda: net(x, t), device, nfe, rounds=3)
        out["network"] = {"evals_per_s": batch / per_eval, "seconds_per_eval": per_eval}
        for solver in ("em", "ode_euler"):
            generator = torch.Generator(device=device)

            used = []

            def run():
                generator.manual_seed(1)
                used.append(solvers.sample(sde, net, shape, solver=solver, nfe=nfe, generator=generator)[1])

            run()  # warm-up (captures the CUDA graph when asked)
            seconds = timed(run, device, rounds=3)
            used = used[-1]
            out[solver] = {"evals_per_s": used * batch / seconds, "seconds": seconds, "nfe": used,
                           "overhead": seconds / (used * per_eval) - 1.0}
    return out


def network_cost_gaussian_score(sde, net_score_fn, data_std: float = 0.5, weight: float = 1e-3):
    """Exact score of N(0, data_std^2 I) data plus `weight` x the network's score.

    A randomly initialised network gives a stiff PF-ODE (its score does not vanish as std(t) -> 0), so the
    adaptive solver's NFE would be meaningless; this field is smooth like a trained model's, while every
    evaluation (and every divergence VJP) still runs the full network forward and backward.
    """
    def score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = batch_time(t, x)
        var = sde.mean_coeff(t) ** 2 * data_std ** 2 + sde.marginal_std(t) ** 2
        return -x / broadcast_to(var, x) + weight * net_score_fn(x, t)
    return score_fn


def bench_likelihood(config, device: torch.device, batch: int, tol: float, scipy: bool) -> dict:
    """Images/s of bits/dim (PF-ODE dopri5 at rtol = atol = tol, float32), optionally vs the scipy RK45 path."""
    import likelihood

    torch.manual_seed(int(config.seed))
    model = models.create_model(config).to(device).eval()
    sde = get_sde(config)
    score_fn = network_cost_gaussian_score(
        sde, models.get_score_fn(sde, model, continuous=bool(config.training.continuous),
                                 **models.score_fn_options(config)))
    shape = (batch, int(config.data.num_channels), int(config.data.image_size), int(config.data.image_size))
    images = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8).to(device)
    out = {}
    # "default": log_likelihood's defaults (dopri5, the per-dimension error norm); "dopri5_max_rms": the old
    # default (torchdiffeq's norm, max over x and the log-density); "dopri5_rms": scipy's norm (RMS over the
    # joint state), the step control of the RK45 reference
    methods = {"default": {"method": "dopri5"}, "dopri5_max_rms": {"method": "dopri5", "error_norm": "max_rms"},
               "dopri5_rms": {"method": "dopri5", "error_norm": "joint_rms"}}
    if scipy:
        methods["scipy_rk45"] = {"method": "scipy_rk45"}
    # one untimed pass first (loose tolerance, few evaluations): the first timed method no longer pays the
    # one-time costs (kernel selection, allocator growth, lazy imports) the others do not (once: 1.7 s vs 0.75 s)
    with strict_float32():
        likelihood.bits_per_dim(sde, score_fn, images, data_scale=data_scale(config), rtol=1e-2, atol=1e-2,
                                eps=float(config.likelihood.eps), divergence=str(config.likelihood.divergence),
                                generator=torch.Generator(device=device).manual_seed(0))
    for label, options in methods.items():
        result = {}

        def run():
            generator = torch.Generator(device=device).manual_seed(0)
            result["bpd"], result["nfe"] = likelihood.bits_per_dim(
                sde, score_fn, images, data_scale=data_scale(config), generator=generator,
                rtol=tol, atol=tol, eps=float(config.likelihood.eps),
                divergence=str(config.likelihood.divergence), **options)

        with strict_float32():
            seconds = timed(run, device)
        out[label] = {"images_per_s": batch / seconds, "seconds": seconds, "nfe": int(result["nfe"]),
                       "evals_per_s": batch * int(result["nfe"]) / seconds, "bpd": float(result["bpd"].mean())}
    if scipy:
        out["speedup_vs_scipy"] = {label: out[label]["images_per_s"] / out["scipy_rk45"]["images_per_s"]
                                   for label in methods if label != "scipy_rk45"}
    return out


def _csv(text: str, cast=str) -> list:
    return [cast(v) for v in str(text).split(",") if v.strip()]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="vp_cifar,ve_cifar")
    parser.add_argument("--batch_sizes", default=None, help="training batch sizes (default 128,512)")
    parser.add_argument("--precisions", default="float32,bf16")
    parser.add_argument("--compile", default=None, help="off,on (default both; --quick: off)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5)")
    parser.add_argument("--sample_batch", type=int, default=None, help="sampling batch (default 1024)")
    parser.add_argument("--sample_nfe", type=int, default=None, help="fixed steps timed per sampler (default 50)")
    parser.add_argument("--likelihood_batch", type=int, default=None, help="likelihood batch (default 128)")
    parser.add_argument("--likelihood_tol", type=float, default=1e-5, help="rtol = atol of the PF-ODE")
    parser.add_argument("--likelihood_scipy", action="store_true", help="also time the scipy RK45 reference")
    parser.add_argument("--matmul_size", type=int, default=None, help="n of the n^3 bf16 matmul (default 8192)")
    parser.add_argument("--parts", default="train,sample,likelihood")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny networks and batches (CPU smoke run)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: one thread on a CPU device, said so; left as is for CUDA)")
    parser.add_argument("--out", default=None, help="report JSON (default: throughput_<UTC time>.json here; "
                        "an existing file is never replaced)")
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    defaults = dict(batch_sizes="128,512", steps=20, warmup=5, sample_batch=1024, sample_nfe=50,
                    likelihood_batch=128, matmul_size=8192, compile="off,on")
    if args.quick:
        defaults.update(QUICK)
        overrides = [f"{k}={v}" for k, v in QUICK_MODEL.items()] + overrides
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.overrides = overrides
    return args


PARTS, PRECISIONS = ("train", "sample", "likelihood"), ("float32", "bf16")


def check_args(args) -> None:
    """Validate the arguments before any measurement (one-line UserError)."""
    for key, valid in (("parts", PARTS), ("precisions", PRECISIONS), ("compile", ("off", "on"))):
        values = _csv(getattr(args, key))
        bad = [v for v in values if v not in valid]
        if not values or bad:
            raise UserError(f"--{key} takes comma-separated names of {', '.join(valid)}, got {getattr(args, key)!r}")
    try:
        batches = _csv(args.batch_sizes, int)
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise UserError(f"--batch_sizes takes comma-separated positive integers, got {args.batch_sizes!r}")
    for key in ("steps", "sample_batch", "sample_nfe", "likelihood_batch", "matmul_size"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key} must be a positive integer, got {getattr(args, key)}")
    if args.warmup < 0 or not args.likelihood_tol > 0:
        raise UserError(f"--warmup must be >= 0 and --likelihood_tol > 0, got {args.warmup}, {args.likelihood_tol}")
    try:
        device = torch.device(args.device) if args.device != "auto" else None
    except RuntimeError:
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}") from None
    if device is not None and device.type not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    if args.out is None:
        args.out = time.strftime("throughput_%Y%m%dT%H%M%SZ.json", time.gmtime())
    if os.path.exists(args.out):
        raise UserError(f"{args.out} exists (an earlier report); choose another --out")


def _format_overrides(overrides: list[str]) -> list[str]:
    return [o.replace(" ", "") for o in overrides]


def run(args) -> dict:
    """All measurements of `args`; returns the JSON-ready report."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu":
        # Several threads on a small, busy CPU fight the other jobs (2 threads on a loaded 2-core VM: 0.5 img/s
        # instead of 44.5); one thread is the reproducible default, --threads N asks for more.
        torch.set_num_threads(1)
        print("throughput: CPU device, using 1 torch thread (--threads N for more)", flush=True)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda but CUDA is not available")
    parts = set(_csv(args.parts))
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "quick": bool(args.quick), "overrides": _format_overrides(args.overrides),
              "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:]),
              "bf16_matmul_flops": matmul_rate(device, args.matmul_size),
              "float32_matmul_flops": matmul_rate(device, args.matmul_size, torch.float32),
              "training": [], "sampling": {}, "likelihood": {}}
    # MFU is against the dense bf16 rate; CPUs without bf16 matrix units run float32 faster, and the
    # faster of the two is then the honest ceiling.
    peak = report["bf16_matmul_flops"] if device.type == "cuda" else max(report["bf16_matmul_flops"],
                                                                           report["float32_matmul_flops"])
    report["mfu_reference_flops"] = peak
    for name in _csv(args.configs):
        base = bench_config(name, args.overrides, device, 1)
        if "train" in parts:
            train_flops, fwd_flops = train_flops_per_image(base, device)
            report.setdefault("flops_per_image", {})[name] = {"train_step": train_flops, "forward": fwd_flops}
            for batch in _csv(args.batch_sizes, int):
                config = bench_config(name, args.overrides, device, batch)
                for precision in _csv(args.precisions):
                    for compiled in (c == "on" for c in _csv(args.compile)):
                        row = {"config": name, "batch": batch, "precision": precision, "compile": compiled}
                        try:
                            row.update(bench_training(config, device, precision, compiled, args.steps, args.warmup))
                        except torch.cuda.OutOfMemoryError:
                            torch.cuda.empty_cache()
                            print(f"  train {name} bs {batch} {precision}: out of memory", flush=True)
                            row.update(images_per_s=float("nan"), error="out of memory")
                        row["mfu"] = train_flops * row["images_per_s"] / peak
                        report["training"].append(row)
                        print(_train_line(row), flush=True)
        if "sample" in parts:
            variants = {"eager": {}}
            if device.type == "cuda":
                variants["cuda_graph"] = {"cuda_graph": True}
            report["sampling"][name] = {
                label: bench_sampling(base, device, args.sample_batch, args.sample_nfe, accel)
                for label, accel in variants.items()}
        if "likelihood" in parts:
            report["likelihood"][name] = bench_likelihood(base, device, args.likelihood_batch, args.likelihood_tol,
                                                          args.likelihood_scipy)
    report["likelihood_settings"] = {"batch": args.likelihood_batch, "rtol": args.likelihood_tol,
                                     "atol": args.likelihood_tol, "method": "dopri5", "dtype": "float32"}
    report["sampling_settings"] = {"batch": args.sample_batch, "nfe": args.sample_nfe, "dtype": "float32"}
    return report


def _train_line(row: dict) -> str:
    return (f"  train {row['config']:9s} bs {row['batch']:4d} {row['precision']:7s} "
            f"{'compile' if row['compile'] else 'eager':7s} {row['images_per_s']:9.1f} img/s  MFU {row['mfu']:.1%}")


def _markdown(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """A titled Markdown table as lines (nothing when there are no rows)."""
    if not rows:
        return []
    lines = [title, ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def format_table(report: dict) -> str:
    """The report as Markdown tables."""
    lines = [f"device: {report['device']}, torch {report['torch']}, {report['date']}",
             f"dense matmul: bf16 {report['bf16_matmul_flops'] / 1e12:.3f} TFLOP/s, float32 "
             f"{report['float32_matmul_flops'] / 1e12:.3f} TFLOP/s; MFU against "
             f"{report['mfu_reference_flops'] / 1e12:.3f} TFLOP/s", ""]
    lines += _markdown("", ["config", "batch", "precision", "compile", "images/s", "train GFLOP/img", "MFU"], [
        [row["config"], str(row["batch"]), row["precision"], "yes" if row["compile"] else "no",
         f"{row['images_per_s']:.1f}", f"{report['flops_per_image'][row['config']]['train_step'] / 1e9:.2f}",
         f"{row['mfu']:.1%}"] for row in report["training"]])
    s = report["sampling_settings"]
    lines += _markdown(
        f"sampling (batch {s['batch']}, {s['nfe']} steps, float32):",
        ["config", "variant", "network evals/s", "EM evals/s", "EM overhead", "PF-ODE evals/s", "PF-ODE overhead"],
        [[name, label, f"{r['network']['evals_per_s']:.1f}", f"{r['em']['evals_per_s']:.1f}",
          f"{r['em']['overhead']:+.1%}", f"{r['ode_euler']['evals_per_s']:.1f}", f"{r['ode_euler']['overhead']:+.1%}"]
         for name, variants in report["sampling"].items() for label, r in variants.items()])
    s = report["likelihood_settings"]
    lines += _markdown(
        f"likelihood (bits/dim, batch {s['batch']}, rtol = atol = {s['rtol']:g}, float32):",
        ["config", "method", "images/s", "NFE", "score evals/s", "bits/dim"],
        [[name, method, f"{r['images_per_s']:.3f}", str(r["nfe"]), f"{r['evals_per_s']:.1f}", f"{r['bpd']:.4f}"]
         for name, methods in report["likelihood"].items() for method, r in methods.items() if method != "speedup_vs_scipy"])
    speedups = [f"{name} {label} {ratio:.2f}x" for name, m in report["likelihood"].items()
                for label, ratio in m.get("speedup_vs_scipy", {}).items()]
    if speedups:
        lines.append("likelihood images/s relative to scipy RK45 (same images, probes, tolerance): "
                     + ", ".join(speedups))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        check_args(args)
        report = run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.out:
        write_json(args.out, report, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
