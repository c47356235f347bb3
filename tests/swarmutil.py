"""Swarms of real `p2pnn-node` processes for the tests.

Swarm     the control plane: DHT discovery, election, assigned roles (LocalSwarm
          from p2pnn.launcher, with timings a little slower than the defaults:
          two cores are shared).
BusSwarm  fan-out over RabbitMQ with roles from configuration, on one vhost and
          one PostgreSQL schema.
"""

from __future__ import annotations

import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest
import trio

from p2pnn.launcher import LocalSwarm, NodeProcess, agreed, led
from tests.conftest import PG_URL
from tests.nodeutil import FAST, start_node_process

__all__ = ["SWARM_ENV", "Swarm", "BusSwarm", "agreed", "led"]

SWARM_ENV = {
    **FAST, "P2PNN_COMPUTE__SLOTS": "0", "P2PNN_SWARM__HEARTBEAT_SECONDS": "0.5",
    "P2PNN_SWARM__ELECTION_TIMEOUT_SECONDS": "2.5", "P2PNN_SWARM__LEASE_SECONDS": "3",
    "P2PNN_DHT__REFRESH_SECONDS": "0.5", "P2PNN_DHT__REPUBLISH_SECONDS": "2", "P2PNN_DHT__RECORD_TTL_SECONDS": "8",
}


class Swarm(LocalSwarm):
    def __init__(self, root: Path, pg_url: str, schema: str) -> None:
        super().__init__(root, pg_url, schema, name="testswarm", env=SWARM_ENV)


# Fast beats and a short Ki-queue TTL so failures heal in seconds; no torch preloading, most
# swarm tests run echo tasks and the machine has two cores.
FANOUT_ENV = {
    "P2PNN_BUS__BACKEND": "amqp", "P2PNN_BUS__PREFIX": "swarm", "P2PNN_BUS__BEAT_INTERVAL_SECONDS": "0.5",
    "P2PNN_BUS__BEAT_TIMEOUT_SECONDS": "3", "P2PNN_BUS__KI_MESSAGE_TTL_SECONDS": "5",
    "P2PNN_SWEEPER__STRANDED_AFTER_SECONDS": "2",
    "P2PNN_BUS__HEARTBEAT_SECONDS": "10", "P2PNN_COMPUTE__PRELOAD_TORCH": "false",
    "P2PNN_SWEEPER__QUEUED_AFTER_SECONDS": "90", "P2PNN_STORE__BACKEND": "postgres", "P2PNN_STORE__URL": PG_URL,
}


@dataclass
class BusSwarm:
    root: Path
    amqp_url: str
    schema: str
    nodes: dict[str, NodeProcess] = field(default_factory=dict)
    envs: dict[str, dict[str, str]] = field(default_factory=dict)

    def start(self, name: str, role: str, slots: int = 2, **env: str) -> NodeProcess:
        full = {
            **FANOUT_ENV, "P2PNN_BUS__URL": self.amqp_url, "P2PNN_STORE__SCHEMA": self.schema,
            "P2PNN_NODE__ROLE": role, "P2PNN_COMPUTE__SLOTS": str(slots), **env,
        }
        self.envs[name] = full
        self.nodes[name] = start_node_process(self.root / name, "--insecure", env=full)
        return self.nodes[name]

    def restart(self, name: str) -> NodeProcess:
        self.nodes[name] = start_node_process(self.root / name, "--insecure", env=self.envs[name])
        return self.nodes[name]

    def kill(self, name: str) -> None:
        self.nodes[name].stop(signal.SIGKILL)

    def stop_all(self) -> None:
        for node in self.nodes.values():
            node.stop()

    def metric(self, name: str, metric: str) -> float:
        """Sum of a metric's samples on one live node (0 when absent)."""
        text = httpx.get(f"{self.nodes[name].url}/metrics", timeout=10).text
        pattern = re.compile(rf"^{re.escape(metric)}(\{{[^}}]*\}})? (\S+)$", re.M)
        return sum(float(m.group(2)) for m in pattern.finditer(text))

    def rows(self, query: str, *params) -> list[tuple]:
        with psycopg.connect(PG_URL) as conn:
            conn.execute(f'SET search_path TO "{self.schema}"')
            return conn.execute(query, params).fetchall()


@pytest.fixture(name="swarm")
def bus_swarm(tmp_path, amqp_url, pg_schema):
    """A BusSwarm of this test's own (import it into a test module as ``swarm``); every node stopped after."""
    s = BusSwarm(tmp_path, amqp_url, pg_schema)
    try:
        yield s
    finally:
        s.stop_all()


async def until(predicate, timeout: float, what: str) -> None:
    """Wait until ``predicate()`` holds. Error handling: AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await trio.sleep(0.2)
