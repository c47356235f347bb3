#!/usr/bin/env python3
"""Benchmark training through p2pnn against plain torch, in one run.

Prints:
  - node vs plain torch: the same training as a task of an embedded node
    (SQLite, in-process queue; a real `p2pnn-node run` process, submit -> done
    from the store's timestamps, a warm worker) and as a plain torch loop
    (scripts/train_digits_plain.py, imports excluded), with the ratio;
  - data-parallel scaling on this machine: the same training with 1 and 2
    ranks (gloo on CPU) on a KiPool's slots, as `torchrun --nproc-per-node`
    would run it, with both accuracies;
  - digits accuracy: the default train spec against scikit-learn's
    MLPClassifier(hidden_layer_sizes=(128,)) on the same stratified split,
    over several seeds, scikit-learn given both x / 16 and standardised inputs.

--gpu (a CUDA machine): node vs plain for an MLP 256 -> 1024 -> 1024 -> 10 on
200,000 samples, batch 1,024, 5 epochs (fp32 and bf16 autocast) and for a small
transformer, plus a one-rank NCCL group through the data-parallel path.
--cpu-smoke: every section with small sizes (GPU mode's sizes shrunk onto the
CPU when combined with --gpu), to prove the script runs end to end.

Usage: .venv/bin/python scripts/bench_training.py [--cpu-smoke] [--gpu] [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from p2pnn import config as config_mod
from p2pnn import logs
from p2pnn.api.auth import Authenticator
from p2pnn.client import AsyncClient as Client
from p2pnn.compute.pool import Job, KiPool
from p2pnn.launcher import start_node
from p2pnn.tasks import Limits, validate_spec

ROOT = Path(__file__).resolve().parents[1]
PLAIN = ROOT / "scripts" / "train_digits_plain.py"
# Large enough for the GPU workloads; the node is told the same through its configuration.
BIG = Limits(max_epochs=1000, max_wall_seconds=3600.0, max_tensor_elements=200_000_000, max_samples=2_000_000)


def node_env(slots: int, threads: int) -> dict[str, str]:
    return {
        "P2PNN_API__HOST": "127.0.0.1", "P2PNN_API__PORT": "0", "P2PNN_COMPUTE__SLOTS": str(slots),
        "P2PNN_COMPUTE__TORCH_THREADS": str(threads), "P2PNN_LOG__LEVEL": "warning",
        "P2PNN_COMPUTE__MAX_SAMPLES": str(BIG.max_samples),
        "P2PNN_COMPUTE__MAX_TENSOR_ELEMENTS": str(BIG.max_tensor_elements),
    }


def plain(args: list[str], threads: int) -> dict[str, Any]:
    """Run the plain torch loop twice in a fresh process and time the second (imports excluded)."""
    out = subprocess.run([sys.executable, str(PLAIN), "--threads", str(threads), "--repeat", "2", *args],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def plain_args(spec: dict[str, Any]) -> list[str]:
    """The plain script's arguments for the same work as a normalised train spec."""
    ds, model = spec["dataset"], spec["model"]
    out = ["--epochs", str(spec["epochs"]), "--batch-size", str(spec["batch_size"]), "--lr", str(spec["lr"]),
           "--schedule", spec["lr_schedule"], "--device", "cuda" if spec["device"] == "cuda" else "cpu",
           "--amp", spec["amp"], "--seed", str(spec["seed"])]
    if ds["name"] == "synthetic":
        out += ["--dataset", "synthetic", "--samples", str(ds["samples"]), "--features", str(ds["features"]),
                "--classes", str(ds["classes"])]
        if len(ds["sample_shape"]) == 2:
            out += ["--steps", str(ds["sample_shape"][0])]
    if model["name"] == "mlp":
        out += ["--hidden", ",".join(str(h) for h in model["hidden"])]
    else:
        out += ["--model", "transformer", "--d-model", str(model["d_model"]), "--heads", str(model["heads"]),
                "--layers", str(model["layers"]), "--ff", str(model["ff"])]
    return out


