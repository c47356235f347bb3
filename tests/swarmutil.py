"""The test swarm: LocalSwarm with timings a little slower than the defaults (two cores are shared)."""

from __future__ import annotations

from pathlib import Path

from p2pnn.launcher import LocalSwarm, agreed, led
from tests.nodeutil import FAST

__all__ = ["SWARM_ENV", "Swarm", "agreed", "led"]

SWARM_ENV = {
    **FAST, "P2PNN_COMPUTE__SLOTS": "0", "P2PNN_SWARM__HEARTBEAT_SECONDS": "0.5",
    "P2PNN_SWARM__ELECTION_TIMEOUT_SECONDS": "2.5", "P2PNN_SWARM__LEASE_SECONDS": "3",
    "P2PNN_DHT__REFRESH_SECONDS": "0.5", "P2PNN_DHT__REPUBLISH_SECONDS": "2", "P2PNN_DHT__RECORD_TTL_SECONDS": "8",
}


class Swarm(LocalSwarm):
    def __init__(self, root: Path, pg_url: str, schema: str) -> None:
        super().__init__(root, pg_url, schema, name="testswarm", env=SWARM_ENV)
