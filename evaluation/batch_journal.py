"""Per-batch results of a long evaluation, saved after every batch so that a killed run resumes where it stopped.

Bits/dim of a whole test set, or the 50,000 samples of an FID, is hours of GPU time.
`BatchJournal.open(path, header)` returns the batches an earlier run of the same command saved in `path` (JSON,
written atomically after each batch): they are reused when the journal's header (the settings, the checkpoint
step, the batch ranges) equals `header`; a journal of another checkpoint step or other batches is reported and
replaced batch by batch; an unreadable one is refused in one line (delete it to start over). Each batch is
seeded on its own (training.distributed.batch_seed), so a resumed evaluation gives the same numbers as an
uninterrupted one. `finish()` removes the journal once the final report is written.
`ArrayJournal` does the same for batches of arrays (samples): one npz per batch in a folder, listed in its
`journal.json` after the batch's file is complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import re

import numpy as np

from atomic_io import is_stale_temp, save_npz, write_json
from errors import UserError
from validation import describe_read_error

JOURNAL_SUFFIX = ".partial"  # next to the report: likelihood_test.json.partial (not matched by *.json)


@contextlib.contextmanager
def _journal_errors(path: str, remedy: str):
    """Whatever is wrong with a journal's contents becomes one line naming it (no traceback)."""
    try:
        yield
    except (OSError, ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError) as error:
        raise UserError(f"cannot resume from {path}: {' '.join(str(error).split())[:160]}; {remedy}") from None


def _read_journal(path: str, header: dict, name: str) -> dict | None:
    """The JSON journal at `path` when it was written for `header`; None when there is none or it was written for
    other weights or settings (a note names `name`). Damaged contents raise (see `_journal_errors`)."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle)
    if not isinstance(saved, dict):
        raise ValueError("not a journal")
    saved_header = saved.get("header")
    if saved_header != json.loads(json.dumps(header)):  # compared as JSON (tuples become lists)
        step = saved_header.get("step") if isinstance(saved_header, dict) else None
        print(f"note: {name} was saved for other weights or settings (checkpoint step {step}; now step "
              f"{header.get('step')}); starting over")
        return None
    return saved


class BatchJournal:
    """Done batches {index: entry} of one evaluation and where they are saved."""

    def __init__(self, path: str, header: dict, done: dict[int, dict] | None = None):
        self.path, self.header, self.done = path, header, dict(done or {})

    @classmethod
    def open(cls, path: str, header: dict, check_entry=None) -> "BatchJournal":
        """The journal at `path` when it was written for `header`, else an empty one (a note says why).

        `check_entry(index, entry)` raises ValueError for an entry that does not fit batch `index`."""
        with _journal_errors(path, "delete the file to start over"):
            saved = _read_journal(path, header, path)
            if saved is None:
                return cls(path, header)
            if not isinstance(saved.get("batches"), dict):
                raise ValueError("no 'batches' table")
            done = {}
            for key, entry in saved["batches"].items():
                index = int(key)
                if not isinstance(entry, dict):
                    raise ValueError(f"batch {key} is not a table")
                if check_entry is not None:
                    check_entry(index, entry)
                done[index] = entry
        return cls(path, header, done)

    def record(self, index: int, entry: dict) -> None:
        """Add batch `index` and save the journal atomically."""
        self.done[int(index)] = entry
        write_json(self.path, {"header": self.header,
                               "batches": {str(i): self.done[i] for i in sorted(self.done)}}, indent=None)

    def finish(self) -> None:
        """Remove the journal (the final report holds everything)."""
        if os.path.exists(self.path):
            os.remove(self.path)


class ArrayJournal:
    """Done batches of arrays in `folder`: `batch_<index>.npz` each, listed in `journal.json` with the header."""

    INDEX_FILE = "journal.json"
    _BATCH = re.compile(r"^batch_(\d+)\.npz$")

    def __init__(self, folder: str, header: dict, done: list[int] | None = None):
        self.folder, self.header, self.done = folder, header, sorted(set(done or []))

    @classmethod
    def open(cls, folder: str, header: dict) -> "ArrayJournal":
        """The batches listed in `folder` for `header`, else an empty journal (a note says why)."""
        path = os.path.join(folder, cls.INDEX_FILE)
        with _journal_errors(path, "delete the folder to start over"):
            saved = _read_journal(path, header, folder)
            if saved is None:
                return cls(folder, header)
            done = [int(i) for i in saved["done"]]
        return cls(folder, header, done)

    def load(self, index: int) -> dict[str, np.ndarray]:
        """The arrays of done batch `index` (plain numeric arrays only; nothing is unpickled)."""
        path = os.path.join(self.folder, f"batch_{int(index)}.npz")
        try:
            archive = np.load(path, allow_pickle=False)
            if not hasattr(archive, "files"):  # an .npy array in its place
                raise ValueError("it is a single .npy array, not an npz archive")
            with archive:
                return {key: archive[key] for key in archive.files}
        except Exception as error:  # noqa: BLE001 -- numpy, zipfile, zlib, tokenize raise many types for damaged files
            raise UserError(f"cannot resume from {path}: {describe_read_error(error)}; "
                            f"delete {self.folder} to start over") from None

    def record(self, index: int, **arrays: np.ndarray) -> None:
        """Save batch `index` (its file first, then the list), both atomically."""
        save_npz(os.path.join(self.folder, f"batch_{int(index)}.npz"), compressed=False, **arrays)
        self.done = sorted(set(self.done) | {int(index)})
        write_json(os.path.join(self.folder, self.INDEX_FILE), {"header": self.header, "done": self.done},
                   indent=None)

    def finish(self) -> None:
        """Remove the journal's files (batches, list, leftover temp files) and the folder when it is empty."""
        if not os.path.isdir(self.folder):
            return
        # another run of the same command may finish at the same time (missing files are fine) or still be writing
        # (its temp files are left to it; its own finish removes the folder)
        for name in os.listdir(self.folder):
            path = os.path.join(self.folder, name)
            if name == self.INDEX_FILE or self._BATCH.match(name) or is_stale_temp(path):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
        with contextlib.suppress(FileNotFoundError, OSError):
            if not os.listdir(self.folder):
                os.rmdir(self.folder)
