"""Live progress and event streams: GET /api/v1/tasks/{id}/progress, /api/v1/tasks/{id}/events, /api/v1/events."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
import trio

from p2pnn.client._sse import EventParser
from p2pnn.node import run_node
from tests.nodeutil import node_config, start_node_process, token

TRAIN = {"kind": "train", "model": {"name": "mlp"}, "dataset": {"name": "digits"}, "epochs": 6, "seed": 0}
DEADLINE = 120.0  # a worker's first torch import on a loaded machine takes seconds; never a tight bound


@pytest.fixture
async def node(nursery, tmp_path):
    handle = await nursery.start(run_node, node_config(tmp_path / "node"))
    return handle, {role: token(tmp_path / "node", role) for role in ("viewer", "operator")}


async def _events(http: httpx.AsyncClient, path: str, into: list, *, stop_after: int | None = None) -> None:
    """Read a stream into ``into`` as (event, data) pairs until the server ends it (or ``stop_after`` events)."""
    parser = EventParser()
    async with http.stream("GET", path, timeout=httpx.Timeout(30, read=DEADLINE)) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        async for line in resp.aiter_lines():
            event = parser.feed(line)
            if event is not None:
                into.append((event.name, json.loads(event.data)))
                if stop_after is not None and len(into) >= stop_after:
                    return


async def test_task_stream_shows_each_epoch_and_ends_with_the_task(node):
    handle, tokens = node
    async with httpx.AsyncClient(base_url=handle.api_url, headers={"Authorization": f"Bearer {tokens['operator']}"}) as http:
        task = (await http.post("/api/v1/tasks", json=TRAIN)).json()
        seen: list = []
        with trio.fail_after(DEADLINE):
            await _events(http, f"/api/v1/tasks/{task['id']}/events", seen)
        assert {name for name, _ in seen} == {"task"}
        states = [t["state"] for _, t in seen]
        assert states[-1] == "succeeded" and "running" in states
        epochs = [t["progress"]["epoch"] for _, t in seen if t.get("progress")]
        assert epochs == sorted(epochs) and epochs[-1] == TRAIN["epochs"]
        # The stream of a finished task is its final state, once, and the end.
        again: list = []
        with trio.fail_after(30):
            await _events(http, f"/api/v1/tasks/{task['id']}/events", again)
        assert [t["state"] for _, t in again] == ["succeeded"]

        series = (await http.get(f"/api/v1/tasks/{task['id']}/progress")).json()
        assert (series["task_id"], series["attempt"], series["truncated"]) == (task["id"], 1, False)
        assert [p["epoch"] for p in series["points"]] == list(range(1, TRAIN["epochs"] + 1))
        final = (await http.get(f"/api/v1/tasks/{task['id']}")).json()
        assert series["points"] == final["result"]["epochs"]  # the curve drawn live is the one the result keeps


async def test_progress_series_grows_while_the_task_runs(node):
    handle, tokens = node
    async with httpx.AsyncClient(base_url=handle.api_url, headers={"Authorization": f"Bearer {tokens['operator']}"}) as http:
        task = (await http.post("/api/v1/tasks", json={**TRAIN, "epochs": 40})).json()
        lengths: list[int] = []
        with trio.fail_after(DEADLINE):
            while True:
                got = (await http.get(f"/api/v1/tasks/{task['id']}")).json()
                lengths.append(len((await http.get(f"/api/v1/tasks/{task['id']}/progress")).json()["points"]))
                if got["state"] in ("succeeded", "failed", "cancelled"):
                    break
                await trio.sleep(0.05)
        assert got["state"] == "succeeded"
        assert lengths == sorted(lengths) and lengths[-1] == 40
        assert len({n for n in lengths if 0 < n < 40}) >= 2  # read at least twice part-way: it grew while running


async def test_swarm_stream_shows_the_node_then_task_changes(node):
    handle, tokens = node
    async with httpx.AsyncClient(base_url=handle.api_url, headers={"Authorization": f"Bearer {tokens['operator']}"}) as http:
        seen: list = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_events, http, "/api/v1/events", seen)
            with trio.fail_after(DEADLINE):
                while not seen:
                    await trio.sleep(0.05)
                name, swarm = seen[0]
                assert name == "swarm" and [n["id"] for n in swarm["nodes"]] == [handle.node_id]
                assert swarm["cluster"]["principal"] == handle.node_id
                task = (await http.post("/api/v1/tasks", json={"kind": "echo", "payload": "seen live"})).json()
                while not any(n == "task" and t["id"] == task["id"] and t["state"] == "succeeded" for n, t in seen):
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        mine = [t for n, t in seen if n == "task" and t["id"] == task["id"]]
        assert "spec" not in mine[-1] and "result" not in mine[-1]  # summaries, not whole tasks
        assert len({t["updated_at"] for t in mine}) == len(mine)  # each change once


async def test_live_routes_need_a_token(node):
    handle, tokens = node
    async with httpx.AsyncClient(base_url=handle.api_url) as anon:
        for path in ("/api/v1/events", "/api/v1/tasks/00000000-0000-4000-8000-000000000000/events",
                     "/api/v1/tasks/00000000-0000-4000-8000-000000000000/progress"):
            assert (await anon.get(path)).status_code == 401
        viewer = {"Authorization": f"Bearer {tokens['viewer']}"}
        missing = await anon.get("/api/v1/tasks/00000000-0000-4000-8000-000000000000/events", headers=viewer)
        assert missing.status_code == 404 and missing.json()["error"] == "no such task"
        assert (await anon.get("/api/v1/tasks/nope/progress", headers=viewer)).status_code == 404


async def test_dashboard_files_are_served_without_a_token_and_nothing_else(node):
    handle, _ = node
    async with httpx.AsyncClient(base_url=handle.api_url) as http:
        page = await http.get("/ui", follow_redirects=True)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        for name in ("app.js", "app.css", "uPlot.iife.min.js", "uPlot.min.css", "uPlot.LICENSE.txt"):
            assert (await http.get(f"/ui/{name}")).status_code == 200, name
        for bad in ("/ui/missing.js", "/ui/..%2Fapi%2Froutes%2Fui.py", "/ui/__init__.py"):
            assert (await http.get(bad)).status_code == 404, bad


def test_a_node_with_open_streams_stops_promptly(tmp_path):
    data = tmp_path / "n"
    node = start_node_process(data)
    ended = threading.Event()

    def read() -> None:
        try:
            with httpx.stream("GET", f"{node.url}/api/v1/events", headers={"Authorization": f"Bearer {token(data, 'viewer')}"},
                              timeout=httpx.Timeout(10, read=DEADLINE)) as resp:
                for _ in resp.iter_lines():
                    pass
        except httpx.HTTPError:
            pass
        ended.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        time.sleep(1.0)  # let the stream open
        started = time.monotonic()
        assert node.stop(signal.SIGTERM, timeout=60) == 0
        took = time.monotonic() - started
    finally:
        node.stop(signal.SIGKILL)
    assert ended.wait(30), "the stream outlived its node"
    print(f"stopped with an open event stream in {took:.2f} s")