async def through_node(client: Client, raw: dict[str, Any]) -> dict[str, Any]:
    task = await client.wait((await client.submit(raw))["id"], timeout=3600)
    if task["state"] != "succeeded":
        raise RuntimeError(f"train task {task['state']}: {task['error']}")
    return {"wall": task["finished_at"] - task["created_at"], "seconds": task["result"]["seconds"],
            "accuracy": task["result"]["test_accuracy"], "result": task["result"]}


async def node_vs_plain(workloads: list[tuple[str, dict[str, Any]]], threads: int) -> None:
    with tempfile.TemporaryDirectory(prefix="p2pnn-bench-") as tmp:
        data = Path(tmp)
        node = start_node(data, env=node_env(1, threads))
        try:
            cfg = config_mod.load(env={}).replace("node", data_dir=str(data))
            token = Authenticator.from_config(cfg).mint("bench", "operator", 3600)
            async with Client(node.url, token) as client:
                for name, raw in workloads:
                    spec = validate_spec(raw, BIG)
                    first = await through_node(client, raw)  # warms the worker (CUDA context, kernels)
                    warm = await through_node(client, raw)
                    reference = plain(plain_args(spec), threads)
                    print(f"  {name}:")
                    print(f"    plain torch loop, warm: {reference['seconds']:.3f} s, accuracy {reference['test_accuracy']:.4f}")
                    print(f"    p2pnn first task      : submit->done {first['wall']:.3f} s (in the worker {first['seconds']:.3f} s)")
                    print(f"    p2pnn warm task       : submit->done {warm['wall']:.3f} s (in the worker {warm['seconds']:.3f} s), "
                          f"accuracy {warm['accuracy']:.4f}, amp {warm['result']['amp']}, "
                          f"deterministic {warm['result']['deterministic']}")
                    print(f"    ratio warm p2pnn / plain: {warm['wall'] / reference['seconds']:.2f} (submit->done), "
                          f"{warm['seconds'] / reference['seconds']:.2f} (in the worker)")
        finally:
            node.stop()


