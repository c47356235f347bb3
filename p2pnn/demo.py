"""``p2pnn-node demo``: a throw-away node and a client that uses it over HTTP.

It starts an embedded node (SQLite, in-process queue, a temporary data
directory, a free port), mints a token, submits a digits training task
through the REST API, shows its progress, then asks the trained model for a
few predictions with an ``infer`` task.
"""

from __future__ import annotations

import sys
import tempfile
import time

import trio

from p2pnn import config as config_mod
from p2pnn import logs
from p2pnn.api.auth import Authenticator
from p2pnn.client import AsyncClient
from p2pnn.node import run_node

PREDICTIONS = 8  # test images whose predicted digit the demo prints


def _test_images(count: int) -> tuple[list, list[int]]:
    # The client side of the demo: real digit images the model has not trained on
    # (the same stratified split the worker uses). scikit-learn, not torch.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    _, x_test, _, y_test = train_test_split(
        digits.images, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    # Pixels as the data set holds them (0..16): the trained model carries its own input scaling.
    return x_test[:count].tolist(), [int(y) for y in y_test[:count]]


async def run_demo(epochs: int, model: str, device: str) -> int:
    logs.configure("warning", "text")
    with tempfile.TemporaryDirectory(prefix="p2pnn-demo-") as data_dir:
        cfg = config_mod.load(env={}).replace("node", data_dir=data_dir).replace("api", host="127.0.0.1", port=0)
        async with trio.open_nursery() as nursery:
            node = await nursery.start(run_node, cfg)
            token = Authenticator.from_config(cfg).mint("demo", "operator", 3600)
            print(f"node {node.node_id[:12]} up at {node.api_url} (SQLite store, in-process queue)")
            async with AsyncClient(node.api_url, token) as client:
                code = await _scenario(client, epochs, model, device)
            nursery.cancel_scope.cancel()
    return code


async def _scenario(client: AsyncClient, epochs: int, model: str, device: str) -> int:
    spec = {"kind": "train", "model": {"name": model}, "dataset": {"name": "digits"}, "epochs": epochs, "device": device}
    task = await client.submit(spec)
    print(f"submitted train task {task['id']} ({model} on digits, {epochs} epochs)")
    shown: list[int] = []  # the epochs printed: a change of state alone repeats the last epoch's progress

    def show(t: dict) -> None:
        p = t.get("progress") or {}
        if p.get("epoch") and p["epoch"] not in shown:
            shown.append(p["epoch"])
            print(f"  epoch {p['epoch']:>3}/{p['epochs']}  loss {p['loss']:.4f}  test accuracy {p.get('test_accuracy', 0):.4f}")

    started = time.perf_counter()
    task = await client.wait(task["id"], on_update=show)
    if task["state"] != "succeeded":
        print(f"training {task['state']}: {task.get('error')}", file=sys.stderr)
        return 1
    result = task["result"]
    print(f"trained in {time.perf_counter() - started:.1f} s; test accuracy {result['test_accuracy']:.4f}")

    images, labels = _test_images(PREDICTIONS)
    infer = await client.submit({"kind": "infer", "model_task": task["id"], "inputs": images})
    infer = await client.wait(infer["id"])
    if infer["state"] != "succeeded":
        print(f"inference {infer['state']}: {infer.get('error')}", file=sys.stderr)
        return 1
    predicted = infer["result"]["classes"]
    right = sum(p == y for p, y in zip(predicted, labels))
    print(f"predictions on {len(labels)} test images: {right} right")
    for p, y, probs in zip(predicted, labels, infer["result"]["probabilities"]):
        print(f"  digit {y}: predicted {p} (p={max(probs):.3f}){'' if p == y else '  <- wrong'}")
    return 0
