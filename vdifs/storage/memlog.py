"""Import attempts kept in memory, for backends that have nowhere to keep them (a pool).

``import/.status`` of a mount shows the attempts made through that mount; nothing
outlives the process.
"""

from __future__ import annotations

import errno as errno_module
import threading
import time
from typing import Any

from vdifs.model import utc_iso


class MemoryImportLog:
    """Implements :class:`vdifs.storage.backend.ImportLog` in a dict."""

    def __init__(self) -> None:
        self.items: dict[int, dict[str, Any]] = {}
        self.next_id = 1
        self._lock = threading.Lock()

    def start(self, name: str, target: str | None, fmt: str, received: int) -> int:
        with self._lock:
            import_id, self.next_id = self.next_id, self.next_id + 1
        self.items[import_id] = {
            "id": import_id,
            "name": name,
            "target": target,
            "format": fmt,
            "state": "running",
            "error": None,
            "errno": None,
            "bytes_received": received,
            "chunks_applied": 0,
            "started": utc_iso(time.time_ns()),
            "finished": None,
            "seconds": None,
        }
        return import_id

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
        item = self.items[import_id]
        item.update(state=state, error=error, errno=errno or None, chunks_applied=chunks)
        item.update(finished=utc_iso(time.time_ns()), seconds=seconds)
        if target is not None:
            item["target"] = target
        if received is not None:
            item["bytes_received"] = received
        if notes is not None:
            item["notes"] = notes
        if errno:
            item["errno_name"] = errno_module.errorcode.get(errno, str(errno))

    def forget(self, import_id: int) -> None:
        self.items.pop(import_id, None)

    def recent(self, limit: int) -> list[dict[str, Any]]:
        return [dict(self.items[i]) for i in sorted(self.items, reverse=True)[:limit]]

    def mark_interrupted(self) -> None:
        pass  # nothing outlives the process
