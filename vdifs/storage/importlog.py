"""Import attempts in an ``imports`` table of SQLite: the embedded SR keeps it in its
database, a pool in a journal file of its own on the backup host (:class:`ImportJournal`)."""

from __future__ import annotations

import contextlib
import errno as errno_module
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from vdifs.model import safe_text, utc_iso
from vdifs.storage.digests import DIGESTS_TABLE

log = logging.getLogger(__name__)

IMPORTS_TABLE = """
CREATE TABLE IF NOT EXISTS imports(
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    target TEXT,
    format TEXT NOT NULL,
    state TEXT NOT NULL,
    error TEXT,
    errno INTEGER,
    bytes_received INTEGER NOT NULL DEFAULT 0,
    chunks_applied INTEGER NOT NULL DEFAULT 0,
    started TEXT NOT NULL,
    finished TEXT,
    seconds REAL,
    pid INTEGER NOT NULL DEFAULT 0,
    notes TEXT,
    sha256 TEXT
);
"""


@contextlib.contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction on ``db``: all of it commits, or none of it.  A nested
    use joins the outer transaction (a VM snapshot is several VDI snapshots)."""
    if db.in_transaction:
        yield db
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class Store(Protocol):
    """Where the table lives: a connection for this thread, and write transactions."""

    @property
    def db(self) -> sqlite3.Connection: ...

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]: ...


HISTORY = 1000  # attempts kept
_KEYS = (
    "id",
    "name",
    "target",
    "format",
    "state",
    "error",
    "errno",
    "bytes_received",
    "chunks_applied",
    "started",
    "finished",
    "seconds",
    "notes",
    "sha256",
)


class SqliteImportLog:
    """Implements :class:`vdifs.storage.backend.ImportLog` in a SQLite ``imports`` table."""

    def __init__(self, store: Store, interrupted: str) -> None:
        self.sr = store
        self.interrupted = interrupted
        """What an attempt whose process died left behind (the error it is recorded with)."""

    def start(self, name: str, target: str | None, fmt: str, received: int) -> int:
        with self.sr.transaction() as db:
            cur = db.execute(
                "INSERT INTO imports(name, target, format, state, bytes_received, started, pid)"
                " VALUES (?, ?, ?, 'running', ?, ?, ?)",
                (safe_text(name), target, fmt, received, utc_iso(time.time_ns()), os.getpid()),
            )
            db.execute("DELETE FROM imports WHERE id <= ?", ((cur.lastrowid or 0) - HISTORY,))
            return int(cur.lastrowid or 0)

    def end(
        self,
        import_id: int,
        state: str,
        error: str | None,
        errno: int,
        chunks: int,
        seconds: float,
        target: str | None = None,
        received: int | None = None,
        notes: str | None = None,
    ) -> None:
        try:
            with self.sr.transaction() as db:
                db.execute(
                    "UPDATE imports SET state = ?, error = ?, errno = ?, chunks_applied = ?,"
                    " finished = ?, seconds = ?, target = COALESCE(?, target),"
                    " bytes_received = COALESCE(?, bytes_received), notes = ? WHERE id = ?",
                    (
                        state,
                        error,
                        errno or None,
                        chunks,
                        utc_iso(time.time_ns()),
                        seconds,
                        target,
                        received,
                        notes,
                        import_id,
                    ),
                )
        except Exception:
            log.exception("could not record the outcome of import %d", import_id)

    def record_digest(self, import_id: int, sha256: str) -> None:
        with self.sr.transaction() as db:
            db.execute("UPDATE imports SET sha256 = ? WHERE id = ?", (sha256, import_id))

    def forget(self, import_id: int) -> None:
        with self.sr.transaction() as db:
            db.execute("DELETE FROM imports WHERE id = ?", (import_id,))

    def recent(self, limit: int) -> list[dict[str, Any]]:
        rows = self.sr.db.execute(
            f"SELECT {', '.join(_KEYS)} FROM imports ORDER BY id DESC LIMIT ?", (limit,)
        ).fetchall()
        out = []
        for row in rows:
            item = dict(zip(_KEYS, row, strict=True))
            for optional in ("notes", "sha256"):
                if item[optional] is None:
                    del item[optional]
            if item["errno"]:
                item["errno_name"] = errno_module.errorcode.get(item["errno"], str(item["errno"]))
            out.append(item)
        return out

    def mark_interrupted(self) -> None:
        rows = self.sr.db.execute("SELECT id, pid FROM imports WHERE state = 'running'").fetchall()
        for import_id, pid in rows:
            try:
                os.kill(pid, 0)
                continue  # still running somewhere
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # alive, another user's
            with self.sr.transaction() as db:
                db.execute(
                    "UPDATE imports SET state = 'failed', errno = ?, error = ?"
                    " WHERE id = ? AND state = 'running'",
                    (errno_module.EIO, f"interrupted: {self.interrupted}", import_id),
                )


class ImportJournal:
    """A SQLite file of a backend's own on the backup host: the ``imports`` table, and
    the digests of its snapshots' files (one connection per thread)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self._local = threading.local()
        self.db.execute(IMPORTS_TABLE)
        self.db.execute(DIGESTS_TABLE)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(imports)")}
        if "sha256" not in columns:  # a journal made by an earlier vdifs
            self.db.execute("ALTER TABLE imports ADD COLUMN sha256 TEXT")

    @property
    def db(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            self._local.conn = conn
        return conn

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return write_transaction(self.db)
