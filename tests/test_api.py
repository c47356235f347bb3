"""The REST API through a real Hypercorn server on a loopback port, with a real HTTP client.

Tasks run in real worker processes (torch included) on the embedded node.
"""

from __future__ import annotations

import json
import time

import httpx
import jwt
import pytest
import trio
from safetensors.numpy import load as load_safetensors

from p2pnn.client import ApiError, AsyncClient
from p2pnn.node import run_node
from tests.nodeutil import node_config, token

TINY_TRAIN = {
    "kind": "train", "model": {"name": "mlp", "hidden": [16]}, "epochs": 2, "seed": 1,
    "dataset": {"name": "synthetic", "samples": 200, "features": 6, "classes": 3},
}


@pytest.fixture
async def node(nursery, tmp_path):
    cfg = node_config(
        tmp_path / "node", api={"host": "127.0.0.1", "port": 0, "max_body_bytes": 256 * 1024},
        compute={"slots": 2, "lease_seconds": 3.0, "max_tensor_elements": 5000},
    )
    handle = await nursery.start(run_node, cfg)
    data_dir = tmp_path / "node"
    tokens = {role: token(data_dir, role, sub=f"{role}-user") for role in ("viewer", "operator", "admin")}
    tokens["other-operator"] = token(data_dir, "operator", sub="someone-else")
    return handle, tokens


@pytest.fixture
async def clients(node):
    handle, tokens = node
    made = {name: AsyncClient(handle.api_url, tok) for name, tok in tokens.items()}
    made["anonymous"] = AsyncClient(handle.api_url)
    yield made
    for c in made.values():
        await c.__aexit__(None, None, None)


@pytest.fixture
async def raw(node):
    handle, tokens = node
    async with httpx.AsyncClient(base_url=handle.api_url, timeout=30) as http:
        http.headers["Authorization"] = f"Bearer {tokens['admin']}"
        yield http


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert "error" in body and "Traceback" not in resp.text
    return body


# --- the original routes ---

async def test_original_routes_submit_list_and_delete(clients):
    op = clients["operator"]
    task = await op._call("POST", "/tasks", json={"task_data": "sample task data"})
    assert task["kind"] == "echo" and task["spec"]["payload"] == "sample task data"
    done = await op.wait(task["id"])
    assert done["state"] == "succeeded" and done["result"]["payload"] == "sample task data"

    spec_task = await op._call("POST", "/tasks", json={"task_data": {"kind": "echo", "payload": [1, 2], "sleep": 30}})
    listed = await op._call("GET", "/tasks")
    assert {task["id"], spec_task["id"]} <= {t["id"] for t in listed}
    cancelled = await op._call("DELETE", f"/tasks/{spec_task['id']}")
    assert cancelled["id"] == spec_task["id"]
    assert (await op.wait(spec_task["id"], timeout=20))["state"] == "cancelled"


# --- submit, read, idempotency, pagination ---

async def test_echo_task_runs_to_success_with_timestamps(clients):
    op = clients["operator"]
    task = await op.submit({"kind": "echo", "payload": {"hello": "world"}})
    assert task["state"] in ("queued", "running", "succeeded")
    done = await op.wait(task["id"])
    assert done["state"] == "succeeded"
    assert done["result"]["payload"] == {"hello": "world"}
    assert done["attempts"] == 1 and done["owner"] == "operator-user"
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]


async def test_batch_submit_and_idempotency_key(clients):
    op = clients["operator"]
    specs = [{"kind": "echo", "payload": i} for i in range(5)]
    first = await op.submit_many(specs, idempotency_key="batch-1")
    again = await op.submit_many(specs, idempotency_key="batch-1")
    assert [t["id"] for t in first] == [t["id"] for t in again]
    with pytest.raises(ApiError) as err:
        await op.submit_many(specs[:2], idempotency_key="batch-1")
    assert err.value.status == 409
    results = await op.wait_all([t["id"] for t in first])
    assert sorted(t["result"]["payload"] for t in results.values()) == list(range(5))


