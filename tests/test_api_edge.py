"""The API's edge against hostile or careless input, on a real node over real sockets.

No input gets a 500 and no request hangs a connection: deep JSON, huge integer
literals, crafted cursors, values already stored that no parser should meet,
refusals before the body arrived, unknown methods, foreign Host headers on an
--insecure node, and the caps on keys, batches and pages.
"""

from __future__ import annotations

import base64
import json
import socket
import sqlite3
from pathlib import Path

import httpx
import pytest
import trio

from p2pnn.api.http import MAX_JSON_DEPTH, TOO_DEEP
from p2pnn.api.routes.tasks import MAX_IDEMPOTENCY_KEY, MAX_PAGE
from p2pnn.node import run_node
from p2pnn.service import MAX_BATCH
from tests.nodeutil import node_config, token

READ_DEADLINE = 20.0  # seconds a raw-socket read may take on a loaded machine before it counts as hung


@pytest.fixture
async def node(nursery, tmp_path):
    data_dir = tmp_path / "node"
    cfg = node_config(data_dir, api={"host": "127.0.0.1", "port": 0, "max_body_bytes": 256 * 1024})
    handle = await nursery.start(run_node, cfg)
    tokens = {role: token(data_dir, role, sub=f"{role}-user") for role in ("viewer", "operator", "admin")}
    return handle, tokens, data_dir


@pytest.fixture
async def raw(node):
    handle, tokens, _ = node
    async with httpx.AsyncClient(base_url=handle.api_url, timeout=30) as http:
        http.headers["Authorization"] = f"Bearer {tokens['admin']}"
        yield http


def nested(depth: int, leaf: object = 1) -> str:
    """JSON text of ``leaf`` inside ``depth`` arrays, built as text so no encoder recurses."""
    return "[" * depth + json.dumps(leaf) + "]" * depth


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert "error" in body and "Traceback" not in resp.text
    return body


# --- nesting depth ---

@pytest.mark.parametrize(
    "route, template",
    [
        ("/api/v1/tasks", "%s"),  # the body itself
        ("/api/v1/tasks", '{"kind": "echo", "payload": %s}'),
        ("/api/v1/tasks", '{"kind": "infer", "model_task": "00000000-0000-0000-0000-000000000000", "inputs": %s}'),
        ("/api/v1/tasks", '[{"kind": "echo"}, {"kind": "echo", "payload": %s}]'),
        ("/tasks", '{"task_data": {"kind": "echo", "payload": %s}}'),
    ],
)
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 491, 600, 5000])
async def test_json_nested_deeper_than_the_cap_is_400(raw, route, template, depth):
    body = _error(await raw.post(route, content=template % nested(depth)), 400)
    assert body["error"] == "JSON nested too deeply"


async def test_nesting_at_the_cap_and_brackets_inside_strings_are_accepted(raw):
    payload = nested(MAX_JSON_DEPTH - 2)  # the spec object and the payload field take the other two levels
    resp = await raw.post("/api/v1/tasks", content='{"kind": "echo", "payload": %s}' % payload)
    assert resp.status_code == 201, resp.text
    text = "[" * 5000 + '\\"' + "{" * 5000  # brackets and an escaped quote inside a string are just text
    resp = await raw.post("/api/v1/tasks", json={"kind": "echo", "payload": text})
    assert resp.status_code == 201, resp.text
    assert resp.json()["spec"]["payload"] == text


# --- huge integer literals ---

@pytest.mark.parametrize(
    "template",
    [
        '{"kind": "echo", "payload": %s}',
        '{"kind": "train", "lr": %s}',
        '{"kind": "train", "epochs": %s}',
        '{"kind": "echo", "payload": {"n": [1, -%s]}}',
    ],
)
async def test_integer_literals_over_4300_digits_are_400(raw, template):
    _error(await raw.post("/api/v1/tasks", content=template % ("9" * 4301)), 400)


@pytest.mark.parametrize("field", ["lr", "weight_decay", "epochs", "seed"])
async def test_integers_too_large_for_a_float_name_the_field(raw, field):
    # Under the literal cap, but far past what a float holds: the spec check says which field.
    resp = await raw.post("/api/v1/tasks", content='{"kind": "train", "%s": %s}' % (field, "9" * 400))
    body = _error(resp, 400)
    assert body["field"] == f"spec.{field}" and len(body["detail"]) < 300


async def test_huge_values_in_inline_data_are_refused_naming_the_element(raw):
    x = "[" + ",".join(["[1, 2]"] * 3 + ["[1, %s]" % ("9" * 400)]) + "]"
    resp = await raw.post("/api/v1/tasks", content='{"kind": "train", "dataset": {"name": "inline", "x": %s, "y": [0, 1, 0, 1]}}' % x)
    assert _error(resp, 400)["field"] == "spec.dataset.x[3][1]"


