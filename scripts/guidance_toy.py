"""Measure guidance on the ring: train vp_toy_cond (and a classifier), sample each class with CFG at several w.

Reports, per guidance setting, the fraction of samples whose exact mixture posterior picks the requested class
and the mean exact p(c | x), next to the exact-score answers (data/class_conditional.py). Writes a markdown
table and a scatter figure.

    python scripts/guidance_toy.py --workdir runs/vp_toy_cond --n_iters 1500 --out docs/guidance_toy --force

--out defaults to WORKDIR/guidance_toy (.md, .png); earlier results are replaced only with --force.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import configs  # noqa: E402
from atomic_io import save_figure, write_text  # noqa: E402
from data.class_conditional import mixture_class_score_fn, mixture_log_posterior_fn  # noqa: E402
from data.mixtures import toy_mixture  # noqa: E402
from errors import UserError  # noqa: E402
from models import score_fn_options  # noqa: E402
from models.guidance import classifier_log_prob_fn, conditional_score_fn  # noqa: E402
from sde_lib import get_sde  # noqa: E402
from solvers import sample  # noqa: E402
from solvers.guidance import classifier_free_guidance, classifier_guidance  # noqa: E402


def class_stats(x: torch.Tensor, ring, label: int) -> tuple[float, float]:
    """(fraction assigned to `label`, mean exact p(label | x)) of samples x."""
    posterior = ring.component_posterior(x.double())
    return float((posterior.argmax(1) == label).double().mean()), float(posterior[:, label].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/vp_toy_cond")
    parser.add_argument("--n_iters", type=int, default=1500)
    parser.add_argument("--classifier_iters", type=int, default=1000)
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--nfe", type=int, default=200)
    parser.add_argument("--out", default=None, help="output prefix (default: WORKDIR/guidance_toy)")
    parser.add_argument("--force", action="store_true", help="replace the files of an earlier run at --out")
    args = parser.parse_args()
    args.out = args.out or os.path.join(args.workdir, "guidance_toy")
    existing = [args.out + ext for ext in (".md", ".png") if os.path.exists(args.out + ext)]
    if existing and not args.force:
        raise UserError(f"{existing[0]} exists (an earlier run): pass --force to replace it, or another --out")
    for key in ("n_iters", "classifier_iters", "num_samples", "nfe"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key} must be a positive integer, got {getattr(args, key)}")
    torch.set_num_threads(1)

    from training.checkpoint import restore_model
    from training.classifier import load_classifier, train_classifier
    from training.trainer import train

    config = configs.get_config("vp_toy_cond")
    config.training.n_iters, config.training.progress, config.device = args.n_iters, False, "cpu"
    config.classifier.n_iters = args.classifier_iters
    start = time.time()
    train(config, args.workdir)
    if not os.path.exists(os.path.join(args.workdir, "classifier.pt")):
        train_classifier(config, args.workdir)
    print(f"trained in {time.time() - start:.0f}s")
    sde, ring = get_sde(config), toy_mixture("ring2d")
    model, step = restore_model(config, args.workdir, "cpu")
    net_class = conditional_score_fn(sde, model, **score_fn_options(config))
    exact_class = mixture_class_score_fn(ring, sde)
    classifier = load_classifier(config, args.workdir, torch.device("cpu"))
    settings = [("cfg", 0.0), ("cfg", 1.0), ("cfg", 3.0), ("classifier", 1.0), ("classifier", 3.0)]
    rows, shown = [], {}
    for kind, scale in settings:
        stats = {"net": [], "exact": []}
        for label in range(ring.num_components):
            for source, class_fn in (("net", net_class), ("exact", exact_class)):
                if kind == "cfg":
                    score = classifier_free_guidance(class_fn, label, ring.num_components, scale)
                else:
                    base = (lambda x, t, f=class_fn: f(x, t, torch.full((x.shape[0],), ring.num_components)))
                    log_prob = classifier_log_prob_fn(classifier) if source == "net" else mixture_log_posterior_fn(ring, sde)
                    score = classifier_guidance(base, log_prob, label, scale)
                dtype = torch.float32 if source == "net" else torch.float64
                with torch.no_grad():
                    x, _ = sample(sde, score, (args.num_samples, 2), solver="em", nfe=args.nfe,
                                  generator=torch.Generator().manual_seed(label), dtype=dtype)
                stats[source].append(class_stats(x, ring, label))
                if source == "net" and label == 0:
                    shown[f"{kind} {scale:g}"] = x
        mean = {k: [sum(v[i] for v in vals) / len(vals) for i in range(2)] for k, vals in stats.items()}
        rows.append(f"| {kind} | {scale:g} | {mean['net'][0]:.3f} | {mean['net'][1]:.3f} | "
                    f"{mean['exact'][0]:.3f} | {mean['exact'][1]:.3f} |")
    table = "\n".join(["| guidance | scale | net: in class | net: mean p(c given x) | exact: in class | "
                       "exact: mean p(c given x) |", "|---|---|---|---|---|---|", *rows])
    from training.checkpoint import read_verified
    from training.classifier import classifier_path

    classifier_steps = read_verified(classifier_path(args.workdir), "classifier").get("step", "?")  # as trained
    header = (f"vp_toy_cond (ring2d, class = component), {step} training steps, classifier "
              f"{classifier_steps} steps; EM with NFE {args.nfe}, {args.num_samples} samples per class, "
              "averaged over the 8 classes. 'net' = trained networks, 'exact' = exact mixture scores / posterior.\n")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_text(args.out + ".md", header + "\n" + table + "\n")
    print(header + table)
    from evaluation.figures import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.3))
    for ax, (name, x) in zip(axes, shown.items()):
        ax.scatter(ring.means[:, 0], ring.means[:, 1], c="lightgray", s=200)
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
        ax.set_title(f"class 0, {name}", fontsize=9)
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
    fig.tight_layout()
    save_figure(fig, args.out + ".png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    try:
        main()
    except UserError as error:  # ConfigError is one too
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
