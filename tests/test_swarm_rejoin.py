"""Joining through the store: a node whose bootstrap peers are all gone finds the swarm's members there."""

from __future__ import annotations

import secrets
import socket

import psycopg
import pytest
from psycopg import sql

from tests.swarmutil import Swarm, agreed

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def test_a_node_whose_bootstrap_peer_is_dead_finds_the_swarm_through_the_store(postgres_url, tmp_path):
    schema = f"p2pnn_rejoin_{secrets.token_hex(4)}"
    swarm = Swarm(tmp_path, postgres_url, schema)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # a UDP port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    try:
        swarm.start("n0")
        swarm.start("n1")
        swarm.wait_for(agreed(2), 60)
        swarm.start("n2", env={"P2PNN_DHT__BOOTSTRAP_PEERS": dead})
        took = swarm.wait_for(agreed(3), 60)
        print(f"\nthe third node, bootstrapped from a dead address, was in the swarm {took:.2f} s after it started")
        assert any(e.get("event") == "dht.rejoin" for e in swarm.nodes["n2"].events())
    finally:
        swarm.stop_all()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
