"""Sample quality against NFE for every solver, on an exact analytic target or a trained checkpoint.

    python scripts/compare_solvers.py                       # mix64 under the VP SDE, exact score
    python scripts/compare_solvers.py --target ring2d --sde ve
    python scripts/compare_solvers.py --config vp_toy --workdir runs/vp_toy   # a trained model
    python scripts/compare_solvers.py --workdir runs/digits --nfe 20,50 --num_samples 500   # images: FID/KID/IS

Fixed-step solvers get each NFE budget; adaptive ones (those taking `rtol`) get a sweep of tolerances and
report the NFE they used. Quality: sliced Wasserstein-2 distance to exact samples (its noise floor is the
distance between two exact sample sets of the same size), mode-weight TV error and mean log-density gap
E_true[log p] - E_samples[log p] (mixtures only). Image checkpoints: FID, KID and Inception Score with the
standard FID Inception against the reference statistics of --split (evaluation/image_eval.py); the floor is
the same metrics of --num_samples data images of that split. Without the Inception weights an image run stops
with the line saying how to get them (bits/dim: main.py --mode likelihood). Writes CSV, markdown and a PNG
plot to --out.
"""
from __future__ import annotations

import argparse
import csv
import inspect
import io
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from atomic_io import save_figure, write_text  # noqa: E402
from errors import UserError  # noqa: E402
from evaluation.metrics import mixture_report  # noqa: E402
from solvers import SAMPLERS, available_solvers, sample  # noqa: E402

