"""The whole swarm at once: roles from the election, tasks over RabbitMQ, nodes killed.

Real `p2pnn-node` processes on 127.0.0.1 with a DHT over UDP loopback, one
PostgreSQL schema and one RabbitMQ vhost of this test's own. The principal
assigns An and Ki; tasks submitted to any node run on the Ki only, through
the An they are attached to; after the principal and then the An are
SIGKILLed, the survivors re-assign the roles and every task still ends
``succeeded``.
"""

from __future__ import annotations

import collections

import httpx
import psycopg
import pytest
from psycopg import sql

from p2pnn import config as config_mod
from p2pnn.api.auth import Authenticator
from p2pnn.client import AsyncClient
from p2pnn.launcher import LocalSwarm, led
from tests.swarmutil import FANOUT_ENV, SWARM_ENV, agreed

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

CONVERGE_TIMEOUT = 60.0  # generous: two shared cores; typically a few seconds
TASKS = 30


@pytest.fixture
def swarm(tmp_path, postgres_url, pg_schema, amqp_url):
    env = {
        **SWARM_ENV, **{k: v for k, v in FANOUT_ENV.items() if k.startswith(("P2PNN_BUS__", "P2PNN_SWEEPER__STRANDED"))},
        "P2PNN_BUS__URL": amqp_url, "P2PNN_COMPUTE__SLOTS": "2", "P2PNN_COMPUTE__PRELOAD_TORCH": "false",
    }
    s = LocalSwarm(tmp_path, postgres_url, pg_schema, name="fanout", env=env)
    try:
        yield s
    finally:
        s.stop_all()  # pg_schema drops the schema, amqp_vhost the vhost


def _roles(swarm: LocalSwarm) -> dict[str, dict]:
    """The agreed role map, keyed by node name."""
    views = swarm.views()
    by_id = {p.node_id: n for n, p in swarm.running().items()}
    roles = next(iter(views.values()))["roles"]
    return {by_id[i]: r for i, r in roles.items() if i in by_id}


def _operator(swarm: LocalSwarm, name: str) -> AsyncClient:
    cfg = config_mod.load(env={}).replace("node", data_dir=str(swarm.root / name))
    return AsyncClient(swarm.nodes[name].url, Authenticator.from_config(cfg).mint("test", "operator", 600))


def _an_kis(swarm: LocalSwarm, name: str) -> float:
    """p2pnn_an_kis on a node: how many Ki its An sees beating."""
    cfg = config_mod.load(env={}).replace("node", data_dir=str(swarm.root / name))
    tok = Authenticator.from_config(cfg).mint("test", "viewer", 600)
    text = httpx.get(swarm.nodes[name].url + "/metrics", headers={"Authorization": f"Bearer {tok}"}, timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("p2pnn_an_kis"))


def _owners(swarm: LocalSwarm, schema: str, pg_url: str, ids: list[str]) -> collections.Counter:
    with psycopg.connect(pg_url) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        rows = conn.execute("SELECT lease_owner FROM tasks WHERE id::text = ANY(%s)", (ids,)).fetchall()
    return collections.Counter(owner for (owner,) in rows)


async def _run_batch(swarm: LocalSwarm, via: str, tag: str) -> list[str]:
    async with _operator(swarm, via) as client:
        ids = [t["id"] for t in await client.submit_many([{"kind": "echo", "payload": f"{tag}-{i}"} for i in range(TASKS)])]
        done = await client.wait_all(ids, timeout=120)
    states = collections.Counter(t["state"] for t in done.values())
    assert states == {"succeeded": TASKS}, states
    return ids


def _wait_attached(swarm: LocalSwarm, an: str, kis: list[str]) -> None:
    """Each Ki has taken the assignment to ``an`` (its fan-out side says so) and the An sees them all beat."""
    an_id = swarm.nodes[an].node_id

    def attached(name: str) -> bool:
        mine = [e.get("an") for e in swarm.nodes[name].events() if e.get("event") == "ki.attached"]
        return bool(mine) and mine[-1] == an_id

    swarm.wait_for(lambda views: all(attached(k) for k in kis) and _an_kis(swarm, an) >= len(kis), CONVERGE_TIMEOUT)


async def test_assigned_roles_carry_tasks_and_survive_the_principal_and_the_an(swarm, postgres_url, pg_schema):
    for i in range(4):
        swarm.start(f"n{i}")
    swarm.wait_for(agreed(4), CONVERGE_TIMEOUT)
    roles = _roles(swarm)
    principal = next(n for n, r in roles.items() if r["roles"] == ["principal"])
    an = next(n for n, r in roles.items() if "an" in r["roles"])
    kis = sorted(n for n, r in roles.items() if "ki" in r["roles"])
    assert len(kis) == 2 and all(roles[k]["an"] == swarm.nodes[an].node_id for k in kis), roles
    _wait_attached(swarm, an, kis)

    # Submitted to the principal, which runs no tasks in a swarm of four: only the Ki do.
    ids = await _run_batch(swarm, principal, "first")
    ki_ids = {swarm.nodes[k].node_id for k in kis}
    assert set(_owners(swarm, pg_schema, postgres_url, ids)) <= ki_ids

    # The principal dies: the survivors elect another, which re-assigns roles; tasks still flow.
    term = next(iter(swarm.views().values()))["term"]
    old_principal_id = swarm.nodes[principal].node_id
    swarm.kill(principal)
    swarm.wait_for(led(lambda p, t: p != old_principal_id and t > term), CONVERGE_TIMEOUT)
    roles = _roles(swarm)
    an = next(n for n, r in roles.items() if "an" in r["roles"])
    kis = sorted(n for n, r in roles.items() if "ki" in r["roles"])
    assert kis, roles
    _wait_attached(swarm, an, kis)
    ids = await _run_batch(swarm, kis[0], "second")
    assert set(_owners(swarm, pg_schema, postgres_url, ids)) <= {swarm.nodes[k].node_id for k in kis}

    # Then the An dies: its Ki are attached to whichever node holds the An role next.
    old_an_id = swarm.nodes[an].node_id
    swarm.kill(an)
    settled = led()
    swarm.wait_for(
        lambda views: settled(views) and all(
            old_an_id not in v["roles"] and any("an" in r["roles"] for r in v["roles"].values()) for v in views.values()
        ),
        CONVERGE_TIMEOUT,
    )
    roles = _roles(swarm)
    an = next(n for n, r in roles.items() if "an" in r["roles"])
    kis = sorted(n for n, r in roles.items() if "ki" in r["roles"])
    assert kis and all(roles[k]["an"] == swarm.nodes[an].node_id for k in kis), roles
    _wait_attached(swarm, an, kis)
    survivor = next(iter(swarm.running()))
    await _run_batch(swarm, survivor, "third")