async def test_list_filters_and_paginates_without_gaps(clients):
    op = clients["operator"]
    ids = {t["id"] for t in await op.submit_many([{"kind": "echo", "payload": i} for i in range(7)])}
    await op.wait_all(list(ids))
    seen, cursor = [], None
    while True:
        params = {"kind": "echo", "state": "succeeded", "limit": 3, **({"cursor": cursor} if cursor else {})}
        page = await op.list(**params)
        seen += [t["id"] for t in page["tasks"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert ids <= set(seen) and len(seen) == len(set(seen))
    assert (await op.list(kind="train"))["tasks"] == []


# --- bad input: always a 4xx naming the problem ---

@pytest.mark.parametrize(
    "body, field",
    [
        ({"kind": "bake"}, "spec.kind"),
        ({"kind": "train", "lr": "fast"}, "spec.lr"),
        ({"kind": "train", "epochs": 100000}, "spec.epochs"),
        ({"kind": "train", "model": {"name": "cnn"}, "dataset": {"name": "synthetic", "samples": 100, "features": 7}}, "spec.model.name"),
        ({"kind": "train", "dataset": {"name": "inline", "x": [[1, 2], [3]], "y": [0, 1]}}, "spec.dataset.x[1]"),
        ({"kind": "train", "dataset": {"name": "inline", "x": [[1, "a"]] * 4, "y": [0] * 4}}, "spec.dataset.x[0][1]"),
        ({"kind": "infer", "model_task": "00000000-0000-0000-0000-000000000000", "inputs": [[0.0] * 64]}, "spec.model_task"),
        ({"kind": "echo", "bogus": 1}, "spec.bogus"),
        ([{"kind": "echo"}, {"kind": "echo", "sleep": -1}], "spec[1].sleep"),
        ([], "spec"),
    ],
)
async def test_invalid_specs_get_400_naming_the_field(raw, body, field):
    body = _error(await raw.post("/api/v1/tasks", json=body), 400)
    assert body["field"] == field


async def test_oversized_tensors_are_refused(raw):
    # The fixture's node allows 5,000 elements per tensor.
    x = [[0.5] * 10 for _ in range(501)]
    resp = await raw.post("/api/v1/tasks", json={"kind": "train", "dataset": {"name": "inline", "x": x, "y": [0] * 501}})
    assert "more than the limit of 5000" in _error(resp, 400)["detail"]
    resp = await raw.post("/api/v1/tasks", json={"kind": "train", "dataset": {"name": "synthetic", "samples": 1000, "features": 10}})
    assert _error(resp, 400)["field"] == "spec.dataset.samples"
    resp = await raw.post("/api/v1/tasks", json={"kind": "infer", "model_task": "x", "inputs": x})
    assert _error(resp, 400)["field"] == "spec.inputs"


async def test_malformed_json_oversized_body_and_unknown_routes(raw):
    assert _error(await raw.post("/api/v1/tasks", content=b"{not json"), 400)["error"] == "malformed JSON"
    assert _error(await raw.post("/api/v1/tasks", content=b""), 400)["error"] == "empty body"
    big = json.dumps({"kind": "echo", "payload": "x" * 300_000})
    _error(await raw.post("/api/v1/tasks", content=big), 413)
    _error(await raw.get("/api/v1/nothing-here"), 404)
    _error(await raw.put("/api/v1/tasks"), 405)
    _error(await raw.post("/tasks", json={"no_task_data": 1}), 400)
    _error(await raw.post("/tasks", json={"task_data": 42}), 400)


@pytest.mark.parametrize("query", ["state=melted", "limit=0", "limit=abc", "cursor=%%%garbage"])
async def test_bad_list_parameters_are_400(raw, query):
    _error(await raw.get(f"/api/v1/tasks?{query}"), 400)


async def test_long_poll_answers_when_the_task_finishes_or_the_wait_ends(raw):
    slow = (await raw.post("/api/v1/tasks", json={"kind": "echo", "payload": 1, "sleep": 1.0})).json()
    started = time.monotonic()
    done = await raw.get(f"/api/v1/tasks/{slow['id']}", params={"wait": "20"})
    assert done.status_code == 200 and done.json()["state"] == "succeeded"
    assert time.monotonic() - started < 15  # woken by the finish, not by the end of the wait
    long = (await raw.post("/api/v1/tasks", json={"kind": "echo", "sleep": 30})).json()
    started = time.monotonic()
    still = await raw.get(f"/api/v1/tasks/{long['id']}", params={"wait": "0.3"})
    assert still.status_code == 200 and still.json()["state"] in ("queued", "running")
    assert time.monotonic() - started >= 0.3
    cancelled = await raw.delete(f"/api/v1/tasks/{long['id']}")
    assert cancelled.status_code == 200
    assert (await raw.get(f"/api/v1/tasks/{long['id']}", params={"wait": "20"})).json()["state"] == "cancelled"
    for bad in ("-1", "61", "soon", "nan"):
        _error(await raw.get(f"/api/v1/tasks/{slow['id']}", params={"wait": bad}), 400)
    _error(await raw.get("/api/v1/tasks/00000000-0000-0000-0000-000000000000", params={"wait": "1"}), 404)


async def test_submit_with_wait_answers_with_the_finished_task_or_as_it_is_after_the_wait(raw, clients):
    started = time.monotonic()
    resp = await raw.post("/api/v1/tasks", params={"wait": "20"}, json={"kind": "echo", "payload": 7, "sleep": 0.5})
    assert resp.status_code == 201 and resp.json()["state"] == "succeeded" and resp.json()["result"] == {"payload": 7}
    assert time.monotonic() - started < 15  # woken by the finish, not by the end of the wait
    started = time.monotonic()
    resp = await raw.post("/api/v1/tasks", params={"wait": "0.3"}, json={"kind": "echo", "sleep": 30})
    assert resp.status_code == 201 and resp.json()["state"] in ("queued", "running")
    assert time.monotonic() - started >= 0.3
    await raw.delete(f"/api/v1/tasks/{resp.json()['id']}")
    # A list waits for every task; an idempotent repeat waits too, and answers 200 with the same tasks.
    specs = [{"kind": "echo", "payload": i, "sleep": 0.2 * i} for i in range(3)]
    batch = await raw.post("/api/v1/tasks", params={"wait": "20"}, json=specs, headers={"Idempotency-Key": "w-1"})
    assert batch.status_code == 201 and [t["state"] for t in batch.json()["tasks"]] == ["succeeded"] * 3
    again = await raw.post("/api/v1/tasks", params={"wait": "20"}, json=specs, headers={"Idempotency-Key": "w-1"})
    assert again.status_code == 200 and again.json()["tasks"] == batch.json()["tasks"]
    for bad in ("-1", "61", "soon", "nan"):
        _error(await raw.post("/api/v1/tasks", params={"wait": bad}, json={"kind": "echo"}), 400)
    # The client: submit(wait=) and submit_many(wait=) give the terminal tasks.
    op = clients["operator"]
    assert (await op.submit({"kind": "echo", "payload": "x"}, wait=20))["result"] == {"payload": "x"}
    assert [t["state"] for t in await op.submit_many([{"kind": "echo"}] * 2, wait=20)] == ["succeeded"] * 2


async def test_unknown_and_malformed_ids_are_404(raw):
    _error(await raw.get("/api/v1/tasks/00000000-0000-0000-0000-000000000000"), 404)
    _error(await raw.get("/api/v1/tasks/not-a-uuid"), 404)
    _error(await raw.delete("/api/v1/tasks/not-a-uuid"), 404)
    _error(await raw.get("/api/v1/tasks/not-a-uuid/artifacts/model.safetensors"), 404)


# --- auth ---

async def test_requests_without_valid_token_are_401(node, clients):
    handle, _ = node
    anon = clients["anonymous"]
    for call in (anon.list(), anon.submit({"kind": "echo"}), anon._call("GET", "/tasks")):
        with pytest.raises(ApiError) as err:
            await call
        assert err.value.status == 401
    forged = jwt.encode({"sub": "x", "role": "admin", "iss": "p2pnn", "aud": "p2pnn-api", "exp": time.time() + 60},
                        None, algorithm="none")
    async with AsyncClient(handle.api_url, forged) as bad:
        with pytest.raises(ApiError) as err:
            await bad.list()
        assert err.value.status == 401


async def test_roles_viewer_reads_operator_cancels_own_admin_any(clients):
    viewer, op, other, admin = clients["viewer"], clients["operator"], clients["other-operator"], clients["admin"]
    with pytest.raises(ApiError) as err:
        await viewer.submit({"kind": "echo"})
    assert err.value.status == 403
    task = await op.submit({"kind": "echo", "sleep": 30})
    assert (await viewer.get(task["id"]))["id"] == task["id"]
    with pytest.raises(ApiError) as err:
        await other.cancel(task["id"])
    assert err.value.status == 403
    with pytest.raises(ApiError) as err:
        await viewer.cancel(task["id"])
    assert err.value.status == 403
    await admin.cancel(task["id"])
    assert (await op.wait(task["id"], timeout=20))["state"] == "cancelled"


# --- cancellation of a running task ---

async def test_cancelling_a_running_task_stops_it(clients):
    op = clients["operator"]
    task = await op.submit({"kind": "echo", "sleep": 60})
    with trio.fail_after(20):
        while (await op.get(task["id"]))["state"] != "running":
            await trio.sleep(0.05)
    started = time.monotonic()
    await op.cancel(task["id"])
    done = await op.wait(task["id"], timeout=20)
    assert done["state"] == "cancelled"
    assert time.monotonic() - started < 10
    # the slot is free again: new work runs
    assert (await op.wait((await op.submit({"kind": "echo", "payload": 1}))["id"]))["state"] == "succeeded"


# --- training, artifacts, evaluate, infer ---

async def test_train_then_artifact_evaluate_and_infer(clients, raw):
    op = clients["operator"]
    trained = await op.wait((await op.submit(TINY_TRAIN))["id"], timeout=120)
    assert trained["state"] == "succeeded", trained["error"]
    assert trained["artifacts"] == ["model.safetensors"]
    assert len(trained["result"]["epochs"]) == 2
    assert trained["progress"]["epoch"] == 2

    tensors = load_safetensors(await op.artifact(trained["id"], "model.safetensors"))
    assert tensors and all(v.size for v in tensors.values())
    _error(await raw.get(f"/api/v1/tasks/{trained['id']}/artifacts/other.bin"), 404)

    evaluated = await op.wait((await op.submit({"kind": "evaluate", "model_task": trained["id"]}))["id"], timeout=120)
    assert evaluated["state"] == "succeeded", evaluated["error"]
    assert evaluated["result"]["accuracy"] == pytest.approx(trained["result"]["test_accuracy"], abs=1e-6)

    inferred = await op.wait(
        (await op.submit({"kind": "infer", "model_task": trained["id"], "inputs": [[0.1] * 6, [-1.0] * 6]}))["id"],
        timeout=120,
    )
    assert inferred["state"] == "succeeded", inferred["error"]
    assert len(inferred["result"]["classes"]) == 2
    assert all(abs(sum(p) - 1) < 1e-3 for p in inferred["result"]["probabilities"])

    wrong_shape = await raw.post("/api/v1/tasks", json={"kind": "infer", "model_task": trained["id"], "inputs": [[0.1] * 5]})
    assert "shape [6]" in _error(wrong_shape, 400)["detail"]


# --- operations ---

async def test_health_ready_metrics_and_openapi_need_no_token(node, clients):
    handle, _ = node
    async with httpx.AsyncClient(base_url=handle.api_url) as http:
        assert (await http.get("/health")).json()["node_id"] == handle.node_id
        ready = await http.get("/ready")
        assert ready.status_code == 200 and ready.json()["store"] == "ok"
        await clients["operator"].wait((await clients["operator"].submit({"kind": "echo"}))["id"])
        metrics = (await http.get("/metrics")).text
        assert 'p2pnn_tasks{kind="echo",state="succeeded"} 1.0' in metrics
        assert 'p2pnn_http_requests_total{method="POST",route="/api/v1/tasks",status="201"}' in metrics
        assert "p2pnn_task_duration_seconds_bucket" in metrics
        doc = (await http.get("/openapi.json")).json()
        assert doc["openapi"].startswith("3.")


async def test_openapi_describes_every_route():
    from p2pnn.api.app import ApiContext, create_app
    from p2pnn.api.openapi import openapi

    app = create_app(ApiContext(service=None, metrics=None, authenticator=None, node_id="x",  # type: ignore[arg-type]
                                max_body_bytes=1024, ready=None))  # type: ignore[arg-type]
    doc = openapi()["paths"]
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<", "{").replace(">", "}")
        assert path in doc, f"{path} missing from openapi.json"
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in doc[path], f"{method} {path} missing from openapi.json"
