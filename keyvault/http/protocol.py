"""uvicorn's httptools protocol with a limit on the request head (request line + headers).

httptools has no such limit: a 100 MB ``Authorization`` header would be buffered whole
(+150 MB per request). h11 has one (``h11_max_incomplete_event_size``) but parses in
Python: the key read lost ~40% of its sequential throughput with it. So the fast parser
stays, and the bytes received while a request's head is incomplete are counted here: past
``MAX_HEAD_BYTES`` the request is answered 400 and the connection closed, before more is
read (memory per connection stays bounded by the limit plus one read).
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 16 * 1024


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` refusing a request head over ``MAX_HEAD_BYTES``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0  # received since the current head began (0 between requests)
        self._in_head = True
        self._completed_one = False  # a request ended in this read: its bytes are not the head's

    def data_received(self, data: bytes) -> None:
        self._completed_one = False
        super().data_received(data)
        if not self._in_head or self._completed_one or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            self.logger.warning("request head over %d bytes: refused", MAX_HEAD_BYTES)
            self.send_400_response(f"Request line and headers over {MAX_HEAD_BYTES} bytes.")

    def on_headers_complete(self) -> None:
        self._in_head, self._head_bytes = False, 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        # The next request's head (keep-alive, pipelining) is counted from the next read on:
        # at most one read (asyncio's 256 KiB) more than the limit, never an unbounded buffer.
        self._in_head, self._completed_one = True, True
        super().on_message_complete()