# --- cursors ---

def b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        b64("[1" + "0" * 400 + ', "00000000-0000-0000-0000-000000000000"]'),  # created_at beyond any float
        b64("[" * 5000 + "]" * 5000),
        b64('[1e999, "00000000-0000-0000-0000-000000000000"]'),  # infinity
        b64("9" * 5000),
        "A" * 10_000,
        b64('{"a": 1}'),
    ],
    ids=["huge-int", "deep", "infinite", "long-int", "long", "object"],
)
@pytest.mark.parametrize("route", ["/api/v1/tasks", "/tasks"])
async def test_crafted_cursors_are_400_on_both_list_routes(raw, route, cursor):
    assert _error(await raw.get(route, params={"cursor": cursor}), 400)["error"] == "invalid cursor"


# --- listing whatever is stored ---

def _store_raw(data_dir: Path, task_id: str, spec_text: str, result_text: str) -> None:
    """Write JSON text straight into the node's SQLite file, as an older version or another tool might have."""
    with sqlite3.connect(data_dir / "p2pnn.sqlite3", timeout=30) as db:
        changed = db.execute("UPDATE tasks SET spec = ?, result = ? WHERE id = ?", (spec_text, result_text, task_id)).rowcount
    assert changed == 1


@pytest.mark.parametrize("depth", [500, 900, 3000])
async def test_listing_survives_deeply_nested_stored_values(node, raw, depth):
    _, _, data_dir = node
    created = await raw.post("/api/v1/tasks", json={"kind": "echo", "payload": "placeholder"})
    task_id = created.json()["id"]
    with trio.fail_after(30):
        while (await raw.get(f"/api/v1/tasks/{task_id}")).json()["state"] != "succeeded":
            await trio.sleep(0.05)
    deep = nested(depth)
    await trio.to_thread.run_sync(
        _store_raw, data_dir, task_id, '{"kind":"echo","payload":%s,"sleep":0.0}' % deep, '{"payload":%s}' % deep
    )
    for route in ("/api/v1/tasks", "/tasks", f"/api/v1/tasks/{task_id}", f"/api/v1/tasks/{task_id}/events"):
        resp = await raw.get(route)
        assert resp.status_code == 200, (route, resp.text[:300])
    listed = [t for t in (await raw.get("/api/v1/tasks")).json()["tasks"] if t["id"] == task_id]
    assert len(listed) == 1 and listed[0]["state"] == "succeeded"
    if depth >= 3000:  # past what any parser's stack holds: shown as a note, never a 500
        assert TOO_DEEP in json.dumps(listed[0]["result"]) or "unreadable" in listed[0]["result"]


# --- a refusal before the body must not hang the connection ---

