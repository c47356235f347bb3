"""The clients' HTTP (httpcore, p2pnn/client/_http.py): what goes on the wire and how answers and failures map.

Against a real in-process node; each scenario runs with AsyncClient (trio) and
with Client (in a worker thread, as a blocking call must not stall the node's
event loop).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
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


def test_target_encodes_path_and_query_as_httpx_did():
    params = {"owner": ODD_OWNER, "flag": True, "off": False, "none": None, "limit": 3, "state": ["pending", "running"]}
    url = Endpoint("http://node.example:3030/base/", None, 5.0).target("/api/v1/tasks/a b#c", params)
    assert (url.scheme, url.host, url.port) == (b"http", b"node.example", 3030)
    path, _, query = url.target.decode().partition("?")
    assert path == "/base/api/v1/tasks/a%20b%23c"
    assert query == str(httpx.QueryParams(params))
    assert Endpoint("http://node.example", None, 5.0).target("/health").target == b"/health"


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
    assert (proxy.url.scheme, proxy.url.host, proxy.url.port, proxy.auth) == (b"http", b"proxy.lan", 3128, (b"user", b"pw"))
    assert _proxy("https", "node.test:3030") is None
    monkeypatch.setenv("NO_PROXY", "localhost,node.test")
    assert _proxy("http", "node.test:3030") is None


@pytest.mark.parametrize("split", [lambda b: [b], lambda b: [b[i : i + 1] for i in range(len(b))]])
def test_line_splitter_handles_every_line_ending_and_split_characters(split: Callable[[bytes], list[bytes]]):
    stream = "event: task\r\ndata: é€\r\rdata: x\n\n: keep-alive\rtail".encode()
    splitter = LineSplitter()
    lines = [line for chunk in split(stream) for line in splitter.feed(chunk)]
    assert lines == ["event: task", "data: é€", "", "data: x", "", ": keep-alive"]
