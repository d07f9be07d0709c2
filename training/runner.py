"""`python main.py --mode train`: train (or resume) a run in the workdir and report where its outputs are."""
from __future__ import annotations

import os

from training.trainer import train


def run(config, workdir: str, args) -> int:
    """Train the model of `config` in `workdir` (resuming from its checkpoint if there is one)."""
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
