"""A swarm of real `p2pnn-node` processes on 127.0.0.1: DHT over UDP loopback, PostgreSQL store, SIGKILL.

One swarm serves the whole module (starting node processes is what takes
time on two shared cores); the tests run in file order, from the gentlest
(convergence) to the most disruptive (killing the principal), and each
starts by waiting until the swarm agrees again.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import time

import psycopg
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from kademlia.network import Server
from psycopg import sql
from trio_websocket import open_websocket_url

from p2pnn.credential import SwarmCredential, canonical, seal
from p2pnn.identity import Identity, load_identity, node_id_of
from p2pnn.membership.records import read_record, record_key
from tests.swarmutil import Swarm, agreed, led

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

NODES = 5
CONVERGE_TIMEOUT = 60.0  # generous: two shared cores; typically a few seconds


@pytest.fixture(scope="module")
def swarm(postgres_url: str, tmp_path_factory: pytest.TempPathFactory):
    schema = f"p2pnn_swarm_{os.getpid()}_{secrets.token_hex(4)}"
    s = Swarm(tmp_path_factory.mktemp("swarm"), postgres_url, schema)
    try:
        yield s
    finally:
        s.stop_all()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _cred(swarm: Swarm) -> SwarmCredential:
    return SwarmCredential(swarm.name, swarm.secret.read_bytes().strip())


def _principal(views: dict) -> tuple[str, int]:
    v = next(iter(views.values()))
    return v["principal"], v["term"]


def _name_of(swarm: Swarm, node_id: str) -> str:
    return next(n for n, p in swarm.nodes.items() if p.node_id == node_id and p.proc.poll() is None)


def test_five_nodes_converge_on_one_principal(swarm: Swarm):
    started = time.monotonic()
    for i in range(NODES):
        swarm.start(f"n{i}")
    up = time.monotonic() - started
    took = swarm.wait_for(agreed(NODES), CONVERGE_TIMEOUT)
    print(f"\n{NODES} nodes: processes ready in {up:.2f} s, swarm agreed {took:.2f} s later")
    views = swarm.views()
    principal, term = _principal(views)
    assert term >= 1
    roles = next(iter(views.values()))["roles"]
    assert roles[principal]["roles"] == ["principal"]
    ans = [n for n, r in roles.items() if "an" in r["roles"]]
    kis = [n for n, r in roles.items() if "ki" in r["roles"]]
    assert len(ans) == 1 and len(kis) == 3  # 4 others, ki_per_an 4: one An, three Ki
    assert all(roles[k]["an"] == ans[0] for k in kis)
    nodes = swarm.get("n0", "/api/v1/nodes")["nodes"]
    assert all(n["healthy"] and n["capabilities"]["cpu_cores"] >= 1 for n in nodes)
    assert {n["addresses"]["dht"].split(":")[0] for n in nodes} == {"127.0.0.1"}


def test_a_token_from_one_member_is_accepted_by_every_member_until_revoked(swarm: Swarm):
    import subprocess
    import sys

    import httpx

    swarm.wait_for(agreed(NODES), CONVERGE_TIMEOUT)
    # `p2pnn-node token` with the swarm's configuration (here n0's data directory) mints a swarm token.
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PNN_")} | swarm.env

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "p2pnn.cli", *args], env=env, capture_output=True, text=True,
                              timeout=60, check=True)
        return done.stdout.strip()

    token = cli("token", "--data-dir", str(swarm.root / "n0"), "--role", "viewer", "--sub", "alice")

    def answers() -> dict[str, int]:
        return {name: httpx.get(node.url + "/api/v1/cluster", headers={"Authorization": f"Bearer {token}"},
                                timeout=10).status_code for name, node in swarm.running().items()}

    assert set(answers().values()) == {200}, answers()
    cli("revoke", "--data-dir", str(swarm.root / "n0"), token)
    deadline = time.monotonic() + 30  # every member reads the deny list every auth.revocation_refresh_seconds (5)
    while set(answers().values()) != {401} and time.monotonic() < deadline:
        time.sleep(0.5)
    assert set(answers().values()) == {401}, answers()


def test_stock_kademlia_reads_a_node_record(swarm: Swarm):
    target = swarm.nodes["n1"]
    host, port = swarm.nodes["n0"].info["dht"].split(":")

    async def read() -> str | None:
        server = Server()  # the stock library, nothing of p2pnn
        await server.listen(0, interface="127.0.0.1")
        try:
            await server.bootstrap([(host, int(port))])
            return await server.get(record_key(swarm.name, target.node_id))
        finally:
            server.stop()

    value = asyncio.run(read())
    assert value is not None
    record = read_record(value, _cred(swarm), now=time.time())
    assert record.node_id == target.node_id and record.api == target.url


def _forge(swarm: Swarm, victim: str) -> list[tuple[str, str]]:
    """(key, value) pairs that must all be refused: a record from a node without the join secret, a real
    record with a changed field and a recomputed HMAC (bad signature), a record under another node's key."""
    cred = _cred(swarm)
    outsider_key = Ed25519PrivateKey.generate()
    outsider = Identity(node_id_of(outsider_key.public_key()), outsider_key)
    body = {"kind": "node-record", "dht": ["127.0.0.1", 1], "peer": "ws://127.0.0.1:1", "api": "http://127.0.0.1:1",
            "capabilities": {}, "prefers": "principal", "priority": 1000, "roles": [], "an_id": None,
            "load": {}, "term": 10**6, "timestamp": time.time(), "expires_at": time.time() + 60}
    wrong_secret = seal(body, outsider, SwarmCredential(swarm.name, b"x" * 32))
    insider_elsewhere = seal(body, outsider, cred)  # valid for the outsider's key only
    real = json.loads(seal(body, outsider, cred))
    real["body"]["priority"] = 999
    real["mac"] = cred.mac(canonical(real["body"]))  # signature no longer matches
    return [
        (record_key(swarm.name, outsider.node_id), wrong_secret),
        (record_key(swarm.name, outsider.node_id), json.dumps(real)),
        (record_key(swarm.name, victim), insider_elsewhere),
    ]


