"""The clients' HTTP (p2pnn/client/_http.py, _wire.py): what goes on the wire and how answers and failures map.

Against a real in-process node; each scenario runs with AsyncClient (trio) and
with Client (in a worker thread, as a blocking call must not stall the node's
event loop).
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from p2pnn.client import (
    ApiError,
    AsyncClient,
    BadRequest,
    Client,
    Conflict,
    ConnectError,
    Forbidden,
    NotFound,
    Unauthorized,
)
from p2pnn.client._http import Endpoint, _proxy
from p2pnn.client._wire import IDLE_SECONDS
from p2pnn.client._sse import LineSplitter
from p2pnn.node import run_node
from p2pnn.store import open_store
from tests.nodeutil import node_config, token

MAX_BODY = 64 * 1024
WAIT = 60.0  # the node's longest long poll: covers a cold worker start on a busy machine
ODD_OWNER = "a b&c=d/é?"  # a name that is wrong unless the query string is encoded


@pytest.fixture
async def node(nursery, tmp_path):
    data_dir = tmp_path / "node"
    cfg = node_config(data_dir, api={"host": "127.0.0.1", "port": 0, "max_body_bytes": MAX_BODY})
    handle = await nursery.start(run_node, cfg)
    tokens = {role: token(data_dir, role, sub=f"{role}-user") for role in ("viewer", "operator", "admin")}
    tokens["odd"] = token(data_dir, "operator", sub=ODD_OWNER)
    return handle.api_url, data_dir, tokens


async def _both(url: str, tok: str | None, method: str, *args: Any, timeout: float = 30.0, **kwargs: Any) -> list[Any]:
    """``method(*args, **kwargs)`` on AsyncClient, then on Client: each one's answer, or the exception it raised."""
    outcomes: list[Any] = []
    async with AsyncClient(url, tok, timeout=timeout) as client:
        try:
            outcomes.append(await getattr(client, method)(*args, **kwargs))
        except Exception as exc:
            outcomes.append(exc)

    def blocking() -> Any:
        with Client(url, tok, timeout=timeout) as client:
            try:
                return getattr(client, method)(*args, **kwargs)
            except Exception as exc:
                return exc

    outcomes.append(await trio.to_thread.run_sync(blocking))
    return outcomes


def _raised(outcomes: list[Any], kind: type[Exception], status: int | None = None) -> list[Any]:
    for outcome in outcomes:
        assert type(outcome) is kind, outcome
        assert status is None or outcome.status == status
    return outcomes


async def test_a_long_poll_longer_than_the_client_timeout_is_answered(node):
    url, _, tokens = node
    started = time.monotonic()
    done = await _both(url, tokens["operator"], "submit", {"kind": "echo", "payload": 1, "sleep": 2.0},
                       wait=WAIT, timeout=1.0)
    assert [t["state"] for t in done] == ["succeeded", "succeeded"], done
    assert time.monotonic() - started > 2 * 2.0  # each answer came well past the 1 s timeout

    async with AsyncClient(url, tokens["operator"], timeout=1.0) as client:
        task = await client.submit({"kind": "echo", "sleep": 2.0})
    got = await _both(url, tokens["operator"], "get", task["id"], wait=WAIT, timeout=1.0)
    assert [t["state"] for t in got] == ["succeeded", "succeeded"], got


async def test_a_node_that_never_answers_times_out_as_connect_error():
    with socket.socket() as silent:  # the kernel accepts the connection; nobody reads or answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with trio.fail_after(20):
            outcomes = _raised(await _both(url, None, "nodes", timeout=0.5), ConnectError)
        assert time.monotonic() - started < 10
        assert all(str(e).startswith(f"{url}: ") for e in outcomes)


async def test_a_node_not_listening_is_a_connect_error_for_calls_and_event_streams():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: connections are refused
        for outcomes in (await _both(url, "t", "get", "x"), await _both(url, "t", "wait", "x", timeout=5.0)):
            _raised(outcomes, ConnectError)
            assert all(str(e).startswith(f"{url}: ") for e in outcomes), outcomes


