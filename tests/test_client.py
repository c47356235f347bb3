"""The client library against a real `p2pnn-node` process: AsyncClient under asyncio and under trio, and Client.

Each async scenario is one plain function run by ``anyio.run`` on each event
loop in turn, so the same assertions hold for both.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import p2pnn
from p2pnn.client import (
    AsyncClient,
    BadRequest,
    Client,
    ConnectError,
    Forbidden,
    NotFound,
    TaskTimeout,
    Unauthorized,
)
from p2pnn.client._settings import resolve
from p2pnn.client._sse import EventParser
from p2pnn.launcher import NodeProcess
from tests.nodeutil import start_node_process, token

BACKENDS = ["asyncio", "trio"]
WAIT = 120.0  # generous: the machine is shared, and a worker's first torch import takes seconds
TRAIN = {"kind": "train", "model": {"name": "mlp"}, "dataset": {"name": "digits"}, "epochs": 4, "seed": 0}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, Path]]:
    data = tmp_path_factory.mktemp("client-node")
    proc = start_node_process(data)
    try:
        yield proc, data
    finally:
        proc.stop()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _safetensors_header(blob: bytes) -> dict:
    (size,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + size])


def _assert_changes_only(updates: list[dict]) -> None:
    """No two consecutive callbacks show a person the same thing."""
    keys = [(u["state"], u["attempts"], json.dumps(u.get("progress"), sort_keys=True), u.get("error")) for u in updates]
    assert all(a != b for a, b in zip(keys, keys[1:])), keys


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_client_trains_waits_and_fetches_the_model(node, backend):
    proc, data = node
    seen: dict[str, list[dict]] = {}

    async def scenario() -> dict:
        async with AsyncClient(proc.url, token(data, "operator")) as client:
            task = await client.submit(TRAIN)
            updates: list[dict] = []
            done = await client.wait(task["id"], timeout=WAIT, on_update=updates.append)
            seen["updates"] = updates
            seen["blob"] = [await client.artifact(task["id"], "model.safetensors")]
            seen["listed"] = (await client.list(kind="train", limit=100))["tasks"]
            return done

    done = anyio.run(scenario, backend=backend)
    assert done["state"] == "succeeded", done
    assert done["result"]["test_accuracy"] > 0.5
    updates = seen["updates"]
    _assert_changes_only(updates)
    assert updates[-1]["state"] == "succeeded"
    epochs = [u["progress"]["epoch"] for u in updates if u.get("progress")]
    assert epochs == sorted(epochs) and epochs[-1] == TRAIN["epochs"]
    assert "model.safetensors" in done["artifacts"]
    assert any(k != "__metadata__" for k in _safetensors_header(seen["blob"][0]))
    assert done["id"] in {t["id"] for t in seen["listed"]}


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_client_raises_typed_errors(node, backend):
    proc, data = node

    async def scenario() -> None:
        async with AsyncClient(proc.url, token(data, "operator")) as client:
            with pytest.raises(NotFound) as err:
                await client.get("no-such-task")
            assert err.value.status == 404 and err.value.error == "no such task"
            with pytest.raises(BadRequest) as err:
                await client.submit({**TRAIN, "lr": -1})
            assert err.value.field == "spec.lr"
            with pytest.raises(NotFound):
                await client.artifact("no-such-task", "model.safetensors")
        async with AsyncClient(proc.url, token(data, "viewer")) as viewer:
            with pytest.raises(Forbidden):
                await viewer.submit({"kind": "echo"})
        async with AsyncClient(proc.url, "not-a-token") as forged:
            with pytest.raises(Unauthorized):
                await forged.list()
        async with AsyncClient(f"http://127.0.0.1:{_closed_port()}", "t") as nowhere:
            with pytest.raises(ConnectError):
                await nowhere.get("x")

    anyio.run(scenario, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_wait_times_out_and_the_task_can_still_be_cancelled(node, backend):
    proc, data = node

    async def scenario() -> dict:
        async with AsyncClient(proc.url, token(data, "operator")) as client:
            task = await client.submit({"kind": "echo", "payload": "slow", "sleep": 30})
            with pytest.raises(TaskTimeout) as err:
                await client.wait(task["id"], timeout=0.5)
            assert isinstance(err.value, TimeoutError) and err.value.task_id == task["id"]
            await client.cancel(task["id"])
            return await client.wait(task["id"], timeout=WAIT)

    assert anyio.run(scenario, backend=backend)["state"] == "cancelled"


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_client_describes_the_swarm(node, backend):
    proc, data = node

    async def scenario() -> tuple[list, dict]:
        async with AsyncClient(proc.url, token(data, "viewer")) as client:
            return await client.nodes(), await client.cluster()

    nodes, cluster = anyio.run(scenario, backend=backend)
    assert [n["id"] for n in nodes] == [proc.node_id]
    assert cluster["principal"] == proc.node_id


def test_sync_client_submits_waits_and_reports_changes_once(node):
    proc, data = node
    with Client(proc.url, token(data, "operator")) as client:
        assert client.get(client.submit({"kind": "echo", "payload": 1})["id"])["kind"] == "echo"
        task = client.submit(TRAIN)
        updates: list[dict] = []
        done = client.wait(task["id"], timeout=WAIT, on_update=updates.append)
        assert done["state"] == "succeeded"
        _assert_changes_only(updates)
        assert updates[-1]["state"] == "succeeded"
        assert _safetensors_header(client.artifact(task["id"], "model.safetensors"))
        slow = client.submit({"kind": "echo", "sleep": 30})
        with pytest.raises(TaskTimeout):
            client.wait(slow["id"], timeout=0.5)
        client.cancel(slow["id"])
        assert client.wait(slow["id"], timeout=WAIT)["state"] == "cancelled"
        with pytest.raises(NotFound):
            client.get("no-such-task")


def test_package_exports_the_clients():
    assert p2pnn.Client is Client and p2pnn.AsyncClient is AsyncClient
    assert p2pnn.__version__ != "0+unknown"


def test_settings_come_from_arguments_then_environment_then_file(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-token-file\n")
    conf = tmp_path / "client.toml"
    conf.write_text(f'url = "http://file:1"\ntoken_file = "{token_file}"\n')
    env = {"P2PNN_CLIENT_CONFIG": str(conf)}
    assert resolve(env=env) == resolve(None, None, env=env)
    assert (resolve(env=env).url, resolve(env=env).token) == ("http://file:1", "from-token-file")
    env_set = {**env, "P2PNN_URL": "http://env:2/", "P2PNN_TOKEN": "from-env"}
    assert (resolve(env=env_set).url, resolve(env=env_set).token) == ("http://env:2", "from-env")
    assert resolve("http://arg:3", "from-arg", env=env_set).token == "from-arg"
    assert resolve(env={"XDG_CONFIG_HOME": str(tmp_path / "none")}).url == "http://127.0.0.1:3030"
    conf.write_text('url = "http://file:1"\ntokn = "typo"\n')
    with pytest.raises(p2pnn.ClientError, match="tokn: unknown key"):
        resolve(env=env)
    with pytest.raises(p2pnn.ClientError, match="must start with http"):
        resolve("ftp://x", env={"XDG_CONFIG_HOME": str(tmp_path / "none")})


def test_event_parser_follows_the_sse_format():
    parser = EventParser()
    lines = [": keep-alive", "event: task", "data: {\"a\":", "data: 1}", "id: 7", "", "data: plain", ""]
    events = [e for e in map(parser.feed, lines) if e is not None]
    assert [(e.name, e.data, e.id) for e in events] == [("task", '{"a":\n1}', "7"), ("message", "plain", "7")]
