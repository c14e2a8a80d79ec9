"""Handback: futures finished on another thread reach their awaiting coroutines, one wake-up per burst."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any

import pytest

from blobstore.server.handback import Handback


def _on_thread(fn: Any) -> None:
    thread = threading.Thread(target=fn)
    thread.start()
    thread.join()


def test_results_and_exceptions_reach_their_own_waiters() -> None:
    async def main() -> list[Any]:
        handback = Handback(asyncio.get_running_loop())
        futures: list[Future[int]] = [Future() for _ in range(20)]
        waits = [asyncio.ensure_future(handback.wait(future)) for future in futures]
        await asyncio.sleep(0)

        def finish() -> None:
            for number, future in enumerate(futures):
                if number % 5 == 0:
                    future.set_exception(ValueError(number))
                else:
                    future.set_result(number * 10)

        _on_thread(finish)
        return await asyncio.gather(*waits, return_exceptions=True)

    outcomes = asyncio.run(main())
    for number, outcome in enumerate(outcomes):
        if number % 5 == 0:
            assert isinstance(outcome, ValueError) and outcome.args == (number,)
        else:
            assert outcome == number * 10


def test_a_burst_of_finished_futures_wakes_the_loop_once() -> None:
    async def main() -> tuple[list[int], int]:
        loop = asyncio.get_running_loop()
        wakeups = 0
        call_soon_threadsafe = loop.call_soon_threadsafe

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal wakeups
            wakeups += 1
            return call_soon_threadsafe(*args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[assignment]
        handback = Handback(loop)
        futures: list[Future[int]] = [Future() for _ in range(50)]
        waits = [asyncio.ensure_future(handback.wait(future)) for future in futures]
        await asyncio.sleep(0)

        def finish() -> None:
            for number, future in enumerate(futures):
                future.set_result(number)

        _on_thread(finish)  # the loop is not running while the thread finishes them all
        results = await asyncio.gather(*waits)
        # A later burst needs a wake-up of its own.
        later: Future[int] = Future()
        wait_later = asyncio.ensure_future(handback.wait(later))
        await asyncio.sleep(0)
        _on_thread(lambda: later.set_result(99))
        assert await wait_later == 99
        return results, wakeups

    results, wakeups = asyncio.run(main())
    assert results == list(range(50))
    assert wakeups == 2


def test_cancelling_the_caller_cancels_work_not_started() -> None:
    async def main() -> Future[int]:
        handback = Handback(asyncio.get_running_loop())
        future: Future[int] = Future()
        waiting = asyncio.ensure_future(handback.wait(future))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return future

    future = asyncio.run(main())
    assert future.cancelled()


def test_a_future_finished_after_its_loop_closed_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    future: Future[int] = Future()

    async def main() -> None:
        handback = Handback(asyncio.get_running_loop())
        waiting = asyncio.ensure_future(handback.wait(future))
        await asyncio.sleep(0)
        future.set_running_or_notify_cancel()  # running: cancelling the caller cannot stop it
        waiting.cancel()

    asyncio.run(main())
    future.set_result(1)  # no loop to wake: nothing raises, nothing is logged
    assert future.result() == 1
    assert not [record for record in caplog.records if record.levelname == "ERROR"]
