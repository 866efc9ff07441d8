"""Events shared by the workers of one service: the embedded online store, kept in step.

With one worker the in-process online store is the whole truth. With several (`ML_LIFECYCLE_
WORKERS`), a batch posted to `/events` reaches one worker; that worker adds it to its own store
and appends it here, one Arrow IPC file per batch (written under a hidden name, then renamed:
readers never see half a file). Every worker, before it reads its store for a request, applies
the files it has not applied yet; a worker that starts later (or is restarted) applies them all
on top of the snapshot. The journal belongs to one online snapshot (a folder per snapshot): a new
snapshot starts from its own data. Production uses the shared Redis store and no journal.

Checking costs one `stat` of the folder per request: the folder's mtime changes when a file
lands, so the folder is listed only then (and while its mtime is recent: file systems stamp with
a coarse clock, so two files landing within one tick share an mtime).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc

from ml_lifecycle.serving.inference_log import worker_id

SUFFIX = ".arrow"
_RECENT_NS = 100_000_000  # a folder mtime younger than this is not trusted (coarse clocks)


class EventJournal:
    """Append-only folder of event batches (cleaned rows), read by every worker."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._applied: set[str] = set()
        self._seen_mtime = -1
        self._lock = threading.Lock()
        self._sequence = itertools.count()
        self._prefix = worker_id()

    def append(self, table: pa.Table) -> str:
        """Journal one batch this worker has already applied; returns the file name."""
        name = f"{time.time_ns():020d}-{self._prefix}-{next(self._sequence):06d}{SUFFIX}"
        with self._lock:
            self._applied.add(name)  # before it is visible: this worker never applies it again
        hidden = self.folder / f".{name}.tmp"
        with pa.OSFile(str(hidden), "wb") as sink, pa.ipc.new_file(sink, table.schema) as out:
            out.write_table(table)
        os.replace(hidden, self.folder / name)
        return name

    def unapplied(self) -> list[pa.Table]:
        """Batches other workers journaled since the last call, oldest first (each returned
        once per worker)."""
        try:
            mtime = os.stat(self.folder).st_mtime_ns
        except FileNotFoundError:
            return []
        if mtime == self._seen_mtime:
            return []
        with self._lock:
            names = sorted(
                entry.name
                for entry in os.scandir(self.folder)
                if entry.name.endswith(SUFFIX) and entry.name not in self._applied
            )
            tables = []
            for name in names:
                with pa.OSFile(str(self.folder / name)) as source:
                    tables.append(pa.ipc.open_file(source).read_all())
                self._applied.add(name)
            if time.time_ns() - mtime > _RECENT_NS:
                self._seen_mtime = mtime
        return tables
