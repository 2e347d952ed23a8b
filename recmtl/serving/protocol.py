"""The HTTP connection of ``recmtl serve``: uvicorn's httptools protocol with the limits uvicorn does not have.

uvicorn bounds neither the size nor the arrival time of a request head (httptools buffers a header of any
size, and a socket that sends one byte at a time is kept forever), nor how long a client may leave our
responses unread. ``GuardedProtocol`` adds, per connection (limits from ``ServeOptions``):

* a request head (request line and headers) larger than ``max_header_bytes`` is answered 431 and closed;
* a head not complete ``read_timeout_s`` after the connection opened or the request's first byte is answered
  408 and closed (the body's time is the app's: ``recmtl.serving.app``; the rest of a body the app answered
  without reading gets ``read_timeout_s`` too);
* requests on more than ``max_connections`` open connections are answered 503 with ``Retry-After``;
* a connection whose reader leaves our writes unread for ``read_timeout_s`` (the write buffer stays over its
  high-water mark, or data is still unsent when the connection should close) is dropped.

The answers are JSON ``{"error": ...}`` like the app's. Selected by ``recmtl.serving.app.serve`` as uvicorn's
``http`` protocol class; the limits come from the ``RECMTL_SERVE_*`` variables, as the app's do.
"""
from __future__ import annotations

import asyncio
import http
from functools import cache
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from recmtl.serving.app import ServeOptions


@cache
def _options() -> ServeOptions:
    return ServeOptions.from_env()


def _response(status: int, message: str, extra: bytes = b"") -> bytes:
    body = orjson.dumps({"error": message})
    return (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n").encode() + extra + b"\r\n" + body


class GuardedProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with bounded request heads, head read time, connections and unread writes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.options = _options()
        self.served_app = self.app
        self.in_head = False  # between a request's first byte and the end of its headers
        self.head_bytes = 0
        self.head_timer: asyncio.TimerHandle | None = None
        self.write_timer: asyncio.TimerHandle | None = None

    # ---- request heads ---------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_timer()  # the first request's head must come within read_timeout_s

    def data_received(self, data: bytes) -> None:
        was_in_head = self.in_head
        super().data_received(data)
        # a head still incomplete after this read: count the read (the read that began the head is not
        # counted, it may hold the previous request's body: the bound is max_header_bytes + one read)
        if self.in_head and was_in_head and not self.transport.is_closing():
            self.head_bytes += len(data)
            if self.head_bytes > self.options.max_header_bytes:
                self._refuse(431, f"request head larger than {self.options.max_header_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_head, self.head_bytes = True, 0
        if self.head_timer is None:
            self._start_head_timer()

    def on_headers_complete(self) -> None:
        self.in_head = False
        self._cancel(self.head_timer)
        self.head_timer = None
        # uvicorn starts self.app for this request
        self.app = _busy if len(self.connections) > self.options.max_connections else self.served_app
        super().on_headers_complete()

    def _start_head_timer(self) -> None:
        self._cancel(self.head_timer)
        self.head_timer = self.loop.call_later(self.options.read_timeout_s, self._head_timed_out)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle is not None and self.cycle.more_body and not self.transport.is_closing():
            self._start_head_timer()  # answered before its body was read: the rest must come in time too

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:  # a pipelined head behind a request
            self.cycle.keep_alive = False  # closed once that response is sent
            return
        if self.cycle is not None and self.cycle.more_body:  # the body of a request already answered
            self.transport.close()
            return
        self._refuse(408, f"request head not received within {self.options.read_timeout_s:g} s")

    def _refuse(self, status: int, message: str) -> None:
        self.in_head = False
        self._cancel(self.head_timer)
        self.head_timer = None
        self.transport.write(_response(status, message))
        self.transport.close()

    # ---- unread responses ------------------------------------------------------------------------------------
    def pause_writing(self) -> None:
        super().pause_writing()
        if self.write_timer is None:
            self.write_timer = self.loop.call_later(self.options.read_timeout_s, self._drop)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel(self.write_timer)
        self.write_timer = None

    def timeout_keep_alive_handler(self) -> None:
        if not self.transport.is_closing() and self.transport.get_write_buffer_size():
            self.transport.abort()  # close() would wait for a reader that does not read
            return
        super().timeout_keep_alive_handler()

    def shutdown(self) -> None:
        super().shutdown()
        if self.transport.is_closing():  # what is still unsent gets read_timeout_s to go out
            self.loop.call_later(self.options.read_timeout_s, self._drop)

    def _drop(self) -> None:
        self.write_timer = None
        if self.transport.get_write_buffer_size() or self.transport.is_closing():
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel(self.head_timer)
        self._cancel(self.write_timer)
        self.head_timer = self.write_timer = None
        super().connection_lost(exc)

    @staticmethod
    def _cancel(timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()


async def _busy(scope: Any, receive: Any, send: Any) -> None:
    """The ASGI answer to a request on a connection over ``max_connections``."""
    limit = _options().max_connections
    body = orjson.dumps({"error": f"server busy: more than {limit} open connections (recmtl serve); retry shortly"})
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