def test_forged_records_are_dropped_and_the_view_is_unchanged(swarm: Swarm):
    swarm.wait_for(agreed(NODES), CONVERGE_TIMEOUT)
    before = swarm.views()
    host, port = swarm.nodes["n0"].info["dht"].split(":")
    forged = _forge(swarm, swarm.nodes["n2"].node_id)

    async def inject() -> None:
        server = Server()
        await server.listen(0, interface="127.0.0.1")
        try:
            await server.bootstrap([(host, int(port))])
            for key, value in forged:
                await server.set(key, value)
        finally:
            server.stop()

    asyncio.run(inject())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as junk:  # garbage on the UDP port must not hurt
        for payload in (b"", b"\x00" * 30, b"\x00" + secrets.token_bytes(20) + b"\xc1garbage", secrets.token_bytes(900)):
            junk.sendto(payload, (host, int(port)))
    time.sleep(2.0)  # a few refresh rounds
    after = swarm.views()
    assert set(after) == set(before)  # every node still up and answering
    for name, view in after.items():
        assert view["members"] == before[name]["members"]
        assert (view["principal"], view["term"]) == (before[name]["principal"], before[name]["term"])
    dropped = [e for p in swarm.running().values() for e in p.events() if e["event"] == "membership.record_dropped"]
    reasons = {e["reason"] for e in dropped}
    assert {"bad swarm credential (HMAC)", "bad signature", "record stored under another node's key"} <= reasons


