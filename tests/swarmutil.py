"""A swarm of real `p2pnn-node` processes on one RabbitMQ vhost and one PostgreSQL schema."""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg

from p2pnn.launcher import NodeProcess
from tests.conftest import PG_URL
from tests.nodeutil import start_node_process

# Fast beats and a short Ki-queue TTL so failures heal in seconds; no torch preloading, most
# swarm tests run echo tasks and the machine has two cores.
SWARM = {
    "P2PNN_BUS__BACKEND": "amqp", "P2PNN_BUS__PREFIX": "swarm", "P2PNN_BUS__BEAT_INTERVAL_SECONDS": "0.5",
    "P2PNN_BUS__BEAT_TIMEOUT_SECONDS": "3", "P2PNN_BUS__KI_MESSAGE_TTL_SECONDS": "5",
    "P2PNN_BUS__HEARTBEAT_SECONDS": "10", "P2PNN_COMPUTE__PRELOAD_TORCH": "false",
    "P2PNN_SWEEPER__QUEUED_AFTER_SECONDS": "90", "P2PNN_STORE__BACKEND": "postgres", "P2PNN_STORE__URL": PG_URL,
}


@dataclass
class Swarm:
    root: Path
    amqp_url: str
    schema: str
    nodes: dict[str, NodeProcess] = field(default_factory=dict)
    envs: dict[str, dict[str, str]] = field(default_factory=dict)

    def start(self, name: str, role: str, slots: int = 2, **env: str) -> NodeProcess:
        full = {
            **SWARM, "P2PNN_BUS__URL": self.amqp_url, "P2PNN_STORE__SCHEMA": self.schema,
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