async def scaling(raw: dict[str, Any], threads: int, ranks: list[int], *, nccl: bool = False) -> None:
    """The same global batch on 1..N ranks of one KiPool (as torchrun --nproc-per-node would)."""
    with tempfile.TemporaryDirectory(prefix="p2pnn-bench-") as tmp:
        pool = KiPool(max(ranks), threads, BIG, Path(tmp), preload_torch=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(pool.run)

            async def ignore(progress: dict[str, Any]) -> None:
                pass

            base = None
            for n in ranks:
                spec = validate_spec({**raw, "workers": n, **({"backend": "nccl"} if nccl else {})}, BIG)
                await pool.execute_group(Job(f"warm-{n}", 1, {**spec, "epochs": 1}), n, ignore)
                started = time.perf_counter()
                outcome = await pool.execute_group(Job(f"run-{n}", 1, spec), n, ignore)
                wall = time.perf_counter() - started
                if outcome.status != "succeeded" or outcome.result is None:
                    raise RuntimeError(f"{n} ranks: {outcome.status}: {outcome.error}")
                base = base or wall
                print(f"  {n} rank(s), backend {outcome.result['backend']}: {wall:.3f} s "
                      f"(in rank 0 {outcome.result['seconds']:.3f} s), speed-up {base / wall:.2f}x, "
                      f"accuracy {outcome.result['test_accuracy']:.4f}")
            nursery.cancel_scope.cancel()


def digits_vs_sklearn(seeds: int, threads: int) -> None:
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler
    import warnings

    from p2pnn.nn import jobs

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    scaler = StandardScaler().fit(x_train)
    rows: dict[str, list[float]] = {"sklearn MLPClassifier(128), x / 16": [],
                                    "sklearn MLPClassifier(128), standardised": [],
                                    "p2pnn default train spec": []}
    spec0 = validate_spec({"kind": "train"}, Limits())
    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore", ConvergenceWarning)
        import torch

        torch.set_num_threads(threads)
        for seed in range(seeds):
            for key, (a, b) in (("sklearn MLPClassifier(128), x / 16", (x_train / 16, x_test / 16)),
                                ("sklearn MLPClassifier(128), standardised", (scaler.transform(x_train), scaler.transform(x_test)))):
                rows[key].append(MLPClassifier(hidden_layer_sizes=(128,), random_state=seed).fit(a, y_train).score(b, y_test))
            result, _ = jobs.run_train({**spec0, "seed": seed}, lambda p: None, Path(tmp) / str(seed))
            rows["p2pnn default train spec"].append(result["test_accuracy"])
    print(f"  same stratified split (360 test images), seeds 0..{seeds - 1}; p2pnn spec: epochs {spec0['epochs']}, "
          f"lr {spec0['lr']}, {spec0['lr_schedule']}, {spec0['normalize']}")
    for key, accs in rows.items():
        print(f"    {key:42s}: mean {np.mean(accs):.4f}  [{', '.join(f'{a:.4f}' for a in accs)}]")


def main(args: argparse.Namespace) -> None:
    logs.configure("error", "text")  # the pool's own warnings (slow torch imports) are not figures
    smoke = args.cpu_smoke
    threads = args.threads
    print(f"machine: {os.cpu_count()} cores; torch threads per rank/process: {threads}")
    if args.gpu:
        device = "cpu" if smoke else "cuda"
        samples, epochs = (4000, 2) if smoke else (200_000, 5)
        mlp = {"kind": "train", "device": device, "epochs": epochs, "batch_size": 1024, "checkpoint_every": 0,
               "model": {"name": "mlp", "hidden": [1024, 1024]},
               "dataset": {"name": "synthetic", "samples": samples, "features": 256, "classes": 10}}
        transformer = {"kind": "train", "device": device, "epochs": 2 if smoke else 3, "batch_size": 512,
                       "checkpoint_every": 0, "lr": 3e-3,
                       "model": {"name": "transformer", "d_model": 128, "heads": 4, "layers": 2, "ff": 256},
                       "dataset": {"name": "synthetic", "samples": samples // 4, "features": 256, "shape": [16, 16],
                                   "classes": 10}}
        print(f"node vs plain torch ({device}):")
        # Synthetic data: the plain loop draws other numbers of the same shape (same work, other accuracy).
        trio.run(node_vs_plain, [
            ("MLP 256-1024-1024-10, fp32", mlp),
            ("MLP 256-1024-1024-10, amp bf16", {**mlp, "amp": "bf16"}),
            ("transformer d128 x2 layers, [16, 16] samples, amp bf16", {**transformer, "amp": "bf16"}),
        ], threads)
        print("one-rank group through the data-parallel path:")
        trio.run(lambda: scaling(mlp, threads, [1], nccl=not smoke))
        return
    digits = {"kind": "train", **({"epochs": 2} if smoke else {})}
    wide = {"kind": "train", "epochs": 1 if smoke else 3, "batch_size": 512, "checkpoint_every": 0,
            "model": {"name": "mlp", "hidden": [512, 512]},
            "dataset": {"name": "synthetic", "samples": 2000 if smoke else 20000, "features": 256, "classes": 10}}
    print("node vs plain torch (cpu):")
    trio.run(node_vs_plain, [("digits, default train spec", digits),
                             ("MLP 256-512-512-10 on synthetic data (plain: other numbers, same work)", wide)], threads)
    print("data-parallel scaling (gloo, one node, same global batch):")
    trio.run(lambda: scaling(wide, threads, [1, 2]))
    print("digits accuracy against scikit-learn:")
    digits_vs_sklearn(2 if smoke else args.seeds, threads)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="small sizes, to check the script end to end")
    parser.add_argument("--gpu", action="store_true", help="the CUDA workloads (node vs plain, one-rank NCCL)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds for the digits accuracy comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker and plain process")
    main(parser.parse_args())
