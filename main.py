"""Command line: python main.py --mode MODE [--config NAME] [--workdir DIR] [--device D] [--config.a.b=v].

With --workdir holding a trained run, every mode uses the run's saved config (evaluation/run.py)."""
from __future__ import annotations

import argparse
import importlib
import sys

# mode -> "module:function"; each function is run(config, workdir, args) -> exit code (None means 0)
MODES = {
    "train": "evaluation.train_runner:run",
    "sample": "evaluation.sample_runner:run",
    "likelihood": "evaluation.likelihood_runner:run",
    "eval": "evaluation.eval_runner:run",
    "train_classifier": "training.classifier:run",
    "inpaint": "evaluation.controllable:run_inpaint",
    "colorize": "evaluation.controllable:run_colorize",
    "interpolate": "evaluation.controllable:run_interpolate",
    "export": "evaluation.exports:run",
}


class CLIError(Exception):
    """A problem with the command line, reported as one line."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one CLIError line (not usage text and SystemExit)."""

    def error(self, message: str):
        raise CLIError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; `--config.KEY=VALUE` overrides are collected separately."""
    parser = _OneLineParser(
        description="Score-based generative modeling through SDEs: train, sample, compute bits/dim.",
        epilog="Override any config value with --config.KEY=VALUE, e.g. --config.training.batch_size=64.")
    parser.add_argument("--mode", required=True, help=f"one of: {', '.join(MODES)}")
    parser.add_argument("--config", default=None, help="a config name from configs/, a path to a config file "
                        "or a run's config.json (default: the saved config of the run in --workdir)")
    parser.add_argument("--workdir", default=None, help="run folder for checkpoints, logs and outputs "
                        "(default: runs/CONFIG)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (config key: device; "
                        "default auto = CUDA when present)")
    parser.add_argument("--solver", default=None, help="sampler name (default: config.sampling.solver)")
    parser.add_argument("--nfe", type=int, default=None, help="budget of score evaluations for the sampler")
    parser.add_argument("--num_samples", type=int, default=None, help="number of samples to draw")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: config.seed)")
    parser.add_argument("--split", default=None, help="data split for likelihood/eval (train or test)")
    parser.add_argument("--num_batches", type=int, default=None, help="number of batches for likelihood/eval")
    # controllable generation (sample / inpaint / colorize / interpolate)
    parser.add_argument("--class_label", type=int, default=None, help="class to sample (class-conditional model "
                        "or classifier guidance)")
    parser.add_argument("--guidance", default=None,
                        help="none, cfg or classifier; cfg: classifier-free guidance; classifier: the run's classifier (--mode train_classifier)")
    parser.add_argument("--guidance_scale", type=float, default=None, help="w for cfg, lambda for classifier (default 1)")
    parser.add_argument("--input", default=None, help="input images (PNG or npz) for inpaint/colorize/interpolate")
    parser.add_argument("--input2", default=None, help="second input images (PNG or npz) for interpolate")
    parser.add_argument("--mask", default=None, help="inpainting mask (PNG / npz, 1 = known) or "
                        "left|right|top|bottom|center")
    parser.add_argument("--num_frames", type=int, default=None, help="interpolation frames (default 8)")
    parser.add_argument("--allow_large", action="store_true", help="lift the sane upper bounds on budgets and "
                        "counts (--nfe, numbers of samples, iterations; see validation.py)")
    return parser


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split argv into parsed flags and `KEY=VALUE` config overrides."""
    overrides, rest = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise CLIError(f"malformed override {arg!r}: expected --config.KEY=VALUE")
                body = f"{body}={argv[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    parser = build_parser()
    args, unknown = parser.parse_known_args(rest)
    if unknown:
        raise CLIError(f"unrecognized arguments: {' '.join(unknown)} (see --help)")
    return args, overrides


def load_runner(mode: str):
    """Import the function that implements `mode`."""
    module_name, function_name = MODES[mode].split(":")
    return getattr(importlib.import_module(module_name), function_name)


def check_solver(name: str) -> None:
    """Fail with the list of valid names if `name` is not a known sampler."""
    from solvers import available_solvers

    valid = available_solvers()
    if name not in valid:
        raise CLIError(f"unknown solver {name!r}; valid: {', '.join(valid)}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    from errors import Interrupted, UserError
    from evaluation.run import resolve_config
    from training.device import get_device

    argv = sys.argv[1:] if argv is None else argv
    try:
        args, overrides = parse_args(argv)
        if args.mode not in MODES:
            raise CLIError(f"unknown mode {args.mode!r}; valid: {', '.join(MODES)}")
        config, workdir = resolve_config(args.config, args.workdir, overrides, args.mode)
        if args.device is not None:
            config.device = args.device
        get_device(config)  # an unknown or unavailable device fails here, in one line
        if args.solver is not None:
            check_solver(args.solver)
        if args.seed is not None:
            config.seed = args.seed
        from sde_lib import get_sde
        from validation import validate_run

        validate_run(config, args, workdir, get_sde)  # flags, config, memory, output folders: before any work
        runner = load_runner(args.mode)
        code = runner(config, workdir, args)
    except (CLIError, UserError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Interrupted as stop:  # training saved a checkpoint at the step it had finished
        print(f"interrupted: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        print("interrupted: checkpoints and the finished batches of sample / eval / likelihood runs are kept; "
              "the same command resumes", file=sys.stderr)
        return 130
    return 0 if code is None else int(code)


if __name__ == "__main__":
    sys.exit(main())