async def test_error_statuses_raise_their_api_error(node):
    url, _, tokens = node
    op = tokens["operator"]
    _raised(await _both(url, None, "list"), Unauthorized, 401)
    _raised(await _both(url, "not-a-token", "list"), Unauthorized, 401)
    _raised(await _both(url, tokens["viewer"], "submit", {"kind": "echo"}), Forbidden, 403)
    for err in _raised(await _both(url, op, "get", "00000000-0000-0000-0000-000000000000"), NotFound, 404):
        assert err.error == "no such task"
    bad = {"kind": "train", "model": {"name": "mlp"}, "dataset": {"name": "digits"}, "lr": -1}
    for err in _raised(await _both(url, op, "submit", bad), BadRequest, 400):
        assert err.field == "spec.lr" and str(err).startswith("HTTP 400: ")
    _raised(await _both(url, op, "submit", {"kind": "echo", "payload": "x" * MAX_BODY}), BadRequest, 413)
    _raised(await _both(url, op, "_call", "PUT", "/api/v1/tasks"), ApiError, 405)

    # The Idempotency-Key header goes out: the same key and body are one task, another body a conflict.
    first, again = await _both(url, op, "submit", {"kind": "echo", "payload": 1}, idempotency_key="k-1")
    assert first["id"] == again["id"]
    _raised(await _both(url, op, "submit", {"kind": "echo", "payload": 2}, idempotency_key="k-1"), Conflict, 409)


async def test_list_filters_and_cursor_reach_the_node_encoded(node):
    url, _, tokens = node
    async with AsyncClient(url, tokens["odd"]) as odd, AsyncClient(url, tokens["operator"]) as other:
        mine = [(await odd.submit({"kind": "echo", "payload": i}, wait=WAIT))["id"] for i in range(3)]
        await other.submit({"kind": "echo", "payload": "not mine"}, wait=WAIT)
        await odd.submit({"kind": "echo", "payload": "still pending", "sleep": 30})
    filters = {"owner": ODD_OWNER, "kind": "echo", "state": "succeeded", "limit": 2}
    for page in await _both(url, tokens["admin"], "list", **filters):
        assert len(page["tasks"]) == 2 and page["next_cursor"], page
        assert all(t["owner"] == ODD_OWNER and t["state"] == "succeeded" for t in page["tasks"])
        rest = await _both(url, tokens["admin"], "list", **filters, cursor=page["next_cursor"])
        for last in rest:
            assert {t["id"] for t in page["tasks"] + last["tasks"]} == set(mine), last


async def test_artifacts_come_back_byte_for_byte(node):
    url, data_dir, tokens = node
    async with AsyncClient(url, tokens["operator"]) as client:
        task = await client.submit({"kind": "echo"}, wait=WAIT)
    blob = bytes(range(256)) * 8192  # 2 MiB, not UTF-8: many reads, no text decoding
    store = open_store("sqlite", sqlite_path=data_dir / "p2pnn.sqlite3")
    await store.open()
    try:
        await store.put_artifact(task["id"], "weights v2.bin", blob, now=time.time())
    finally:
        await store.close()
    assert await _both(url, tokens["viewer"], "artifact", task["id"], "weights v2.bin") == [blob, blob]
    _raised(await _both(url, tokens["viewer"], "artifact", task["id"], "weights v2.bin?x"), NotFound, 404)


async def test_calls_share_one_kept_alive_connection(node):
    url, _, tokens = node
    async with AsyncClient(url, tokens["viewer"]) as client:
        for _ in range(5):
            await client.nodes()
        assert len(client._http.connections) == 1
    with Client(url, tokens["viewer"]) as blocking:
        for _ in range(5):
            await trio.to_thread.run_sync(blocking.nodes)
        assert len(blocking._http.connections) == 1