DEFAULT_BUDGETS = (10, 20, 50, 100, 250, 1000)
# Adaptive solvers: tolerance settings instead of budgets (rtol = atol for the ODE solvers; rtol for `adaptive`).
TOLERANCES = {"ode": (1e-2, 1e-3, 1e-4, 1e-5), "ode_scipy": (1e-3, 1e-5), "adaptive": (0.1, 0.05, 0.02, 0.01)}
METRICS = ("sw2", "mode_tv", "logp_gap")
IMAGE_METRICS = ("fid", "kid", "inception_score")
NAMES = {"sw2": "SW-2 to exact samples", "mode_tv": "mode-weight TV", "logp_gap": "mean log-density gap",
         "fid": "FID", "kid": "KID", "inception_score": "Inception Score"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="mix64", help="analytic mixture: ring2d, grid2d or mix64")
    parser.add_argument("--sde", default="vp", choices=("vp", "subvp", "ve"))
    parser.add_argument("--config", default=None, help="with --workdir: the run's config (default: its saved one)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--solvers", default="all", help="comma-separated names, or 'all' (those valid for the SDE)")
    parser.add_argument("--nfe", default=",".join(map(str, DEFAULT_BUDGETS)), help="comma-separated budgets")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default=None, help="images: reference split for FID/KID (default eval.split)")
    parser.add_argument("--inception_weights", default=None, help="images: local Inception weights file "
                        "(default: eval.inception_weights, else torch hub's cache)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="output prefix of the .csv, .md and .png (default: "
                        "WORKDIR/solver_comparison with --workdir, else solver_comparison_TARGET_SDE here)")
    parser.add_argument("--force", action="store_true", help="replace the files of an earlier comparison at --out")
    return parser.parse_args(argv)


def check_args(args) -> list[int]:
    """Validate the arguments before any sampling (one-line UserError); returns the NFE budgets.

    Also fills in the default --out and refuses to replace an earlier comparison's files without --force.
    """
    from validation import check_output_files

    try:
        budgets = [int(b) for b in args.nfe.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--nfe must be comma-separated positive integers, got {args.nfe!r}") from None
    if not budgets or min(budgets) < 1:
        raise UserError(f"--nfe must be comma-separated positive integers, got {args.nfe!r}")
    if args.num_samples < 2:
        raise UserError(f"--num_samples must be at least 2, got {args.num_samples}")
    if args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if args.solvers != "all":
        unknown = [name for name in args.solvers.split(",") if name not in SAMPLERS]
        if unknown:
            raise UserError(f"unknown solver {unknown[0]!r}; valid: {', '.join(available_solvers())}")
    if args.out is None:
        args.out = (os.path.join(args.workdir, "solver_comparison") if args.workdir
                    else f"solver_comparison_{args.target}_{args.sde}")
    outputs = [args.out + ext for ext in (".csv", ".md", ".png")]
    existing = [path for path in outputs if os.path.exists(path)]
    if existing and not args.force:
        raise UserError(f"{existing[0]} exists (an earlier comparison): pass --force to replace it, or another --out")
    check_output_files(outputs)
    return budgets


def check_rows(rows: list[dict]) -> None:
    """At least one setting ran (else there is nothing to tabulate or plot)."""
    if not any(row.get("nfe_used") is not None for row in rows):
        notes = sorted({row["note"] for row in rows if row.get("note")})
        raise UserError("no solver setting ran" + (f": {notes[0]}" if notes else ""))


def analytic_target(name: str, sde_name: str):
    """(mixture, sde, score_fn) for an analytic mixture under the named SDE (VE: sigma_max = 50 for mix64)."""
    from data.mixtures import toy_mixture
    from sde_lib import VESDE, VPSDE, subVPSDE

    try:
        mixture = toy_mixture(name)
    except ValueError as error:
        raise UserError(str(error)) from None
    sde = {"vp": VPSDE(), "subvp": subVPSDE(), "ve": VESDE(0.01, 50.0 if mixture.dim > 2 else 20.0)}[sde_name]
    return mixture, sde, mixture.score_fn(sde)


def settings_for(solver: str, budgets) -> list[tuple[str, int | None, dict]]:
    """(label, nfe, options) runs of one solver: budgets, or tolerances for adaptive solvers."""
    if "rtol" in inspect.signature(SAMPLERS[solver]).parameters and solver in TOLERANCES:
        runs = []
        for tol in TOLERANCES[solver]:
            options = {"rtol": tol} if solver == "adaptive" else {"rtol": tol, "atol": tol}
            runs.append((f"tol={tol:g}", None, options))
        return runs
    return [(f"nfe={b}", b, {}) for b in budgets]


def run_one(sde, score_fn, shape, solver, nfe, options, seed):
    """(samples, nfe_used, seconds) or (None, message, seconds) when the setting is not valid."""
    start = time.time()
    try:
        with torch.no_grad():
            x, used = sample(sde, score_fn, shape, solver=solver, nfe=nfe,
                             generator=torch.Generator().manual_seed(seed), **options)
    except UserError as error:
        return None, str(error), time.time() - start
    return x, int(used), time.time() - start


def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.2e}"


def write_markdown(path: str, rows: list[dict], floor: dict, header: str, budgets, metrics=METRICS) -> None:
    """Pivot tables (solver x budget) per metric, adaptive solvers' rows, and the noise floor."""
    fixed = [r for r in rows if r["setting"].startswith("nfe=")]
    adaptive = [r for r in rows if not r["setting"].startswith("nfe=")]
    solvers = list(dict.fromkeys(r["solver"] for r in fixed if r["nfe_used"] is not None))
    lines = [header, ""]
    names = NAMES
    for metric in metrics:
        if all(r.get(metric) is None for r in rows):
            continue
        noise = f"{'data images' if metric in IMAGE_METRICS else 'noise floor'} {_fmt(floor.get(metric))}"
        if metric == "logp_gap" and "logp_gap_se" in floor:
            noise += f", standard error of the gap from exact samples {_fmt(floor['logp_gap_se'])}"
        lines += [f"#### {names[metric]} ({noise}); cells: value (NFE used)", ""]
        lines.append("| solver | " + " | ".join(str(b) for b in budgets) + " |")
        lines.append("|---|" + "---|" * len(budgets))
        for solver in solvers:
            cells = []
            for b in budgets:
                match = [r for r in fixed if r["solver"] == solver and r["nfe_requested"] == b]
                r = match[0] if match else None
                if r is None or r["nfe_used"] is None:
                    cells.append("n/a")
                else:
                    cells.append(f"{_fmt(r[metric])} ({r['nfe_used']})")
            lines.append(f"| {solver} | " + " | ".join(cells) + " |")
        lines.append("")
    if adaptive:
        lines += ["#### Adaptive solvers (tolerance sweep)", "",
                  "| solver | setting | NFE used | " + " | ".join(names[m] for m in metrics) + " | seconds |",
                  "|---|---|---|" + "---|" * len(metrics) + "---|"]
        for r in adaptive:
            lines.append(f"| {r['solver']} | {r['setting']} | {r['nfe_used']} | "
                         + " | ".join(_fmt(r.get(m)) for m in metrics) + f" | {r['seconds']:.2f} |")
        lines.append("")
    skipped = sorted({(r["solver"], r["note"]) for r in rows if r.get("note")})
    if skipped:
        lines += ["Not run (the solver refused the setting):", ""]
        lines += [f"- {s} ({n})" for s, n in skipped]
        lines.append("")
    write_text(path, "\n".join(lines))


def write_plot(path: str, rows: list[dict], floor: dict, title: str, metrics=METRICS) -> None:
    """Quality against NFE used, one line per solver, noise floors dashed."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if any(r.get(m) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4.4), squeeze=False)
    solvers = list(dict.fromkeys(r["solver"] for r in rows))
    cmap = plt.get_cmap("tab20")
    for ax, metric in zip(axes[0], metrics):
        for k, solver in enumerate(solvers):
            pts = sorted((r["nfe_used"], abs(r[metric])) for r in rows
                         if r["solver"] == solver and r.get(metric) is not None and r["nfe_used"]
                         and math.isfinite(r[metric]))
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=solver, color=cmap(k % 20))
        reference_line = None
        if metric == "logp_gap" and "logp_gap_se" in floor:  # one draw of a signed gap is no scale; its SE is
            reference_line = ax.axhline(floor["logp_gap_se"], color="k", ls="--", lw=1,
                                        label="standard error of the gap (n exact samples)")
        elif floor.get(metric) is not None:
            reference_line = ax.axhline(abs(floor[metric]), color="k", ls="--", lw=1,
                                        label="data vs reference" if metric in IMAGE_METRICS
                                        else "noise floor (exact vs exact samples)")
        if reference_line is not None and ax is not axes[0][0]:
            ax.legend(handles=[reference_line], fontsize=7, loc="lower left")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on short ranges
        ax.set_xlabel("NFE used")
        ax.set_ylabel(("|%s|" % metric) if metric == "logp_gap" else metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def image_quality(config, split):
    """The FID/KID/IS evaluator of evaluation/image_eval.py; without weights, one line that also names bits/dim."""
    from evaluation.image_eval import ImageQuality

    try:
        return ImageQuality(config, split, device="cpu")
    except UserError as error:  # main.py's advice in this script's terms (it takes --inception_weights PATH)
        message = str(error).replace("--config.eval.inception_weights=", "--inception_weights ")
        raise UserError(f"{message} (bits/dim of this run without them: main.py --mode likelihood)") from None


def compare_images(args, config, run, budgets) -> int:
    """FID, KID and IS of --num_samples images per solver and NFE budget on an image checkpoint."""
    from evaluation.reference_stats import load_split_images
    from evaluation.sample_runner import sample_shape, to_data_space

    if args.inception_weights:
        config.eval.inception_weights = args.inception_weights
    quality = image_quality(config, args.split)
    n = args.num_samples
    data = load_split_images(config, quality.split, 0)[:n]
    floor = {m: quality(data, seed=args.seed)[m] for m in IMAGE_METRICS}
    print(f"floor ({len(data)} {quality.split} images vs the reference): "
          + " ".join(f"{m}={_fmt(floor[m])}" for m in IMAGE_METRICS), flush=True)
    names = available_solvers() if args.solvers == "all" else args.solvers.split(",")
    rows, total = [], time.time()
    for solver in names:
        if solver not in SAMPLERS:
            raise UserError(f"unknown solver {solver!r}; valid: {', '.join(available_solvers())}")
        for label, nfe, options in settings_for(solver, budgets):
            x, used, seconds = run_one(run.sde, run.score_fn, (n, *sample_shape(config)), solver, nfe, options,
                                       args.seed + 1)
            row = {"solver": solver, "setting": label, "nfe_requested": nfe, "seconds": seconds}
            if x is None:
                row.update({"nfe_used": None, "note": used, **{m: None for m in IMAGE_METRICS}})
                rows.append(row)
                if "not valid for" in used:
                    print(f"{solver:14s} skipped: {used}", flush=True)
                    break
                continue
            metrics = quality(to_data_space(config, x.float().cpu()), seed=args.seed)
            row.update({"nfe_used": used, "note": "", **{m: metrics[m] for m in IMAGE_METRICS},
                        "kid_std": metrics["kid_std"]})
            rows.append(row)
            print(f"{solver:14s} {label:10s} NFE {used:>5d} "
                  + " ".join(f"{m}={_fmt(row[m])}" for m in IMAGE_METRICS) + f"  {seconds:.1f}s", flush=True)
    total = time.time() - total
    check_rows(rows)
    fields = ["solver", "setting", "nfe_requested", "nfe_used", *IMAGE_METRICS, "kid_std", "seconds", "note"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    writer.writerow({"solver": "data", "setting": f"{len(data)} {quality.split} images", **floor})
    for r in rows:
        writer.writerow(r)
    write_text(args.out + ".csv", buffer.getvalue())
    what = (f"trained checkpoint {args.workdir} (step {run.step}), {config.data.dataset}: {n} samples per run vs "
            f"{quality.reference['num_images']} {quality.split} images (FID, KID, IS with torch-fidelity's FID "
            "Inception)")
    command = "python scripts/compare_solvers.py " + " ".join(sys.argv[1:])
    header = (f"### {what}\n\n`{command}` — seed {args.seed}, {time.strftime('%Y-%m-%d', time.gmtime())}, "
              f"{platform.machine()} CPU, {args.threads} thread(s), torch {torch.__version__}; total {total:.0f} s. "
              "The noise-floor line is the metrics of as many data images.")
    write_markdown(args.out + ".md", rows, floor, header, budgets, IMAGE_METRICS)
    write_plot(args.out + ".png", rows, floor, what, IMAGE_METRICS)
    print(f"wrote {args.out}.csv, {args.out}.md, {args.out}.png in {total:.0f} s")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    budgets = check_args(args)
    torch.set_num_threads(args.threads)
    n = args.num_samples
    g_ref = torch.Generator().manual_seed(10_000 + args.seed)
    if args.workdir:
        from evaluation.run import load_run, resolve_config
        config, _ = resolve_config(args.config, args.workdir, [], "sample")  # the run's saved config by default
        run = load_run(args.workdir, "cpu", config=config)
        sde, score_fn, step = run.sde, run.score_fn, run.step
        if config.data.get("kind", "toy") == "image":
            return compare_images(args, config, run, budgets)
        from data.mixtures import TOY_MIXTURES, toy_mixture
        from data.toys import sample_toy
        name = str(config.data.dataset)
        mixture = toy_mixture(name) if name in TOY_MIXTURES else None
        reference = sample_toy(name, n, generator=g_ref, dtype=torch.float64)
        second = sample_toy(name, n, generator=g_ref, dtype=torch.float64)
        source = args.config or os.path.join(args.workdir, "config.json")
        what = f"trained checkpoint {args.workdir} (config {source}, step {step}), data {name}"
        dim = reference.shape[1]
    else:
        mixture, sde, score_fn = analytic_target(args.target, args.sde)
        reference = mixture.sample(n, generator=g_ref, dtype=torch.float64)
        second = mixture.sample(n, generator=g_ref, dtype=torch.float64)
        what = f"analytic target {args.target} under the {type(sde).__name__} (exact score)"
        dim = mixture.dim

    def quality(x: torch.Tensor) -> dict:
        if mixture is not None:
            return mixture_report(x.double(), mixture, reference, seed=args.seed, logp_reference=big_reference)
        from evaluation.metrics import sliced_wasserstein
        return {"sw2": sliced_wasserstein(x.double(), reference, generator=torch.Generator().manual_seed(args.seed)),
                "mode_tv": None, "logp_gap": None}

    # E_true[log p] from many exact draws (cheap: no solver), so the gap's noise is the samples' alone
    big_reference = mixture.sample(50_000, generator=g_ref, dtype=torch.float64) if mixture is not None else None
    floor = quality(second)
    if big_reference is not None:  # a gap from n samples has this standard error even for exact samples
        floor["logp_gap_se"] = float(mixture.log_prob(big_reference).std() / math.sqrt(n))
    names = available_solvers() if args.solvers == "all" else args.solvers.split(",")
    rows = []
    total = time.time()
    for solver in names:
        if solver not in SAMPLERS:
            raise UserError(f"unknown solver {solver!r}; valid: {', '.join(available_solvers())}")
        for label, nfe, options in settings_for(solver, budgets):
            x, used, seconds = run_one(sde, score_fn, (n, dim), solver, nfe, options, args.seed + 1)
            row = {"solver": solver, "setting": label, "nfe_requested": nfe, "seconds": seconds}
            if x is None:
                row.update({"nfe_used": None, "note": used, **{m: None for m in METRICS}})
                if "not valid for" in used:
                    rows.append(row)
                    print(f"{solver:14s} skipped: {used}", flush=True)
                    break
            else:
                row.update({"nfe_used": used, "note": "", **quality(x.float())})
            rows.append(row)
            print(f"{solver:14s} {label:10s} NFE {str(row['nfe_used']):>5s} "
                  + " ".join(f"{m}={_fmt(row[m])}" for m in METRICS) + f"  {seconds:.1f}s", flush=True)
    total = time.time() - total
    check_rows(rows)

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    table = io.StringIO(newline="")
    with table as f:
        writer = csv.DictWriter(f, fieldnames=["solver", "setting", "nfe_requested", "nfe_used", *METRICS,
                                               "seconds", "note"])
        writer.writeheader()
        writer.writerow({"solver": "noise_floor", "setting": "exact vs exact", **{m: floor[m] for m in METRICS}})
        for r in rows:
            writer.writerow(r)
        write_text(args.out + ".csv", f.getvalue())
    command = "python scripts/compare_solvers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    header = (f"### {what}\n\n`{command}` — {n} samples per run, seed {args.seed}, "
              f"{time.strftime('%Y-%m-%d', time.gmtime())}, {platform.machine()} CPU, "
              f"{args.threads} thread(s), torch {torch.__version__}; total {total:.0f} s.")
    write_markdown(args.out + ".md", rows, floor, header, budgets)
    write_plot(args.out + ".png", rows, floor, what)
    print("noise floor: " + " ".join(f"{m}={_fmt(floor[m])}" for m in METRICS))
    print(f"wrote {args.out}.csv, {args.out}.md, {args.out}.png in {total:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
