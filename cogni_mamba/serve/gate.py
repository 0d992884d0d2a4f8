"""Admission control: at most `max_running` generations at once, a first-come-first-served queue of at
most `max_waiting` behind them, and an immediate refusal beyond that.

Runs on the event loop (not thread-safe by design: only coroutines touch it). A waiter that goes away
(its client disconnected) leaves the queue without taking a slot.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator


class ServerBusy(Exception):
    """Every slot is taken and the queue is full."""


class Gate:
    """A fair (FIFO) counting semaphore with a bounded queue."""

    def __init__(self, max_running: int, max_waiting: int):
        if max_running < 1 or max_waiting < 0:
            raise ValueError("max_running must be >= 1 and max_waiting >= 0")
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        """Take a slot, waiting in line for one; ServerBusy when the line is full."""
        if self.running < self.max_running and not self._waiters:
            self.running += 1
            return
        if len(self._waiters) >= self.max_waiting:
            raise ServerBusy(f"The server is busy: {self.running} requests are generating and "
                             f"{len(self._waiters)} are queued (the limit); retry in a moment.")
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # release() hands its slot over by resolving this future
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot arrived just as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):  # release() may already have dropped it
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Give a slot back, handing it straight to the longest-waiting request if there is one."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # `running` stays the same: the slot changes hands
                return
        self.running -= 1

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """`async with gate.slot():` holds a slot for the block."""
        await self.acquire()
        try:
            yield
        finally:
            self.release()