def _read_response(sock: socket.socket) -> bytes | None:
    """One HTTP response's head and body (Content-Length framed), or None at end of stream."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None if not data else data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _refused_then_next_request(port: int, auth: str | None, size: int = 2000) -> tuple[bytes, bytes | None]:
    """POST headers, read the refusal, then send the body and a GET /health on the same connection.

    Returns the refusal and what came back for the second request: its response,
    or None if the server closed the connection. A hung connection raises TimeoutError.
    """
    body = json.dumps({"kind": "echo", "payload": "x" * size}).encode()
    head = (
        "POST /api/v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + (f"Authorization: Bearer {auth}\r\n" if auth else "")
        + f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=READ_DEADLINE) as sock:
        sock.sendall(head)
        refusal = _read_response(sock)
        assert refusal is not None
        try:
            sock.sendall(body + b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            return refusal, None  # closed: the client knows at once and opens another
        try:
            return refusal, _read_response(sock)
        except ConnectionResetError:
            return refusal, None


@pytest.mark.parametrize("who, size, status", [(None, 2000, 401), ("viewer", 2000, 403), ("operator", 300_000, 413)])
async def test_post_refused_before_its_body_arrived_does_not_hang_the_connection(node, who, size, status):
    handle, tokens, _ = node
    port = int(handle.api_url.rsplit(":", 1)[1])
    refusal, second = await trio.to_thread.run_sync(_refused_then_next_request, port, tokens.get(who), size)
    assert refusal.startswith(f"HTTP/1.1 {status}".encode())
    assert b"connection: close" in refusal.lower()  # said so, then did so
    assert second is None or second.startswith(b"HTTP/1.1 200")
    # and the node still serves new connections
    async with httpx.AsyncClient(base_url=handle.api_url, timeout=30) as http:
        assert (await http.get("/health")).status_code == 200


async def test_keep_alive_carries_on_after_a_request_whose_body_was_read(node):
    handle, tokens, _ = node
    async with httpx.AsyncClient(base_url=handle.api_url, timeout=30) as http:
        http.headers["Authorization"] = f"Bearer {tokens['operator']}"
        bad = await http.post("/api/v1/tasks", content=b"{not json")
        assert bad.status_code == 400 and bad.headers.get("connection") != "close"
        assert (await http.get("/health")).status_code == 200


# --- metrics labels ---

async def test_unknown_methods_do_not_mint_new_metric_series(node):
    handle, _, _ = node
    async with httpx.AsyncClient(base_url=handle.api_url, timeout=30) as http:
        for i in range(5):
            resp = await http.request(f"XYZ{i}", "/health")
            assert 400 <= resp.status_code < 500
        await http.get("/no/such/route")
        metrics = (await http.get("/metrics")).text
    series = [line for line in metrics.splitlines() if line.startswith("p2pnn_http_requests_total{")]
    assert not any("XYZ" in line for line in series), series
    assert any('method="other",route="/health"' in line for line in series) or any('method="other"' in line for line in series)
    assert any('route="unmatched"' in line for line in series)
    assert not any("/no/such/route" in line for line in series)


# --- --insecure and DNS rebinding ---

@pytest.fixture
async def insecure_node(nursery, tmp_path):
    cfg = node_config(tmp_path / "insecure", api={"host": "127.0.0.1", "port": 0, "insecure": True})
    return await nursery.start(run_node, cfg)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example:{port}", "203.0.113.7:{port}",
                                  "localhost.evil.example", "[::1", "127.0.0.1:notaport", ""])
async def test_insecure_node_refuses_foreign_host_headers(insecure_node, host):
    port = insecure_node.api_url.rsplit(":", 1)[1]
    async with httpx.AsyncClient(base_url=insecure_node.api_url, timeout=30) as http:
        for method, path in (("GET", "/api/v1/tasks"), ("POST", "/api/v1/tasks")):
            resp = await http.request(method, path, headers={"Host": host.format(port=port)}, json={"kind": "echo"})
            assert _error(resp, 403)["error"] == "host not allowed"


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST", "[::1]:{port}", "127.0.0.2"])
async def test_insecure_node_answers_loopback_host_headers(insecure_node, host):
    port = insecure_node.api_url.rsplit(":", 1)[1]
    async with httpx.AsyncClient(base_url=insecure_node.api_url, timeout=30) as http:
        resp = await http.get("/api/v1/tasks", headers={"Host": host.format(port=port)})
        assert resp.status_code == 200, resp.text


async def test_a_node_with_tokens_does_not_check_host(node, raw):
    assert (await raw.get("/api/v1/tasks", headers={"Host": "api.example.org"})).status_code == 200


# --- caps on keys, batches and pages ---

async def test_idempotency_key_length_is_capped(raw):
    ok = await raw.post("/api/v1/tasks", json={"kind": "echo"}, headers={"Idempotency-Key": "k" * MAX_IDEMPOTENCY_KEY})
    assert ok.status_code == 201, ok.text
    too_long = await raw.post("/api/v1/tasks", json={"kind": "echo"}, headers={"Idempotency-Key": "k" * (MAX_IDEMPOTENCY_KEY + 1)})
    assert _error(too_long, 400)["error"] == "invalid Idempotency-Key"
    empty = await raw.post("/api/v1/tasks", json={"kind": "echo"}, headers={"Idempotency-Key": ""})
    assert _error(empty, 400)["error"] == "invalid Idempotency-Key"


async def test_batch_size_is_capped(nursery, tmp_path):
    # A node whose body cap lets a batch one over MAX_BATCH arrive whole, so the batch cap is what refuses it.
    data_dir = tmp_path / "big"
    handle = await nursery.start(run_node, node_config(data_dir, api={"host": "127.0.0.1", "port": 0, "max_body_bytes": 4 * 1024 * 1024}))
    async with httpx.AsyncClient(base_url=handle.api_url, timeout=60) as http:
        http.headers["Authorization"] = f"Bearer {token(data_dir, 'operator')}"
        resp = await http.post("/api/v1/tasks", json=[{"kind": "echo", "payload": i} for i in range(MAX_BATCH + 1)])
        assert f"at most {MAX_BATCH}" in _error(resp, 400)["detail"]
        assert (await http.get("/api/v1/tasks")).json()["tasks"] == []  # nothing of the refused batch was stored


@pytest.mark.parametrize("limit, status", [(MAX_PAGE, 200), (MAX_PAGE + 1, 400), (-1, 400), (10**30, 400), ("1e3", 400)])
async def test_page_limit_is_capped(raw, limit, status):
    resp = await raw.get("/api/v1/tasks", params={"limit": limit})
    assert resp.status_code == status, resp.text
    resp = await raw.get("/tasks", params={"limit": limit})
    assert resp.status_code == status, resp.text
