"""Per-batch results of a long evaluation, saved after every batch so that a killed run resumes where it stopped.

Bits/dim of a whole test set is hours of GPU time (every batch is hundreds of network forward + VJP passes).
`BatchJournal.open(path, header)` returns the batches an earlier run of the same command saved in `path` (JSON,
written atomically after each batch): they are reused when the journal's header (the settings, the checkpoint
step, the batch ranges) equals `header`; a journal of another checkpoint step or other batches is reported and
replaced batch by batch; an unreadable one is refused in one line (delete it to start over). Each batch is
seeded on its own (training.distributed.batch_seed), so a resumed evaluation gives the same numbers as an
uninterrupted one. `finish()` removes the journal once the final report is written.
"""
from __future__ import annotations

import json
import os

from atomic_io import write_json
from errors import UserError

JOURNAL_SUFFIX = ".partial"  # next to the report: likelihood_test.json.partial (not matched by *.json)


class BatchJournal:
    """Done batches {index: entry} of one evaluation and where they are saved."""

    def __init__(self, path: str, header: dict, done: dict[int, dict] | None = None):
        self.path, self.header, self.done = path, header, dict(done or {})

    @classmethod
    def open(cls, path: str, header: dict, check_entry=None) -> "BatchJournal":
        """The journal at `path` when it was written for `header`, else an empty one (a note says why).

        `check_entry(index, entry)` raises ValueError for an entry that does not fit batch `index`."""
        if not os.path.exists(path):
            return cls(path, header)
        try:
            with open(path, encoding="utf-8") as handle:
                saved = json.load(handle)
            if not isinstance(saved, dict) or not isinstance(saved.get("batches"), dict):
                raise ValueError("no 'batches' table")
            saved_header = saved.get("header")
            if saved_header != json.loads(json.dumps(header)):  # compared as JSON (tuples become lists)
                step = saved_header.get("step") if isinstance(saved_header, dict) else None
                print(f"note: {path} holds batches of other settings or another checkpoint (step {step}, now "
                      f"{header.get('step')}); starting over, it is replaced batch by batch")
                return cls(path, header)
            done = {}
            for key, entry in saved["batches"].items():
                index = int(key)
                if not isinstance(entry, dict):
                    raise ValueError(f"batch {key} is not a table")
                if check_entry is not None:
                    check_entry(index, entry)
                done[index] = entry
        except (OSError, ValueError, TypeError, AttributeError) as error:  # JSONDecodeError is a ValueError
            raise UserError(f"cannot resume from {path}: {' '.join(str(error).split())[:160]}; "
                            "delete the file to start over") from None
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
