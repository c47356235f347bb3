"""The `p2pnn` command against a real `p2pnn-node` process, run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pnn.launcher import NodeProcess
from tests.nodeutil import start_node_process, token

RUN_TIMEOUT = 180.0  # seconds per command: a watch includes a worker's first torch import on a busy machine


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, Path]]:
    data = tmp_path_factory.mktemp("cli-node")
    proc = start_node_process(data)
    try:
        yield proc, data
    finally:
        proc.stop()


def p2pnn(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("P2PNN_")}
    base["XDG_CONFIG_HOME"] = "/nonexistent"  # never the developer's own client config
    return subprocess.run(
        [sys.executable, "-m", "p2pnn.client.cli", *args], env={**base, **(env or {})}, cwd=cwd,
        capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )


@pytest.fixture(scope="module")
def user(node) -> dict[str, str]:
    proc, data = node
    return {"P2PNN_URL": proc.url, "P2PNN_TOKEN": token(data, "operator", sub="alice")}


def test_submit_then_watch_trains_digits_and_exits_with_the_outcome(user, tmp_path):
    submitted = p2pnn("submit", "--kind", "train", "--dataset", "digits", "--epochs", "5", env=user)
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.strip()
    assert len(task_id) == 36 and "\n" not in task_id  # the id alone: ID=$(p2pnn submit ...)

    watched = p2pnn("watch", task_id, env=user)
    assert watched.returncode == 0, watched.stderr
    assert watched.stdout.startswith(f"task {task_id} succeeded in ")
    assert "test_accuracy 0." in watched.stdout
    # Without a terminal: one line per change, epochs in order, the last one 5/5.
    epochs = [int(line.split("epoch ")[1].split("/")[0]) for line in watched.stderr.splitlines() if "epoch " in line]
    assert epochs and epochs == sorted(epochs) and epochs[-1] == 5, watched.stderr

    got = json.loads(p2pnn("get", task_id, "--json", env=user).stdout)
    assert got["state"] == "succeeded" and got["spec"]["epochs"] == 5 and got["owner"] == "alice"
    listed = p2pnn("ls", "--kind", "train", env=user)
    assert task_id in listed.stdout and "succeeded" in listed.stdout

    model = tmp_path / "model.safetensors"
    fetched = p2pnn("artifact", task_id, "model.safetensors", "-o", str(model), env=user)
    assert fetched.returncode == 0 and model.stat().st_size > 1000
    assert f"wrote {model}" in fetched.stderr


def test_watch_in_a_terminal_draws_a_progress_bar(user):
    # rich treats the output as a terminal when TTY_COMPATIBLE=1: what a person at a shell sees.
    watched = p2pnn("submit", "--epochs", "3", "--watch", env={**user, "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "140"})
    assert watched.returncode == 0, watched.stderr
    assert "━" in watched.stderr and "3/3" in watched.stderr and "epoch 3/3" in watched.stderr
    assert "succeeded in" in watched.stdout


def test_spec_file_with_flags_over_it_and_json_output(user, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"kind": "echo", "payload": {"from": "file"}, "sleep": 0}))
    out = p2pnn("--json", "submit", str(spec), "--set", "sleep=0.1", "--watch", env=user)
    assert out.returncode == 0, out.stderr
    task = json.loads(out.stdout)
    assert task["state"] == "succeeded" and task["result"]["payload"] == {"from": "file"} and task["spec"]["sleep"] == 0.1

    many = tmp_path / "many.json"
    many.write_text(json.dumps([{"kind": "echo", "payload": i} for i in range(3)]))
    ids = p2pnn("submit", str(many), env=user).stdout.split()
    assert len(ids) == 3


def test_cancelled_task_makes_watch_exit_3_and_timeout_exit_124(user):
    task_id = p2pnn("submit", "--kind", "echo", "--set", "sleep=60", env=user).stdout.strip()
    timed_out = p2pnn("watch", task_id, "--timeout", "1", env=user)
    assert timed_out.returncode == 124 and "keeps running" in timed_out.stderr
    cancelled = p2pnn("cancel", task_id, env=user)
    assert cancelled.returncode == 0 and task_id in cancelled.stdout
    watched = p2pnn("watch", task_id, env=user)
    assert watched.returncode == 3 and "cancelled" in watched.stdout


def test_errors_are_one_line(node, user, tmp_path):
    proc, data = node
    cases = [
        (p2pnn("get", "no-such-task", env=user), 1, "no such task"),
        (p2pnn("submit", "--set", "lr=-1", env=user), 1, "spec.lr"),
        (p2pnn("submit", "--kind", "echo", env={**user, "P2PNN_TOKEN": token(data, "viewer")}), 1, "forbidden"),
        (p2pnn("ls", env={**user, "P2PNN_TOKEN": "forged"}), 1, "unauthorized"),
        (p2pnn("ls", env={**user, "P2PNN_URL": "http://127.0.0.1:9"}), 1, "cannot reach the node"),
        (p2pnn("submit", str(tmp_path / "missing.json"), env=user), 2, "No such file"),
        (p2pnn("ls", "--config", str(tmp_path / "missing.toml")), 2, "no such config file"),
    ]
    for result, code, text in cases:
        assert result.returncode == code, (result.args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and text in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_node_and_token_from_a_config_file(node, tmp_path):
    proc, data = node
    (tmp_path / "token").write_text(token(data, "viewer"))
    conf = tmp_path / "client.toml"
    conf.write_text(f'url = "{proc.url}"\ntoken_file = "{tmp_path / "token"}"\n')
    shown = p2pnn("nodes", "--config", str(conf))
    assert shown.returncode == 0, shown.stderr
    assert proc.node_id[:12] in shown.stdout and "principal" in shown.stdout
    as_json = json.loads(p2pnn("nodes", "--json", env={"P2PNN_CLIENT_CONFIG": str(conf)}).stdout)
    assert as_json["cluster"]["principal"] == proc.node_id


def test_version_and_help_name_every_subcommand():
    version = p2pnn("--version")
    assert version.returncode == 0 and version.stdout.startswith("p2pnn ")
    helped = p2pnn("--help").stdout
    for command in ("submit", "watch", "ls", "get", "cancel", "artifact", "nodes", "sweep"):
        assert command in helped
        sub = p2pnn(command, "--help")
        assert sub.returncode == 0 and sub.stdout.split("\n\n")[1].strip(), sub.stdout  # a description line


def test_sweep_runs_its_trials_lists_them_by_parent_and_prints_the_trial_table(user, tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"kind": "train", "dataset": {"name": "digits"}, "epochs": 2, "model": {"name": "mlp", "hidden": [32]}}))
    swept = p2pnn(
        "sweep", str(base), "--space", "lr=[0.001,0.01]", "--space", "model.hidden=[[16],[32]]", "--trials", "3",
        "--parallelism", "2", "--early-stopping", "none", "--watch", env=user,
    )
    assert swept.returncode == 0, swept.stderr
    sweep_id = swept.stderr.split("submitted sweep ")[1].split()[0]
    rows = [line for line in swept.stdout.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert len(rows) == 3 and all(" succeeded " in row for row in rows), swept.stdout  # the trial table
    assert "best: trial " in swept.stdout and f"p2pnn artifact " in swept.stdout

    trials = json.loads(p2pnn("ls", "--parent", sweep_id, "--json", env=user).stdout)
    assert len(trials) == 3 and {t["kind"] for t in trials} == {"train"}
    assert {(t["spec"]["lr"], tuple(t["spec"]["model"]["hidden"])) for t in trials} <= {
        (lr, (h,)) for lr in (0.001, 0.01) for h in (16, 32)
    }
    got = json.loads(p2pnn("get", sweep_id, "--json", env=user).stdout)
    assert got["kind"] == "sweep" and got["result"]["best"]["task_id"] in {t["id"] for t in trials}


def test_sweep_needs_a_space(user):
    refused = p2pnn("sweep", env=user)
    assert refused.returncode == 2 and "--space" in refused.stderr
