"""HTTP/1.1 for both clients: h11's framing over a socket (``Client``) or an anyio stream (``AsyncClient``).

A pool here is a stack of kept-alive connections to one node (or to the proxy in
front of it); a request takes one, or opens one, and gives it back once its
answer was read to the end. h11 does the framing (Content-Length, chunked
bodies, keep-alive); each pool does only the I/O. A short call costs the client
about two thirds of what httpcore's pools took (async ``GET /health``: 0.58
against 0.90 ms of CPU; ``submit(wait=)``: 0.88 against 1.32 ms, on the 2-core
development machine), and a sequential client sees all of it in its round trip.

Error handling: every way of getting no complete answer is a TransportError:
ConnectFailed (no connection, or the proxy refused its tunnel), SendFailed, or
ReadFailed (the answer broke off, was not HTTP, or stayed silent past the read
timeout). Nothing else escapes but the caller's own cancellation.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio
import anyio.abc
import h11
from anyio.streams.tls import TLSStream

READ_SIZE = 65536
# Kept-alive connections a pool holds, and for how long: the node's server (hypercorn) closes an
# idle one after 5 s, and one it is closing must not carry the next request.
MAX_IDLE = 20
IDLE_SECONDS = 5.0
MAX_PROXY_ANSWER = 64 * 1024  # the head of a proxy's answer to CONNECT


class TransportError(Exception):
    """No complete answer came: the node, the proxy or the network failed."""


class ConnectFailed(TransportError):
    pass


class SendFailed(TransportError):
    pass


class ReadFailed(TransportError):
    """The answer broke off, was not HTTP, or stayed silent past the read timeout."""


@dataclass(frozen=True)
class Timeouts:
    connect: float
    read: float
    write: float


@dataclass(frozen=True)
class Route:
    """Where a pool's connections go, and what each request adds to reach the node through them.

    ``tunnel``: a CONNECT request sent first (an https node behind a proxy); ``prefix``: put
    before each request's target (``http://node:port`` when a proxy forwards the request);
    ``headers``: added to each request (the proxy's credentials, when it forwards)."""

    connect_host: str
    connect_port: int
    tls: ssl.SSLContext | None = None
    server_name: str = ""
    tunnel: bytes | None = None
    prefix: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    refused: str | None = None  # why no connection can be made (an unsupported scheme): ConnectFailed at each request


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    content: bytes = b""


def _request_bytes(conn: h11.Connection, route: Route, method: str, target: bytes,
                   headers: list[tuple[bytes, bytes]], body: bytes | None) -> bytes:
    if conn.our_state is h11.DONE:
        conn.start_next_cycle()
    headers = headers + list(route.headers)
    if body is not None:
        headers.append((b"Content-Length", b"%d" % len(body)))
    data = conn.send(h11.Request(method=method, target=route.prefix + target, headers=headers)) or b""
    if body:
        data += conn.send(h11.Data(data=body)) or b""
    return data + (conn.send(h11.EndOfMessage()) or b"")


def _event(conn: h11.Connection) -> Any:
    """h11's next event: NEED_DATA, or what the bytes fed so far hold."""
    try:
        return conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise ReadFailed(f"the answer is not HTTP/1.1: {exc}") from None


def _reusable(conn: h11.Connection) -> bool:
    return conn.our_state is h11.DONE and conn.their_state is h11.DONE


def _tunnel_answer(head: bytes) -> None:
    """Check a proxy's answer to CONNECT. Error handling: ConnectFailed unless it is a 2xx."""
    status_line = head.split(b"\r\n", 1)[0]
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].startswith(b"2"):
        raise ConnectFailed(f"the proxy refused the tunnel: {status_line.decode('latin-1')!r}")


def _closed_or_readable(sock: socket.socket | None) -> bool:
    """Whether a kept-alive connection's socket has something to read (the server's close, as a
    rule) or is gone: either way it cannot carry another request."""
    if sock is None or sock.fileno() < 0:
        return True
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


C = TypeVar("C")


@dataclass
class _Idle(Generic[C]):
    """The kept-alive connections of a pool, the newest last; each with when it went idle."""

    connections: list[tuple[C, float]] = field(default_factory=list)

    def take(self) -> Iterator[tuple[C, bool]]:
        """Idle connections, newest first: (connection, whether it may carry a request). The caller
        closes those that may not, and stops at the first that may."""
        while True:
            try:
                conn, since = self.connections.pop()  # atomic: a blocking client may be shared by threads
            except IndexError:
                return
            yield conn, time.monotonic() - since < IDLE_SECONDS

    def give(self, conn: C) -> C | None:
        """Keep ``conn``; the connection that no longer fits (to be closed), if any."""
        self.connections.append((conn, time.monotonic()))
        if len(self.connections) > MAX_IDLE:
            try:
                return self.connections.pop(0)[0]
            except IndexError:  # taken meanwhile by another thread
                return None
        return None


