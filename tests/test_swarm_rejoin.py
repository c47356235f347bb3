"""Small swarms of real processes for two control-plane paths: a node whose bootstrap peers are all gone
finds the swarm's members through the store, and a principal stopped with SIGTERM hands its term back."""

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
        # Only the store could bring it in: its one bootstrap peer is dead and it has no saved peers, and
        # the others learn its address from the store alone (n2 pings the recorded members, or they ping
        # n2, whom they miss once it is recorded).
    finally:
        swarm.stop_all()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def test_a_principal_stopped_with_sigterm_hands_its_term_back(postgres_url, tmp_path):
    import signal
    import time

    from p2pnn.launcher import led

    schema = f"p2pnn_resign_{secrets.token_hex(4)}"
    swarm = Swarm(tmp_path, postgres_url, schema)
    try:
        for name in ("n0", "n1", "n2"):
            swarm.start(name)
        swarm.wait_for(agreed(3), 60)
        view = next(iter(swarm.views().values()))
        principal, term = view["principal"], view["term"]
        name = next(n for n, p in swarm.nodes.items() if p.node_id == principal)
        stopped = time.monotonic()
        assert swarm.nodes[name].stop(signal.SIGTERM) == 0
        swarm.wait_for(led(lambda p, t: p != principal and t > term), 60)
        print(f"\nnew principal seen {time.monotonic() - stopped:.2f} s after SIGTERM (lease: 3 s in these tests)")
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            ended = conn.execute(sql.SQL("SELECT end_reason FROM {}.swarm_terms WHERE term = %s").format(
                sql.Identifier(schema)), (term,)).fetchone()
        assert ended == ("released",)  # handed back, not left to lapse
    finally:
        swarm.stop_all()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
