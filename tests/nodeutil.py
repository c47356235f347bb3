"""Helpers for tests that start real nodes: in-process (trio) or as `p2pnn-node` processes."""

from __future__ import annotations

from pathlib import Path

from p2pnn import config as config_mod
from p2pnn import identity
from p2pnn.api.auth import Authenticator
from p2pnn.config import Config
from p2pnn.launcher import NodeProcess, start_node

# Short leases and a fast sweeper so failure tests finish in seconds, not minutes.
FAST = {
    "P2PNN_API__HOST": "127.0.0.1", "P2PNN_API__PORT": "0", "P2PNN_COMPUTE__SLOTS": "2",
    "P2PNN_COMPUTE__LEASE_SECONDS": "3", "P2PNN_SWEEPER__INTERVAL_SECONDS": "0.2",
    "P2PNN_SWEEPER__PENDING_AFTER_SECONDS": "1",
}


def node_config(data_dir: Path, **sections: dict) -> Config:
    cfg = config_mod.load(env={}).replace("node", data_dir=str(data_dir)).replace("api", host="127.0.0.1", port=0)
    cfg = cfg.replace("compute", slots=2, lease_seconds=3.0).replace("sweeper", interval_seconds=0.2, pending_after_seconds=1.0)
    for section, values in sections.items():
        cfg = cfg.replace(section, **values)
    return cfg


def token(data_dir: Path, role: str, sub: str = "tester", ttl: int = 600) -> str:
    identity.init_data_dir(data_dir)
    cfg = config_mod.load(env={}).replace("node", data_dir=str(data_dir))
    return Authenticator.from_config(cfg).mint(sub, role, ttl)


def start_node_process(data_dir: Path, *args: str, env: dict[str, str] | None = None, command: str = "run") -> NodeProcess:
    return start_node(data_dir, *args, env={**FAST, **(env or {})}, command=command)
