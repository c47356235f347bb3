"""Run a local swarm: N `p2pnn-node` processes on 127.0.0.1 with their own ports and data directories.

    scripts/swarm up N           start nodes n0..n(N-1) (n0 is the others' bootstrap peer); adds to a running swarm
    scripts/swarm status         each node: pid, API, roles, the principal and term it sees
    scripts/swarm kill NODE      SIGKILL one node (e.g. n0)
    scripts/swarm restart NODE   start a stopped or killed node again (same key, same ports)
    scripts/swarm down           SIGTERM every node, then forget the swarm (drops its PostgreSQL schema)

State lives under .swarm/ (gitignored): the join secret, one data directory and log per node. Nodes
share the machine's PostgreSQL (P2PNN_SWARM_PG_URL, default postgresql://postgres@127.0.0.1:5432/test)
in the schema p2pnn_local_swarm, and its RabbitMQ: the vhost p2pnn-local-swarm, made with rabbitmqctl
at `up` and deleted at `down` (or, when P2PNN_SWARM_AMQP_URL is set, that URL as it is). Tasks
submitted to any node fan out from the An to the Ki the principal assigned.
Ports: API 3100+i, DHT (UDP) 8500+i, peer link 8600+i. Slots per node: P2PNN_SWARM_SLOTS (default 1).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from p2pnn import config as config_mod  # noqa: E402
from p2pnn.api.auth import Authenticator  # noqa: E402
from p2pnn.client import Client, ClientError  # noqa: E402
from p2pnn.launcher import start_node  # noqa: E402
from p2pnn.node import READY_FILE  # noqa: E402

STATE = ROOT / ".swarm"
PG_URL = os.environ.get("P2PNN_SWARM_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
SCHEMA = "p2pnn_local_swarm"
NAME = "local"
VHOST = "p2pnn-local-swarm"
AMQP_URL = os.environ.get("P2PNN_SWARM_AMQP_URL", f"amqp://guest:guest@127.0.0.1:5672/{VHOST}")
OWN_VHOST = "P2PNN_SWARM_AMQP_URL" not in os.environ
API_BASE, DHT_BASE, PEER_BASE = 3100, 8500, 8600
STOP_WAIT = 30.0  # seconds a node gets to stop (hand its tasks back) before restart starts it again


def node_env(i: int) -> dict[str, str]:
    env = {
        "P2PNN_SWARM__NAME": NAME, "P2PNN_SWARM__SECRET_FILE": str(STATE / "swarm-secret"),
        "P2PNN_STORE__BACKEND": "postgres", "P2PNN_STORE__URL": PG_URL, "P2PNN_STORE__SCHEMA": SCHEMA,
        "P2PNN_API__HOST": "127.0.0.1", "P2PNN_API__PORT": str(API_BASE + i),
        "P2PNN_DHT__HOST": "127.0.0.1", "P2PNN_DHT__PORT": str(DHT_BASE + i),
        "P2PNN_PEER__HOST": "127.0.0.1", "P2PNN_PEER__PORT": str(PEER_BASE + i),
        "P2PNN_COMPUTE__SLOTS": os.environ.get("P2PNN_SWARM_SLOTS", "1"),
        "P2PNN_BUS__BACKEND": "amqp", "P2PNN_BUS__URL": AMQP_URL,
    }
    if i:
        env["P2PNN_DHT__BOOTSTRAP_PEERS"] = f"127.0.0.1:{DHT_BASE}"
    return env


def pid_of(name: str) -> int | None:
    try:
        pid = json.loads((STATE / name / READY_FILE).read_text())["pid"]
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, KeyError, ProcessLookupError):
        return None


def nodes() -> list[str]:
    if not STATE.exists():
        return []
    return sorted((p.name for p in STATE.iterdir() if p.is_dir() and p.name.startswith("n")), key=lambda n: int(n[1:]))


def start(name: str) -> None:
    node = start_node(STATE / name, env=node_env(int(name[1:])))
    print(f"{name}: pid {node.proc.pid}, api {node.url}, id {node.node_id[:12]}")


def rabbitmqctl(*args: str) -> None:
    try:
        subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        sys.exit(f"rabbitmqctl {' '.join(args)} failed ({detail.strip()}); set P2PNN_SWARM_AMQP_URL to a vhost of your own")


def up(count: int) -> None:
    if OWN_VHOST and not STATE.exists():
        rabbitmqctl("add_vhost", VHOST)
        rabbitmqctl("set_permissions", "-p", VHOST, "guest", ".*", ".*", ".*")
    STATE.mkdir(exist_ok=True)
    secret = STATE / "swarm-secret"
    if not secret.exists():
        secret.write_text(secrets.token_hex(32))
        secret.chmod(0o600)
    for i in range(count):
        if pid_of(f"n{i}") is None:
            start(f"n{i}")


def status() -> None:
    for name in nodes():
        pid = pid_of(name)
        if pid is None:
            print(f"{name}: not running")
            continue
        cfg = config_mod.load(env={}).replace("node", data_dir=str(STATE / name))
        token = Authenticator.from_config(cfg).mint("swarm-script", "viewer", 60)
        url = json.loads((STATE / name / READY_FILE).read_text())["api"]
        try:
            with Client(url, token, timeout=5) as client:
                cluster = client.cluster()
        except ClientError as exc:
            print(f"{name}: pid {pid}, api {url}: {exc}")
            continue
        mine = cluster["roles"].get(cluster["node_id"], {})
        principal = (cluster["principal"] or "-")[:12]
        print(f"{name}: pid {pid} api {url} id {cluster['node_id'][:12]} roles {','.join(mine.get('roles', [])) or '-'}"
              f" (An {(mine.get('an') or '-')[:12]}) | principal {principal} term {cluster['term']}")


def kill(name: str, sig: int = signal.SIGKILL) -> None:
    pid = pid_of(name)
    if pid is None:
        print(f"{name}: not running")
        return
    os.kill(pid, sig)
    print(f"{name}: sent {signal.Signals(sig).name} to {pid}")


def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + STOP_WAIT
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.1)


def down() -> None:
    pids = [p for p in map(pid_of, nodes()) if p is not None]
    for name in nodes():
        kill(name, signal.SIGTERM)
    for pid in pids:  # the schema goes only once no node uses it
        wait_gone(pid)
    import psycopg
    from psycopg import sql

    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCHEMA)))
    if OWN_VHOST:
        rabbitmqctl("delete_vhost", VHOST)
    import shutil

    shutil.rmtree(STATE, ignore_errors=True)
    print("swarm down")


def main() -> None:
    parser = argparse.ArgumentParser(prog="scripts/swarm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="start N nodes").add_argument("count", type=int)
    sub.add_parser("status", help="what each node sees")
    sub.add_parser("kill", help="SIGKILL a node").add_argument("node")
    sub.add_parser("restart", help="start a node again").add_argument("node")
    sub.add_parser("down", help="stop every node and forget the swarm (its schema and vhost)")
    args = parser.parse_args()
    if args.command == "up":
        if not 1 <= args.count <= 100:
            parser.error("N must be between 1 and 100")
        up(args.count)
    elif args.command == "status":
        status()
    elif args.command == "kill":
        kill(args.node)
    elif args.command == "restart":
        pid = pid_of(args.node)
        if pid is not None:
            kill(args.node, signal.SIGTERM)
            wait_gone(pid)
        start(args.node)
    else:
        down()


if __name__ == "__main__":
    main()
