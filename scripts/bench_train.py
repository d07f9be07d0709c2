"""Training throughput of a config: steady-state steps/s and images (or samples)/s of the real train loop.

Runs `training.trainer.train` for --warmup steps (compilation, allocator warm-up), then resumes the same
run for --steps more and times only that part (it ends with one checkpoint write, as every run does).

    python scripts/bench_train.py --config vp_cifar --synthetic --steps 50 --config.training.batch_size=128
    python scripts/bench_train.py --config vp_cifar --config.data.path=../shared/data/cifar10/train_0.npz --bf16 false
    python scripts/bench_train.py --config vp_toy --steps 300
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import configs  # noqa: E402
from atomic_io import save_npz  # noqa: E402
from training.device import get_device  # noqa: E402
from training.trainer import train  # noqa: E402


def synthetic_cifar(folder: str, n: int = 4096) -> str:
    """Random uint8 images in the npz layout of the CIFAR-10 loader (for timing only)."""
    rng = np.random.default_rng(0)
    path = os.path.join(folder, "train_synthetic.npz")
    save_npz(path, compressed=False, x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 10, n))
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--bf16", default="true", help="bf16 autocast on CUDA (true/false)")
    parser.add_argument("--compile", default="false", help="torch.compile the network (true/false)")
    parser.add_argument("--synthetic", action="store_true", help="random uint8 CIFAR-sized images, no data needed")
    parser.add_argument("--workdir", default=None, help="run folder (default: a temporary one)")
    argv = sys.argv[1:] if argv is None else argv
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    args = parser.parse_args([a for a in argv if not a.startswith("--config.")])
    config = configs.get_config(args.config)
    configs.apply_overrides(config, overrides)
    config.training.bf16 = args.bf16.lower() == "true"
    config.training.compile = args.compile.lower() == "true"
    config.training.plot_samples = 0
    config.training.progress = False
    config.training.n_iters = args.warmup + args.steps
    config.training.log_every = args.steps
    config.training.snapshot_every = config.training.n_iters
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            config.data.path = synthetic_cifar(tmp)
        workdir = args.workdir or os.path.join(tmp, "run")
        train(config, workdir, max_steps=args.warmup)
        result = train(config, workdir)
    if result.steps_this_run == 0 or result.seconds <= 0:
        sys.exit(f"error: no timed steps ran: {workdir} was already at step {result.step} (a finished run); "
                 "use a new --workdir")
    per_s = result.steps_this_run / result.seconds
    unit = "images_per_s" if config.data.kind == "image" else "samples_per_s"
    device = get_device(config)
    report = {"config": args.config, "device": str(device), "bf16": config.training.bf16 and device.type == "cuda",
              "compile": config.training.compile, "batch_size": int(config.training.batch_size),
              "steps": result.steps_this_run, "seconds": round(result.seconds, 3), "steps_per_s": round(per_s, 3),
              unit: round(per_s * int(config.training.batch_size), 1)}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
