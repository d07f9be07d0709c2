"""One clean sentence for a failed `torch.load`: the cause in one line, no ANSI codes, never cut mid-sentence.

torch's own messages span paragraphs (advice on `weights_only`, links, bold terminal codes); the part that
names the cause is one of a few known shapes, and anything else is reduced to its first complete sentence.
"""
from __future__ import annotations

import errno
import re
import warnings
from typing import Any

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# "Unsupported global: GLOBAL numpy.core.multiarray._reconstruct was not an allowed global by default."
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global")
# "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."
_BLOCKED_GLOBAL = re.compile(r"unsupported GLOBAL (\S+) whose module (\S+) is blocked")
_UNPICKLER_DETAIL = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", re.S)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def _clean(text: str) -> str:
    """Without ANSI codes, whitespace runs (newlines, tabs) as single spaces."""
    return " ".join(_ANSI.sub("", text).split())


def _first_sentence(text: str) -> str:
    sentence = _SENTENCE_END.split(text, maxsplit=1)[0].strip()
    return sentence.rstrip(".!?")


def describe_load_error(error: BaseException) -> str:
    """The cause of a failed torch.load as one sentence without a final period, e.g. "the file is truncated
    or damaged (its zip archive has no central directory)"."""
    raw = str(error)
    message = _clean(raw)
    found = _UNSUPPORTED_GLOBAL.search(message) or _BLOCKED_GLOBAL.search(message)
    if found:
        return (f"it refers to {found.group(1).rstrip('.')}, which is not among the objects a safe load accepts "
                "(a checkpoint may hold tensors and plain values only; loading never runs code from a file)")
    if "failed finding central directory" in message or "failed reading zip archive" in message:
        return "the file is truncated or damaged (its zip archive has no central directory)"
    if isinstance(error, EOFError) or "unexpected EOF" in message or "Ran out of input" in message:
        detail = _first_sentence(message)
        return "the file ends early (empty or truncated)" + (f": {detail}" if detail else "")
    detail = _UNPICKLER_DETAIL.search(_ANSI.sub("", raw))
    if detail:
        return f"it is not a PyTorch checkpoint (unpickling failed: {_first_sentence(_clean(detail.group(1)))})"
    if isinstance(error, OSError) and error.errno == errno.EINVAL:  # torch's zip reader on a cut-off archive end
        return "the file is truncated or damaged (its zip archive cannot be read: invalid argument)"
    if isinstance(error, OSError) and error.strerror:
        return f"the file cannot be read ({error.strerror.lower()})"
    sentence = _first_sentence(message)
    return f"it is not a PyTorch checkpoint ({type(error).__name__}{': ' + sentence if sentence else ''})"


def load_weights_only(source: Any, map_location: Any = "cpu") -> Any:
    """torch.load(weights_only=True) without torch's warnings (a raw legacy pickle prints a two-line UserWarning
    before the load fails or succeeds; the caller reports the outcome in one line)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(source, map_location=map_location, weights_only=True)


def describe_state_error(error: BaseException) -> str:
    """A failed restore of a loaded state (a missing key, a wrong shape or type) as one short line."""
    if isinstance(error, KeyError) and error.args:
        return f"missing entry {error.args[0]!r}"
    lines = str(error).splitlines()
    return lines[0][:200] if lines and lines[0] else type(error).__name__
