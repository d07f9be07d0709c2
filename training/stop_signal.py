"""A graceful stop on SIGINT / SIGTERM: the train loop finishes its step, saves a checkpoint and exits.

A cluster sends SIGTERM before it preempts a job and Ctrl-C sends SIGINT; without this, every step since the last
snapshot (`training.snapshot_every`) is lost. `stop_on_signals()` records the first such signal and puts the
previous handler back, so a second one acts as before (Ctrl-C twice stops at once). Signals the process ignores
(SIG_IGN, e.g. SIGINT of a background job) stay ignored. Handlers can only be set from the main thread; elsewhere
nothing is installed and no stop is ever requested.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """The signal number of the first stop signal received, or None."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


@contextlib.contextmanager
def stop_on_signals(signals=STOP_SIGNALS) -> Iterator[StopRequest]:
    """Within the block the first of `signals` only sets the returned request (see the module docstring)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {}

    def record(signum, frame) -> None:
        request.signum = signum
        signal.signal(signum, previous[signum])

    for signum in signals:
        handler = signal.getsignal(signum)
        if handler is signal.SIG_IGN:  # ignored on purpose (e.g. SIGINT of a background job): left alone
            continue
        previous[signum] = signal.SIG_DFL if handler is None else handler
        signal.signal(signum, record)
    try:
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
