"""argparse types for the scripts: bad values end in argparse's usage + one error line (exit 2), not a traceback."""
from __future__ import annotations

import argparse
from typing import Callable


def positive_int(text: str) -> int:
    """An int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def csv_of(cast: Callable[[str], float], low: float, what: str, multiple_of: int = 1):
    """Comma-separated values of `cast`, each >= low (and a multiple of `multiple_of`), as a list."""

    def parse(text: str) -> list:
        try:
            values = [cast(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or min(values) < low or (multiple_of > 1 and any(v % multiple_of for v in values)):
            extra = f", multiples of {multiple_of}" if multiple_of > 1 else ""
            raise argparse.ArgumentTypeError(f"expected comma-separated {what} >= {low:g}{extra}, got {text!r}")
        return values

    return parse