def test_forged_replayed_and_outsider_messages_are_refused(swarm: Swarm):
    swarm.wait_for(agreed(NODES), CONVERGE_TIMEOUT)
    before = swarm.views()
    principal, term = _principal(before)
    target = swarm.nodes[next(n for n, p in swarm.running().items() if p.node_id != principal)]
    member = load_identity(swarm.root / next(n for n, p in swarm.running().items() if p is not target))
    cred = _cred(swarm)
    outsider_key = Ed25519PrivateKey.generate()
    outsider = Identity(node_id_of(outsider_key.public_key()), outsider_key)

    def message(ident: Identity, c: SwarmCredential, **fields) -> str:
        body = {"type": "coordinator", "term": term + 100, "ts": time.time(), "nonce": secrets.token_hex(12),
                "roles": {}, **fields}
        return seal(body, ident, c)

    ping = message(member, cred, type="ping", term=term)
    cases = [
        (message(outsider, SwarmCredential(swarm.name, b"y" * 32)), "bad swarm credential (HMAC)"),
        (message(outsider, cred), "sender is not a member"),
        (message(member, cred, ts=time.time() - 3600), "stale message (outside the replay window)"),
        (json.dumps({"type": "coordinator", "term": term + 100}), "not a signed envelope"),
        (ping, None),
        (ping, "replayed message (nonce seen)"),
    ]

    async def send_all() -> list[dict]:
        answers = []
        async with open_websocket_url(target.info["peer"]) as ws:
            for text, _ in cases:
                await ws.send_message(text)
                answers.append(json.loads(await ws.get_message()))
        return answers

    answers = trio.run(send_all)
    for (_, reason), answer in zip(cases, answers):
        if reason is None:
            assert answer["body"]["type"] == "pong"
        else:
            assert answer == {"refused": reason}
    time.sleep(1.0)
    after = swarm.views()
    assert {(v["principal"], v["term"]) for v in after.values()} == {(principal, term)}


def test_a_late_node_gets_a_role_and_a_dead_ki_is_replaced(swarm: Swarm):
    swarm.wait_for(agreed(NODES), CONVERGE_TIMEOUT)
    late = swarm.start("late", command="ki")
    took = swarm.wait_for(agreed(NODES + 1), CONVERGE_TIMEOUT)
    roles = swarm.views()["late"]["roles"]
    print(f"\nlate node assigned {roles[late.node_id]} after {took:.2f} s")
    assert roles[late.node_id]["roles"] == ["ki"]  # started as `p2pnn-node ki`: its preference holds
    victim = next(n for n, r in roles.items() if r["roles"] == ["ki"] and n != late.node_id)
    swarm.kill(_name_of(swarm, victim))
    took = swarm.wait_for(led(), CONVERGE_TIMEOUT)
    roles = next(iter(swarm.views().values()))["roles"]
    ans = {n for n, r in roles.items() if "an" in r["roles"]}
    assert all(r["an"] in ans for r in roles.values() if r["roles"] == ["ki"])
    print(f"dead Ki dropped from the role map after {took:.2f} s")


def test_killed_principal_is_replaced_and_terms_never_overlap(swarm: Swarm, postgres_url: str):
    swarm.wait_for(agreed(NODES), CONVERGE_TIMEOUT)
    principal, term = _principal(swarm.views())
    name = _name_of(swarm, principal)
    killed_at = time.monotonic()
    swarm.kill(name)
    swarm.wait_for(led(lambda p, t: t > term and p != principal), CONVERGE_TIMEOUT, poll=0.05)
    print(f"\nfailover after SIGKILL of the principal: {time.monotonic() - killed_at:.2f} s")
    new_principal, new_term = _principal(swarm.views())

    swarm.start(name)  # same data dir, same key: the old principal comes back (and, highest-ranked, preempts)
    swarm.wait_for(agreed(NODES), CONVERGE_TIMEOUT)
    time.sleep(3.0)  # any second take-over would happen within a few beats
    final_principal, final_term = _principal(swarm.views())
    assert final_term - new_term <= 1  # it took over at most once
    if final_term == new_term + 1:
        assert final_principal == principal

    schema = swarm.env["P2PNN_STORE__SCHEMA"]
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        terms = conn.execute(
            "SELECT term, holder, acquired_at, expires_at, ended_at FROM swarm_terms WHERE swarm = %s ORDER BY term",
            (swarm.name,),
        ).fetchall()
        roles = conn.execute("SELECT DISTINCT term FROM swarm_roles WHERE swarm = %s", (swarm.name,)).fetchall()
    assert [t[0] for t in terms] == list(range(1, len(terms) + 1))  # each term granted once, in order
    for before, after in zip(terms, terms[1:]):
        assert before[4] is not None and before[4] <= after[2]  # a term ended before the next began
    assert roles == [(final_term,)]  # the role map was last written by the principal in force

