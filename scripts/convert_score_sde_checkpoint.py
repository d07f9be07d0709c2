"""Convert a published Score-SDE checkpoint (yang-song/score_sde_pytorch, checkpoint_*.pth) into our format.

    python scripts/convert_score_sde_checkpoint.py checkpoint_26.pth \
        --config ssde_subvp_cifar10_ddpmpp_deep_continuous --out runs/subvp_deep [--force] [--config.KEY=VALUE]

Then `main.py --mode sample|likelihood --config <same name> --workdir <out>` use its EMA weights.
The mapping and its checks live in `training/convert.py`; this is only the command line.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import configs  # noqa: E402
from errors import UserError  # noqa: E402
from training.convert import convert_checkpoint  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """Arguments: SRC, --config, --out, --force (config overrides are --config.KEY=VALUE)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Override config values with --config.KEY=VALUE (as in main.py).")
    parser.add_argument("src", help="the reference checkpoint (.pth with model, ema, optimizer, step)")
    parser.add_argument("--config", required=True,
                        help="the named config of the checkpoint, e.g. ssde_vp_cifar10_ddpmpp_continuous")
    parser.add_argument("--out", required=True, help="run folder to write (checkpoints/checkpoint.pt, config.json)")
    parser.add_argument("--force", action="store_true", help="replace an existing checkpoint in --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 with a one-line message for user errors)."""
    torch.set_num_threads(min(4, torch.get_num_threads()))
    argv = sys.argv[1:] if argv is None else argv
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    args = build_parser().parse_args([a for a in argv if not a.startswith("--config.")])
    try:
        config = configs.get_config(args.config)
        configs.apply_overrides(config, overrides)
        report = convert_checkpoint(args.src, config, args.out, config_name=args.config, overwrite=args.force)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    buffers = f"; checked and dropped reference buffer(s) {', '.join(report.checked_buffers)}" \
        if report.checked_buffers else ""
    print(f"converted {args.src} (step {report.step}): {report.num_tensors} model tensors, "
          f"{report.num_shadow} EMA tensors, {report.num_optimizer_states} optimizer states, "
          f"{report.num_parameters:,} parameters{buffers}")
    print(f"not verifiable from the file, taken from --config {args.config}: {'; '.join(report.unverified)}")
    print(f"wrote {report.path}")
    given = "".join(f" '--config.{o}'" if " " in o else f" --config.{o}" for o in overrides)  # the same network
    print(f"next: python main.py --mode sample --config {args.config} --workdir {args.out}{given}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
