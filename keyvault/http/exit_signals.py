"""The server's stop signals, seen by the application as well as by uvicorn.

uvicorn's graceful shutdown waits for every request in flight and tells the application
nothing until they are all done: a long-poll (``GET /v1/events?wait=``) would hold it up
to its deadline. While the lifespan runs, SIGINT and SIGTERM first tell the application
(``ServerState.stop_waiting``: the long-polls answer at once), then reach the handler that
was there before: uvicorn's, which begins its shutdown.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def on_stop_signals(callback: Callable[[], None]) -> Iterator[None]:
    """While open, SIGINT or SIGTERM calls ``callback`` on the running event loop (never in
    the signal handler itself: it may have interrupted the loop holding a lock), then the
    handler that was there before. Off the main thread (an embedding, a TestClient) no
    signal can be caught there: nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(callback)
        before = previous[signum]
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:  # nobody else handles it: what it would have done
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    for stop in STOP_SIGNALS:
        previous[stop] = signal.signal(stop, handler)
    try:
        yield
    finally:
        for signum, before in previous.items():
            if signal.getsignal(signum) is handler and before is not None:
                signal.signal(signum, before)
