"""The embedded SR's record of import attempts (the ``imports`` table)."""

from __future__ import annotations

import errno as errno_module
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from vdifs.model import safe_text, utc_iso

if TYPE_CHECKING:
    from vdifs.storage.local.sr import LocalSR

log = logging.getLogger(__name__)

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
)


class LocalImportLog:
    """Implements :class:`vdifs.storage.backend.ImportLog` in the SR's database."""

    def __init__(self, sr: LocalSR) -> None:
        self.sr = sr

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
            if item["notes"] is None:
                del item["notes"]
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
                    (
                        errno_module.EIO,
                        "interrupted: the process running it stopped; nothing was applied",
                        import_id,
                    ),
                )
