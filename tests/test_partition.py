"""Partitions and heals of a real swarm, one network namespace per node.

Each node runs in a namespace of its own, on a bridge made for the test; the
host's PostgreSQL (which listens on loopback only) is reached through a TCP
forwarder on a second address of the bridge, so that a node can be cut from
the store alone while the test still reaches its API. A partition is a
blackhole route inside a namespace (iptables and tc are not available): a
silent drop, both ways. Healing deletes the routes. Every namespace, link and
process made here is removed at the end, also on failure.

Needs root and ``ip netns``; skipped otherwise.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from p2pnn import config as config_mod
from p2pnn.api.auth import Authenticator
from p2pnn.launcher import NodeProcess
from p2pnn.node import READY_FILE
from tests.conftest import PG_URL

ROOT = Path(__file__).resolve().parents[1]
STORE = "store"  # a cut target: the PostgreSQL forwarder
HEAL_DEADLINE = 10.0  # the swarm must be one again this long after the link heals (the bound)
MIN_CUT = 10.0  # seconds a cut of the store lasts at least (longer than a record's life below)
SETTLE_TIMEOUT = 90.0  # a cold start of three nodes on a loaded two-core machine
# Short record lifetimes, so a partition of a dozen seconds expires every record on both sides (the hard case).
NODE_ENV = {
    "P2PNN_API__PORT": "0", "P2PNN_DHT__PORT": "0", "P2PNN_PEER__PORT": "0", "P2PNN_COMPUTE__SLOTS": "0",
    "P2PNN_DHT__REFRESH_SECONDS": "0.5", "P2PNN_DHT__REPUBLISH_SECONDS": "2", "P2PNN_DHT__RECORD_TTL_SECONDS": "6",
    "P2PNN_STORE__BACKEND": "postgres", "P2PNN_STORE__POOL_SIZE": "2", "P2PNN_LOG__FORMAT": "json",
}


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check)


def _netns_missing() -> str | None:
    """Why network namespaces cannot be made here, or None when they can."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    probe = f"p2probe{secrets.token_hex(2)}"
    made = sh("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    sh("ip", "netns", "del", probe, check=False)
    return None


# Only root can make namespaces: a developer without it skips these; as root (CI) a broken `ip netns` fails them.
pytestmark = [pytest.mark.postgres, pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")]


@pytest.fixture(autouse=True, scope="module")
def _namespaces_work() -> None:
    why = _netns_missing()
    if why is not None:
        pytest.fail(f"cannot make network namespaces as root: {why}", pytrace=False)


class Lab:
    """A bridge with one namespace per node, a forwarder to PostgreSQL, and the nodes."""

    def __init__(self, root: Path, schema: str) -> None:
        self.tag = secrets.token_hex(2)
        # 198.18.0.0/15 is reserved for network tests (RFC 2544): no real host can be behind it. Another
        # test run may hold another /24 of it.
        net = f"198.{random.randint(18, 19)}.{random.randint(0, 250)}"
        self.gateway = f"{net}.1"
        self.store_ip = f"{net}.2"
        self.ips = [f"{net}.{10 + i}" for i in range(8)]
        self.bridge = f"p2b{self.tag}"
        self.root, self.schema = root, schema
        self.namespaces: list[str] = []
        self.nodes: dict[str, NodeProcess] = {}
        self.ns_of: dict[str, str] = {}
        self.ip_of: dict[str, str] = {}
        self.proxy: subprocess.Popen | None = None
        self.proxies: list[subprocess.Popen] = []
        self.secret = root / "swarm-secret"
        self.secret.write_text(secrets.token_hex(32))
        self.extra_env: dict[str, str] = {}  # more P2PNN_* settings for the nodes started from now on
        self.broker_ip = f"{net}.3"

    # --- the network ---

    def up(self) -> None:
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        # A bridge takes the lowest MAC of its ports unless given one: a node joining later would change
        # the address behind the gateway and the forwarders, and the earlier nodes' ARP entries would
        # point nowhere until they expire (seconds without the store). A fixed, locally administered one.
        sh("ip", "link", "set", self.bridge, "address", "02:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5)))
        sh("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        sh("ip", "addr", "add", f"{self.store_ip}/32", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        pg = psycopg.conninfo.conninfo_to_dict(PG_URL)
        self.proxy = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "tcpproxy.py"), self.store_ip, "0", pg.get("host", "127.0.0.1"),
             str(pg.get("port", 5432))], stdout=subprocess.PIPE, text=True,
        )
        line = self.proxy.stdout.readline().split()  # type: ignore[union-attr]
        assert line and line[0] == "ready", line
        pg.update(host=self.store_ip, port=line[1])
        self.store_url = psycopg.conninfo.make_conninfo(**pg)

    def broker(self, amqp_url: str) -> str:
        """A forwarder on the bridge to the host's RabbitMQ (loopback only); the URL the nodes use."""
        parts = urllib.parse.urlsplit(amqp_url)
        sh("ip", "addr", "add", f"{self.broker_ip}/32", "dev", self.bridge)
        proxy = subprocess.Popen([sys.executable, str(ROOT / "tests" / "tcpproxy.py"), self.broker_ip, "0",
                                  parts.hostname or "127.0.0.1", str(parts.port or 5672)], stdout=subprocess.PIPE, text=True)
        self.proxies.append(proxy)
        line = proxy.stdout.readline().split()  # type: ignore[union-attr]
        assert line and line[0] == "ready", line
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:{parts.password}@{self.broker_ip}:{line[1]}"))

    def namespace(self, index: int) -> str:
        ns, host_end = f"p2n{self.tag}{index}", f"p2v{self.tag}{index}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", host_end, "master", self.bridge, "up")
        for cmd in (("ip", "addr", "add", f"{self.ips[index]}/24", "dev", "eth0"), ("ip", "link", "set", "eth0", "up"),
                    ("ip", "link", "set", "lo", "up")):
            sh("ip", "netns", "exec", ns, *cmd)
        return ns

    def _address(self, target: str) -> str:
        return self.store_ip if target == STORE else self.ip_of[target]

    def cut(self, name: str, targets: list[str]) -> None:
        """Blackhole routes in ``name``'s namespace to ``targets`` (nodes, or STORE); replies die too."""
        for target in targets:
            sh("ip", "netns", "exec", self.ns_of[name], "ip", "route", "add", "blackhole", f"{self._address(target)}/32")

    def heal(self, name: str, targets: list[str]) -> None:
        for target in targets:
            sh("ip", "netns", "exec", self.ns_of[name], "ip", "route", "del", "blackhole", f"{self._address(target)}/32")

    def down(self) -> None:
        for node in self.nodes.values():
            node.stop(signal.SIGKILL, timeout=10)
        for proxy in [self.proxy, *self.proxies]:
            if proxy is not None:
                proxy.kill()
                proxy.wait()
        for ns in self.namespaces:
            sh("ip", "netns", "del", ns, check=False)  # takes its end of the veth pair, and so the pair, with it
        sh("ip", "link", "del", self.bridge, check=False)

    # --- the nodes ---

    def start(self, name: str) -> NodeProcess:
        index = len(self.nodes)
        ns, ip = self.namespace(index), self.ips[index]
        data_dir = self.root / name
        data_dir.mkdir()
        peers = [n.info["dht"] for n in self.nodes.values()]
        env = {k: v for k, v in os.environ.items() if not k.startswith("P2PNN_")}
        env.update(NODE_ENV)
        env.update({
            "P2PNN_API__HOST": ip, "P2PNN_DHT__HOST": ip, "P2PNN_PEER__HOST": ip, "P2PNN_SWARM__NAME": "netns",
            "P2PNN_SWARM__SECRET_FILE": str(self.secret), "P2PNN_STORE__URL": self.store_url,
            "P2PNN_STORE__SCHEMA": self.schema, "P2PNN_DHT__BOOTSTRAP_PEERS": ",".join(peers[:2]),
            "PYTHONPATH": str(ROOT),
        })
        env.update(self.extra_env)
        log_path = data_dir / "node.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "p2pnn.cli", "run", "--data-dir", str(data_dir)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
            )
        node = NodeProcess(proc, log_path)
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while time.monotonic() < deadline:
            try:
                info = json.loads((data_dir / READY_FILE).read_text())
            except (FileNotFoundError, ValueError):
                info = {}
            if info.get("pid") == proc.pid:
                node.url, node.node_id, node.info = info["api"], info["node_id"], info
                break
            assert proc.poll() is None, log_path.read_text(errors="replace")
            time.sleep(0.1)
        else:
            raise TimeoutError(log_path.read_text(errors="replace"))
        self.nodes[name], self.ns_of[name], self.ip_of[name] = node, ns, ip
        return node

    def views(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, node in self.nodes.items():
            cfg = config_mod.load(env={}).replace("node", data_dir=str(self.root / name))
            headers = {"Authorization": f"Bearer {Authenticator.from_config(cfg).mint('test', 'viewer', 600)}"}
            try:
                cluster = httpx.get(node.url + "/api/v1/cluster", headers=headers, timeout=3).json()
                nodes = httpx.get(node.url + "/api/v1/nodes", headers=headers, timeout=3).json()["nodes"]
            except httpx.HTTPError:
                continue
            cluster["members"] = sorted(n["id"] for n in nodes)
            cluster["own_roles"] = next((n["roles"] for n in nodes if n["id"] == cluster["node_id"]), None)
            out[name] = cluster
        return out

    def wait_for(self, check: Callable[[dict[str, dict[str, Any]]], bool], timeout: float) -> float:
        started = time.monotonic()
        views: dict[str, dict[str, Any]] = {}
        while time.monotonic() - started < timeout:
            views = self.views()
            if check(views):
                return time.monotonic() - started
            time.sleep(0.1)
        raise AssertionError(f"not within {timeout} s: {summary(views)}")


def summary(views: dict[str, dict[str, Any]]) -> str:
    """Each node's view in one line: principal, term, leading, members, role map (ids shortened)."""
    short = lambda ids: ",".join(sorted(i[:6] for i in ids))  # noqa: E731
    return "; ".join(f"{name} {v['node_id'][:6]}: principal {str(v['principal'])[:6]} term {v['term']} "
                     f"leading {v['leading']} members {short(v['members'])} roles {short(v['roles'])}"
                     for name, v in sorted(views.items()))


def one_swarm(ids: set[str]) -> Callable[[dict[str, dict[str, Any]]], bool]:
    """Every node names the same leading principal and term, lists exactly ``ids``, and the role map covers them."""

    def check(views: dict[str, dict[str, Any]]) -> bool:
        if len(views) != len(ids):
            return False
        if len({(v["principal"], v["term"]) for v in views.values()}) != 1:
            return False
        principal = next(iter(views.values()))["principal"]
        if principal is None or not any(v["node_id"] == principal and v["leading"] for v in views.values()):
            return False
        return all(set(v["members"]) == ids and set(v["roles"]) == ids for v in views.values())

    return check


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    schema = f"p2pnn_netns_{secrets.token_hex(4)}"
    lab = Lab(tmp_path, schema)
    try:
        lab.up()
        yield lab
    finally:
        lab.down()
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _first_won_after(lab: Lab, since: float, newer_than: int) -> float | None:
    """Wall time of the first ``election.won`` of a term above ``newer_than`` logged by any node after ``since``."""
    times = [float(e["ts"]) for n in lab.nodes.values() for e in n.events()
             if e.get("event") == "election.won" and e.get("ts", 0) >= since and int(e.get("term", 0)) > newer_than]
    return min(times, default=None)


# (nodes, what is cut: the principal from its peers / from the store / from both, or two nodes from the others)
SCENARIOS = {
    "principal_from_peers": 3,
    "principal_from_store": 3,
    "principal_isolated": 3,
    "minority_of_two": 4,
}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_after_a_partition_heals_the_swarm_is_one_within_ten_seconds(lab: Lab, scenario: str):
    for i in range(SCENARIOS[scenario]):
        lab.start(f"n{i}")
    ids = {n.node_id for n in lab.nodes.values()}
    lab.wait_for(one_swarm(ids), SETTLE_TIMEOUT)
    view = next(iter(lab.views().values()))
    principal_id, term = view["principal"], view["term"]
    principal = next(n for n, p in lab.nodes.items() if p.node_id == principal_id)
    others = [n for n in lab.nodes if n != principal]
    if scenario == "minority_of_two":  # the principal and one other node, against the rest
        side = [principal, others[0]]
        cuts = {name: [n for n in lab.nodes if n not in side] for name in side}
    else:
        cuts = {principal: {"principal_from_peers": others, "principal_from_store": [STORE],
                            "principal_isolated": [*others, STORE]}[scenario]}

    cut_at = time.time()
    for name, targets in cuts.items():
        lab.cut(name, targets)
    if STORE in cuts.get(principal, []):
        # A principal that loses the store stops acting at once and stops answering ALIVE: a reachable node
        # takes over as soon as the lease lapses -- no gap longer than election timeout + lease.
        config = config_mod.load(env={}).swarm
        lab.wait_for(lambda views: any(v["leading"] and v["node_id"] != principal_id for v in views.values()), 30)
        won = _first_won_after(lab, cut_at, term)
        assert won is not None
        gap = won - cut_at
        print(f"{scenario}: a new principal acts {gap:.2f} s after the cut")
        assert gap <= config.election_timeout_seconds + config.lease_seconds + 1.0  # + scheduling on a busy host
        assert not lab.views()[principal]["leading"]
        time.sleep(max(0.0, cut_at + MIN_CUT - time.time()))  # a cut long enough to matter: records expire
    else:
        # Long enough for every record to expire on both sides: neither side lists the other.
        side_a = {lab.nodes[n].node_id for n in cuts}
        side_b = {lab.nodes[m].node_id for targets in cuts.values() for m in targets}

        def split(views: dict[str, dict[str, Any]]) -> bool:
            return all(set(v["members"]).isdisjoint(side_b if v["node_id"] in side_a else side_a) for v in views.values())

        lab.wait_for(split, 60)
        # The side that hears no principal holds no role: its An or Ki work would run outside the membership.
        leaderless = [lab.nodes[m].node_id for m in lab.nodes if m not in cuts]  # the principal's side is cut off
        lab.wait_for(lambda views: all(v["own_roles"] == [] for v in views.values() if v["node_id"] in leaderless), 30)
    healed_at = time.time()
    for name, targets in cuts.items():
        lab.heal(name, targets)
    took = lab.wait_for(one_swarm(ids), HEAL_DEADLINE)
    print(f"{scenario}: one principal and one membership {took:.2f} s after the heal "
          f"(partition lasted {healed_at - cut_at:.1f} s)")
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        history = conn.execute(sql.SQL("SELECT term, acquired_at, COALESCE(ended_at, expires_at) FROM {}.swarm_terms "
                                       "ORDER BY term").format(sql.Identifier(lab.schema))).fetchall()
    assert all(b[1] >= a[2] - 1e-6 for a, b in zip(history, history[1:])), history  # lease periods never overlap


def _submit(lab: Lab, name: str, token: str, count: int, tag: str) -> list[str]:
    """``count`` short echo tasks through ``name``'s API; the ids it accepted."""
    ids = []
    for i in range(count):
        response = httpx.post(lab.nodes[name].url + "/api/v1/tasks", headers={"Authorization": f"Bearer {token}"},
                              json={"kind": "echo", "payload": f"{tag}-{i}", "sleep": 0.2}, timeout=10)
        assert response.status_code in (200, 201, 202), response.text
        ids.append(response.json()["id"])
    return ids


@pytest.mark.slow
def test_tasks_submitted_on_both_sides_of_a_cut_principal_each_run_once(lab: Lab, amqp_url: str):
    """The principal cut from its peers (still reaching the store and the broker): every task submitted
    before, during and after the cut, on either side, succeeds, and none runs to completion twice."""
    lab.extra_env = {"P2PNN_COMPUTE__SLOTS": "1", "P2PNN_COMPUTE__PRELOAD_TORCH": "false",
                     "P2PNN_BUS__BACKEND": "amqp", "P2PNN_BUS__URL": lab.broker(amqp_url)}
    for i in range(3):
        lab.start(f"n{i}")
    ids = {n.node_id for n in lab.nodes.values()}
    lab.wait_for(one_swarm(ids), SETTLE_TIMEOUT)
    principal_id = next(iter(lab.views().values()))["principal"]
    principal = next(n for n, p in lab.nodes.items() if p.node_id == principal_id)
    others = [n for n in lab.nodes if n != principal]
    cfg = config_mod.load(env={**NODE_ENV, "P2PNN_SWARM__NAME": "netns", "P2PNN_SWARM__SECRET_FILE": str(lab.secret),
                               "P2PNN_STORE__URL": lab.store_url, "P2PNN_NODE__DATA_DIR": str(lab.root / others[0])})
    token = Authenticator.from_config(cfg).mint("test", "operator", 600)  # minted from the swarm's key: all take it

    tasks = _submit(lab, principal, token, 5, "before") + _submit(lab, others[0], token, 5, "before")
    lab.cut(principal, others)
    side_a, side_b = {principal_id}, ids - {principal_id}
    lab.wait_for(lambda views: all(set(v["members"]).isdisjoint(side_b if v["node_id"] in side_a else side_a)
                                   for v in views.values()), 60)
    tasks += _submit(lab, principal, token, 5, "cut") + _submit(lab, others[1], token, 5, "cut")
    lab.heal(principal, others)
    lab.wait_for(one_swarm(ids), HEAL_DEADLINE)
    tasks += _submit(lab, others[1], token, 5, "healed")

    deadline, states = time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        states = {t: httpx.get(f"{lab.nodes[others[0]].url}/api/v1/tasks/{t}", timeout=10,
                               headers={"Authorization": f"Bearer {token}"}).json()["state"] for t in tasks}
        if all(s in ("succeeded", "failed", "cancelled") for s in states.values()):
            break
        time.sleep(0.5)
    completed: dict[str, int] = {}
    deadline = time.monotonic() + 10  # a Ki logs its finish a moment after the store shows it
    while not completed or (0 in completed.values() and time.monotonic() < deadline):
        completed = {t: 0 for t in tasks}
        for node in lab.nodes.values():
            for event in node.events():
                if event.get("event") in ("task.finished", "task.result_dropped") and event.get("task_id") in completed:
                    completed[event["task_id"]] += 1
        time.sleep(0.2)
    print(f"tasks across a cut principal: {sum(s == 'succeeded' for s in states.values())}/{len(tasks)} succeeded, "
          f"{sum(c > 1 for c in completed.values())} ran twice")
    assert all(s == "succeeded" for s in states.values()), states
    assert all(c == 1 for c in completed.values()), completed