class Relays:
    """What stands between a client and the node in these tests, on loopback: a TLS front (an
    https node), an HTTP proxy (forwarding, and tunnelling with CONNECT); each pipes bytes on."""

    def __init__(self, nursery: trio.Nursery, node_url: str, tls_dir: Path) -> None:
        self._nursery = nursery
        self.node_port = urllib.parse.urlsplit(node_url).port
        self.cert, key = _self_signed("localhost", tls_dir)
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.load_cert_chain(self.cert, key)
        self.heads: list[bytes] = []  # the head of each request the proxy took
        self.open: list[trio.abc.Stream] = []  # the client side of each piped connection

    async def start(self, handler: Callable[[trio.SocketStream], Any]) -> int:
        listeners = await self._nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        return listeners[0].socket.getsockname()[1]

    async def tls_front(self, stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, self._tls, server_side=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError:
            return  # a client that refused our certificate
        await self._pipe(tls, await trio.open_tcp_stream("127.0.0.1", self.node_port))

    async def proxy(self, stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(65536)
        head, _, rest = head.partition(b"\r\n\r\n")
        self.heads.append(head)
        method, target, version = head.split(b"\r\n")[0].split(b" ")
        if method == b"CONNECT":  # to our TLS front, whatever host it names
            upstream = await trio.open_tcp_stream("127.0.0.1", int(target.rpartition(b":")[2]))
            await stream.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:  # absolute-form: sent on to the node as a request for the path (one per connection here)
            url = urllib.parse.urlsplit(target)
            upstream = await trio.open_tcp_stream("127.0.0.1", url.port)
            first = b" ".join((method, (url.path or b"/") + (b"?" + url.query if url.query else b""), version))
            await upstream.send_all(first + head[head.index(b"\r\n"):] + b"\r\n\r\n" + rest)
        await self._pipe(stream, upstream)

    async def _pipe(self, a: trio.abc.Stream, b: trio.abc.Stream) -> None:
        self.open.append(a)
        async with trio.open_nursery() as nursery:
            async def pump(src: trio.abc.Stream, dst: trio.abc.Stream) -> None:
                try:
                    async for chunk in src:
                        await dst.send_all(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(pump, a, b)
            nursery.start_soon(pump, b, a)
        for stream in (a, b):
            await trio.aclose_forcefully(stream)

    async def cut_all(self) -> None:
        """Close every piped connection, as a server closing its idle connections does."""
        for stream in self.open:
            await trio.aclose_forcefully(stream)


def _self_signed(host: str, where: Path) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    where.mkdir(parents=True, exist_ok=True)
    (where / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (where / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    return str(where / "cert.pem"), str(where / "key.pem")


@pytest.fixture
async def relays(node, nursery, tmp_path, monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
                 "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    relays = Relays(nursery, node[0], tmp_path / "tls")
    monkeypatch.setenv("SSL_CERT_FILE", relays.cert)
    return relays


async def test_an_https_node_is_reached_directly_and_through_a_proxys_tunnel(node, relays, monkeypatch):
    url, _, tokens = node
    https = f"https://localhost:{await relays.start(relays.tls_front)}"
    direct = await _both(url, tokens["viewer"], "cluster")
    assert await _both(https, tokens["viewer"], "cluster") == direct and direct[0]["node_id"]

    monkeypatch.setenv("HTTPS_PROXY", f"http://user:pw@127.0.0.1:{await relays.start(relays.proxy)}")
    seen = len(relays.heads)
    async with AsyncClient(https, tokens["operator"]) as client:
        done = await client.submit({"kind": "echo", "payload": "tunnelled"}, wait=WAIT)
        assert (await client.get(done["id"]))["result"] == {"payload": "tunnelled"}
    assert len(relays.heads) == seen + 1, "two calls, one tunnel"
    for answer in await _both(https, tokens["viewer"], "get", done["id"]):
        assert answer["result"] == {"payload": "tunnelled"}
    connects = relays.heads[seen:]
    assert all(h.startswith(b"CONNECT localhost:") and b"Proxy-Authorization: Basic dXNlcjpwdw==" in h for h in connects)

    monkeypatch.delenv("SSL_CERT_FILE")  # certifi's bundle does not know our certificate
    monkeypatch.delenv("HTTPS_PROXY")
    for refused in _raised(await _both(https, tokens["viewer"], "cluster"), ConnectError):
        assert "CERTIFICATE_VERIFY_FAILED" in str(refused), refused


async def test_an_http_proxy_is_sent_each_request_by_its_absolute_url(node, relays, monkeypatch):
    url, _, tokens = node
    monkeypatch.setenv("HTTP_PROXY", f"http://someone:secret@127.0.0.1:{await relays.start(relays.proxy)}")
    answers = await _both(url.replace("127.0.0.1", "localhost"), tokens["viewer"], "list", limit=1)
    assert answers[0] == answers[1] and "tasks" in answers[0]
    port = urllib.parse.urlsplit(url).port
    for head in relays.heads:
        assert head.startswith(f"GET http://localhost:{port}/api/v1/tasks?limit=1 HTTP/1.1".encode()), head
        assert b"Proxy-Authorization: Basic c29tZW9uZTpzZWNyZXQ=" in head
    assert len(relays.heads) == 2


async def test_a_kept_alive_connection_the_server_closed_is_not_used_again(node, relays):
    _, _, tokens = node
    https = f"https://localhost:{await relays.start(relays.tls_front)}"
    async with AsyncClient(https, tokens["viewer"]) as client:
        with Client(https, tokens["viewer"]) as blocking:
            await client.nodes()
            await trio.to_thread.run_sync(blocking.nodes)
            (kept,), (kept_blocking,) = client._http.connections, blocking._http.connections
            await relays.cut_all()
            await trio.sleep(0.1)  # the close reaches the clients' sockets
            await client.nodes()  # on a new connection, not a failure on the closed one
            await trio.to_thread.run_sync(blocking.nodes)
            assert client._http.connections[0] is not kept and blocking._http.connections[0] is not kept_blocking
            assert len(relays.open) == 4


def test_an_idle_connection_is_dropped_once_the_server_may_be_closing_it(monkeypatch):
    """The node's server closes a connection idle for 5 s: one idle that long is not used again."""
    from p2pnn.client import _wire

    idle: _wire._Idle[str] = _wire._Idle()
    assert idle.give("old") is None and idle.give("new") is None
    clock = time.monotonic()
    monkeypatch.setattr(_wire.time, "monotonic", lambda: clock + IDLE_SECONDS / 2)
    assert next(idle.take()) == ("new", True)
    monkeypatch.setattr(_wire.time, "monotonic", lambda: clock + IDLE_SECONDS + 0.1)
    assert list(idle.take()) == [("old", False)]
    for i in range(_wire.MAX_IDLE):
        assert idle.give(i) is None
    assert idle.give("one more") == 0, "the oldest is let go"


def test_target_encodes_path_and_query_as_httpx_did():
    params = {"owner": ODD_OWNER, "flag": True, "off": False, "none": None, "limit": 3, "state": ["pending", "running"]}
    endpoint = Endpoint("http://node.example:3030/base/", None, 5.0)
    route = endpoint.route()
    assert (route.connect_host, route.connect_port, route.tls, route.prefix) == ("node.example", 3030, None, b"")
    path, _, query = endpoint.target("/api/v1/tasks/a b#c", params).decode().partition("?")
    assert path == "/base/api/v1/tasks/a%20b%23c"
    assert query == str(httpx.QueryParams(params))
    assert Endpoint("http://node.example", None, 5.0).target("/health") == b"/health"
    assert Endpoint("http://node.example", None, 5.0).route().connect_port == 80


def test_a_bad_node_url_is_a_client_error_not_a_crash():
    from p2pnn.client import ClientError

    with pytest.raises(ClientError, match="invalid node URL"):
        Client("http://node:port")


def test_proxy_comes_from_the_environment_unless_no_proxy_names_the_node(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert _proxy("http", "node.test:3030") is None
    monkeypatch.setenv("HTTP_PROXY", "user:pw@proxy.lan:3128")
    proxy = _proxy("http", "node.test:3030")
    assert proxy == ("proxy.lan", 3128, ("user", "pw"))
    assert _proxy("https", "node.test:3030") is None
    monkeypatch.setenv("NO_PROXY", "localhost,node.test")
    assert _proxy("http", "node.test:3030") is None


@pytest.mark.parametrize("split", [lambda b: [b], lambda b: [b[i : i + 1] for i in range(len(b))]])
def test_line_splitter_handles_every_line_ending_and_split_characters(split: Callable[[bytes], list[bytes]]):
    stream = "event: task\r\ndata: é€\r\rdata: x\n\n: keep-alive\rtail".encode()
    splitter = LineSplitter()
    lines = [line for chunk in split(stream) for line in splitter.feed(chunk)]
    assert lines == ["event: task", "data: é€", "", "data: x", "", ": keep-alive"]
