"""Writes answered at once and stored behind the reply, in order.

``cp`` waits for each write's reply before it sends the next megabyte.  If
the daemon hashed and stored each megabyte before replying, receiving and
storing would take turns on one core.  A :class:`WritePipeline` instead
queues the bytes, replies, and lets one background task store them in a
worker thread (one thread hop per batch), so the next megabyte is received
while the last one is hashed.

What this costs the semantics is only *when* an error is seen: a write
that fails in the background fails the next write and, at the latest,
``close()`` (through :meth:`settle`), which is where an import's outcome is
reported anyway.  Every other use of the file (read, truncate, stat, close,
rename) settles first, so it sees every write before it.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

DEPTH = 8  # writes in flight per file: at most 8 MiB of memory (1 MiB FUSE writes)


class WritePipeline:
    def __init__(
        self,
        store: Callable[[int, bytes], None],
        nursery: trio.Nursery,
        limiter: trio.CapacityLimiter,
    ) -> None:
        self._store = store
        self._limiter = limiter
        self._send, self._receive = trio.open_memory_channel[tuple[int, bytes]](DEPTH)
        self._pending = 0
        self._idle = trio.Event()
        self._idle.set()
        self.error: BaseException | None = None
        nursery.start_soon(self._run)

    async def write(self, offset: int, data: bytes) -> None:
        """Queue a write (waits only while DEPTH writes are in flight)."""
        self.raise_error()
        if self._pending == 0:
            self._idle = trio.Event()
        self._pending += 1
        await self._send.send((offset, data))

    async def settle(self) -> None:
        """Wait until every queued write is stored; raise the first error."""
        await self._idle.wait()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """No more writes: the background task ends once the queue is empty."""
        self._send.close()

    async def _run(self) -> None:
        async with self._receive:
            async for item in self._receive:
                batch = [item]
                while True:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                if self.error is None:
                    try:
                        await trio.to_thread.run_sync(self._store_all, batch, limiter=self._limiter)
                    except Exception as exc:  # answered at the next write or at close
                        self.error = exc
                self._pending -= len(batch)
                if self._pending == 0:
                    self._idle.set()

    def _store_all(self, batch: list[tuple[int, bytes]]) -> None:
        for offset, data in batch:
            self._store(offset, data)