# --- blocking ---


class _SyncConnection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.h11 = h11.Connection(h11.CLIENT)

    def send(self, data: bytes, timeout: float) -> None:
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(data)
        except OSError as exc:
            raise SendFailed(f"sending the request failed: {exc or type(exc).__name__}") from exc

    def event(self, timeout: float) -> Any:
        while (ev := _event(self.h11)) is h11.NEED_DATA:
            try:
                self.sock.settimeout(timeout)
                data = self.sock.recv(READ_SIZE)
            except TimeoutError:
                raise ReadFailed(f"no answer within {timeout:g} s") from None
            except OSError as exc:
                raise ReadFailed(f"reading the answer failed: {exc or type(exc).__name__}") from exc
            self.h11.receive_data(data)
        return ev

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class SyncStream:
    """An answer whose body is read as it comes: ``iter_stream()``, or all of it with ``read()``."""

    def __init__(self, conn: _SyncConnection, head: h11.Response, read_timeout: float) -> None:
        self.status, self.headers, self.content = head.status_code, list(head.headers), b""
        self._conn, self._timeout, self.complete = conn, read_timeout, False

    def iter_stream(self) -> Iterator[bytes]:
        while not self.complete:
            ev = self._conn.event(self._timeout)
            if isinstance(ev, h11.Data):
                yield bytes(ev.data)
            elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                self.complete = True

    def read(self) -> bytes:
        self.content = b"".join(self.iter_stream())
        return self.content


