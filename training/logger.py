"""Training progress: TensorBoard scalars every K steps and a tqdm bar (main process only)."""
from __future__ import annotations

import os
import sys

from tqdm import tqdm


class TrainLogger:
    """Writes scalars under workdir/tensorboard and shows a progress bar; silent on non-main processes."""

    def __init__(self, workdir: str, start_step: int, total_steps: int, enabled: bool = True,
                 progress: bool = True):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run continues at start_step + 1: events a crashed run logged after its last checkpoint
        # (steps > start_step) are purged, the ones up to and including the checkpoint's step are kept; also from
        # step 1 when a run killed before its first checkpoint starts over (once: each step twice in the curve).
        self.writer = SummaryWriter(log_dir=os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)
        if progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr, mininterval=0.5)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Record scalars at `step` and show the loss and rate on the bar."""
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        if self.bar is not None and "loss" in values:
            shown = {k: f"{values[k]:.4g}" for k in ("loss", "grad_norm") if k in values}
            rate_key = next((k for k in values if k.endswith("_per_s")), None)
            if rate_key:
                shown[rate_key.replace("_per_s", "/s")] = f"{values[rate_key]:.2f}"
            self.bar.set_postfix(shown, refresh=False)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        """Record the training callbacks' scalars (e.g. sw2, fid) at `step` under `metrics/`."""
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"metrics/{name}", value, step)
        self.writer.flush()

    def advance(self, steps: int) -> None:
        """Move the bar forward."""
        if self.bar is not None:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        """A line of text that does not break the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def image(self, tag: str, step: int, array_hwc) -> None:
        """An (H, W, 3) uint8 image in TensorBoard."""
        if self.enabled:
            self.writer.add_image(tag, array_hwc, step, dataformats="HWC")

    def close(self) -> None:
        """Flush and close."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
