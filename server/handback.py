"""Results of work done on other threads, handed to the event loop with one wake-up per burst.

asyncio.wrap_future wakes the loop once per future: a write to the loop's self-pipe from the
finishing thread, a read and a loop iteration on the other side, and two callbacks chained
under the futures' locks. The index writer finishes a whole group of commits at once, so the
loop was woken once per request for work that was done together. A Handback queues finished
futures and wakes the loop once for all those that finish before it runs.
"""

from __future__ import annotations

import asyncio
import collections
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class Handback:
    """Awaits concurrent futures from one event loop."""

    __slots__ = ("_finished", "_scheduled", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._finished: collections.deque[tuple[asyncio.Future[Any], Future[Any]]] = collections.deque()
        self._scheduled = False

    async def wait(self, future: Future[T]) -> T:
        """The future's result (or exception), like `await asyncio.wrap_future(future)`: cancelling
        the caller cancels the future too if it has not started."""
        waiter: asyncio.Future[T] = self.loop.create_future()
        future.add_done_callback(lambda done: self._finish(waiter, done))
        try:
            return await waiter
        except asyncio.CancelledError:
            future.cancel()
            raise

    def _finish(self, waiter: asyncio.Future[Any], done: Future[Any]) -> None:
        """On the thread that finished `done`."""
        self._finished.append((waiter, done))
        # Cleared by _deliver before it drains the queue: a future queued after the clearing
        # schedules another delivery, one queued before it is drained by this one.
        if not self._scheduled:
            self._scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _deliver(self) -> None:
        """On the loop."""
        self._scheduled = False
        finished = self._finished
        while finished:
            waiter, done = finished.popleft()
            if waiter.cancelled():
                continue
            if done.cancelled():
                waiter.cancel()
                continue
            failure = done.exception()
            if failure is None:
                waiter.set_result(done.result())
            else:
                waiter.set_exception(failure)
