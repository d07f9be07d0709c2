"""`python main.py --mode train`: train (or resume) a run in the workdir and report where its outputs are."""
from __future__ import annotations

import os

from sde_lib import get_sde
from training.checkpoint import checkpoint_path
from training.trainer import train
from validation import check_output_files, check_settings


def run(config, workdir: str, args) -> int:
    """Train the model of `config` in `workdir` (resuming from its checkpoint if there is one)."""
    check_settings(config, args, "train", get_sde)  # also when called without main.py
    check_output_files([checkpoint_path(workdir), os.path.join(workdir, "config.json"),
                        os.path.join(workdir, "train_summary.json")])  # before hours of training, not after
    result = train(config, workdir)
    if int(os.environ.get("RANK", "0")) == 0:
        rate = f"{result.steps_this_run / result.seconds:.0f} steps/s" if result.seconds > 0 else ""
        print(f"[train] step {result.step} ({result.steps_this_run} this run, {result.seconds:.1f} s, {rate}); "
              f"final loss {result.loss:.4g}")
        print(f"[train] checkpoint: {result.checkpoint}")
        print(f"[train] tensorboard: {os.path.join(workdir, 'tensorboard')}")
        if result.samples_path:
            extra = f" (sliced W2 to data: {result.sw2:.4f})" if result.sw2 is not None else ""
            print(f"[train] samples: {result.samples_path}{extra}")
    return 0