class SyncPool:
    """Kept-alive connections to one route, for blocking calls (from any thread: a connection is
    held by one request at a time, and the stack's pop and append are atomic)."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self._idle: _Idle[_SyncConnection] = _Idle()

    @property
    def connections(self) -> list[_SyncConnection]:
        """The kept-alive connections, idle now."""
        return [conn for conn, _ in self._idle.connections]

    def request(self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes | None,
                timeouts: Timeouts) -> Response:
        with self.stream(method, target, headers, timeouts, body=body) as answer:
            answer.read()
        return Response(answer.status, answer.headers, answer.content)

    @contextmanager
    def stream(self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], timeouts: Timeouts, *,
               body: bytes | None = None) -> Iterator[SyncStream]:
        conn = self._connection(timeouts.connect)
        answer: SyncStream | None = None
        try:
            conn.send(_request_bytes(conn.h11, self.route, method, target, headers, body), timeouts.write)
            while not isinstance(head := conn.event(timeouts.read), h11.Response):
                if not isinstance(head, h11.InformationalResponse):
                    raise ReadFailed("the server closed the connection without answering")
            answer = SyncStream(conn, head, timeouts.read)
            yield answer
        finally:
            if answer is not None and answer.complete and _reusable(conn.h11):
                if (extra := self._idle.give(conn)) is not None:
                    extra.close()
            else:
                conn.close()

    def close(self) -> None:
        for conn, _ in self._idle.take():
            conn.close()

    def _connection(self, timeout: float) -> _SyncConnection:
        for conn, fresh in self._idle.take():
            if fresh and not _closed_or_readable(conn.sock):
                return conn
            conn.close()
        route = self.route
        if route.refused:
            raise ConnectFailed(route.refused)
        try:
            sock = socket.create_connection((route.connect_host, route.connect_port), timeout=timeout)
        except OSError as exc:
            raise ConnectFailed(f"cannot connect: {exc or type(exc).__name__}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if route.tunnel is not None:
                sock.sendall(route.tunnel)
                head = b""
                while b"\r\n\r\n" not in head and len(head) < MAX_PROXY_ANSWER:
                    if not (data := sock.recv(READ_SIZE)):
                        raise ConnectFailed("the proxy closed the connection")
                    head += data
                _tunnel_answer(head)
            if route.tls is not None:
                sock = route.tls.wrap_socket(sock, server_hostname=route.server_name)
        except OSError as exc:
            sock.close()
            raise ConnectFailed(f"cannot connect: {exc or type(exc).__name__}") from exc
        except ConnectFailed:
            sock.close()
            raise
        return _SyncConnection(sock)


# --- asyncio or trio, through anyio ---


_ASYNC_IO_ERRORS = (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream)


class _AsyncConnection:
    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.sock: socket.socket | None = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
        self.h11 = h11.Connection(h11.CLIENT)

    async def send(self, data: bytes, timeout: float) -> None:
        try:
            with anyio.fail_after(timeout):
                await self.stream.send(data)
        except TimeoutError:
            raise SendFailed(f"the request was not taken within {timeout:g} s") from None
        except _ASYNC_IO_ERRORS as exc:
            raise SendFailed(f"sending the request failed: {exc or type(exc).__name__}") from exc

    async def event(self, timeout: float) -> Any:
        while (ev := _event(self.h11)) is h11.NEED_DATA:
            try:
                with anyio.fail_after(timeout):
                    data = await self.stream.receive(READ_SIZE)
            except anyio.EndOfStream:
                data = b""
            except TimeoutError:
                raise ReadFailed(f"no answer within {timeout:g} s") from None
            except _ASYNC_IO_ERRORS as exc:
                raise ReadFailed(f"reading the answer failed: {exc or type(exc).__name__}") from exc
            self.h11.receive_data(data)
        return ev

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self.stream.aclose()
            except _ASYNC_IO_ERRORS:
                pass


class AsyncStream:
    """An answer whose body is read as it comes: ``aiter_stream()``, or all of it with ``aread()``."""

    def __init__(self, conn: _AsyncConnection, head: h11.Response, read_timeout: float) -> None:
        self.status, self.headers, self.content = head.status_code, list(head.headers), b""
        self._conn, self._timeout, self.complete = conn, read_timeout, False

    async def aiter_stream(self) -> AsyncIterator[bytes]:
        while not self.complete:
            ev = await self._conn.event(self._timeout)
            if isinstance(ev, h11.Data):
                yield bytes(ev.data)
            elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                self.complete = True

    async def aread(self) -> bytes:
        self.content = b"".join([chunk async for chunk in self.aiter_stream()])
        return self.content


class AsyncPool:
    """Kept-alive connections to one route, for one event loop."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self._idle: _Idle[_AsyncConnection] = _Idle()

    @property
    def connections(self) -> list[_AsyncConnection]:
        """The kept-alive connections, idle now."""
        return [conn for conn, _ in self._idle.connections]

    async def request(self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes | None,
                      timeouts: Timeouts) -> Response:
        async with self.stream(method, target, headers, timeouts, body=body) as answer:
            await answer.aread()
        return Response(answer.status, answer.headers, answer.content)

    @asynccontextmanager
    async def stream(self, method: str, target: bytes, headers: list[tuple[bytes, bytes]], timeouts: Timeouts, *,
                     body: bytes | None = None) -> AsyncIterator[AsyncStream]:
        conn = await self._connection(timeouts.connect)
        answer: AsyncStream | None = None
        try:
            await conn.send(_request_bytes(conn.h11, self.route, method, target, headers, body), timeouts.write)
            while not isinstance(head := await conn.event(timeouts.read), h11.Response):
                if not isinstance(head, h11.InformationalResponse):
                    raise ReadFailed("the server closed the connection without answering")
            answer = AsyncStream(conn, head, timeouts.read)
            yield answer
        finally:
            if answer is not None and answer.complete and _reusable(conn.h11):
                if (extra := self._idle.give(conn)) is not None:
                    await extra.close()
            else:
                await conn.close()

    async def aclose(self) -> None:
        for conn, _ in self._idle.take():
            await conn.close()

    async def _connection(self, timeout: float) -> _AsyncConnection:
        for conn, fresh in self._idle.take():
            if fresh and not _closed_or_readable(conn.sock):
                return conn
            await conn.close()
        route = self.route
        if route.refused:
            raise ConnectFailed(route.refused)
        stream: anyio.abc.ByteStream | None = None
        try:
            with anyio.fail_after(timeout):
                stream = await anyio.connect_tcp(route.connect_host, route.connect_port)
                if route.tunnel is not None:
                    await stream.send(route.tunnel)
                    head = b""
                    while b"\r\n\r\n" not in head and len(head) < MAX_PROXY_ANSWER:
                        head += await stream.receive(READ_SIZE)
                    _tunnel_answer(head)
                if route.tls is not None:
                    stream = await TLSStream.wrap(stream, hostname=route.server_name, ssl_context=route.tls,
                                                  standard_compatible=False)
            return _AsyncConnection(stream)
        except BaseException as exc:
            if stream is not None:
                await _AsyncConnection(stream).close()
            if isinstance(exc, TimeoutError):
                raise ConnectFailed(f"no connection within {timeout:g} s") from None
            if isinstance(exc, _ASYNC_IO_ERRORS):
                raise ConnectFailed(f"cannot connect: {exc or type(exc).__name__}") from exc
            raise
