"""Membership by gossip and beats: real MemberViews (real Kademlia over UDP loopback) in one trio program."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnn.config import DhtConfig
from p2pnn.credential import SwarmCredential
from p2pnn.identity import Identity, node_id_of
from p2pnn.membership.records import Beat, NodeRecord, check_beat, make_chain
from p2pnn.membership.view import MemberView

CRED = SwarmCredential("gossip", b"g" * 32)
# Short timings so that a test sees several beats and a lapse within seconds.
FAST = DhtConfig(rpc_timeout_seconds=0.5, record_ttl_seconds=3.0, republish_seconds=0.5, refresh_seconds=0.1)
SETTLE = 15.0  # seconds a small swarm of views gets to agree (a loaded two-core machine)


def ident() -> Identity:
    key = Ed25519PrivateKey.generate()
    return Identity(node_id_of(key.public_key()), key)


class Node:
    """One MemberView with a record whose load can be changed, run in its own cancel scope."""

    def __init__(self, cred: SwarmCredential = CRED, config: DhtConfig = FAST) -> None:
        self.ident = ident()
        self.load = {"slots": 1}
        self.view: MemberView | None = None
        self.cred, self.config = cred, config
        self.scope = trio.CancelScope()

    def make(self, now: float, expires: float) -> NodeRecord:
        assert self.view is not None
        return NodeRecord(
            node_id=self.ident.node_id, dht=("127.0.0.1", self.view.dht_port), peer="ws://127.0.0.1:1",
            api="http://127.0.0.1:1", capabilities={}, prefers="auto", priority=0, roles=(), an_id=None,
            load=dict(self.load), term=0, timestamp=now, expires_at=expires,
        )

    async def start(self, nursery: trio.Nursery, bootstrap: list[tuple[str, int]]) -> None:
        self.view = MemberView(ident=self.ident, cred=self.cred, config=self.config, bootstrap=bootstrap,
                               make_record=self.make)

        async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with self.scope:
                await self.view.run("127.0.0.1", 0, task_status=task_status)  # type: ignore[union-attr]

        await nursery.start(run)

    @property
    def address(self) -> tuple[str, int]:
        assert self.view is not None
        return ("127.0.0.1", self.view.dht_port)

    def knows(self) -> set[str]:
        assert self.view is not None
        return {r.node_id for r in self.view.live()}


async def swarm(nursery: trio.Nursery, count: int) -> list[Node]:
    nodes = [Node() for _ in range(count)]
    for i, node in enumerate(nodes):
        await node.start(nursery, [nodes[0].address] if i else [])
    return nodes


async def until(check: Callable[[], bool], timeout: float = SETTLE) -> float:
    started = trio.current_time()
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.05)
    return trio.current_time() - started


def everyone_knows(nodes: list[Node], ids: set[str]) -> Callable[[], bool]:
    return lambda: all(n.knows() == ids for n in nodes)


# --- beats ---


def test_a_beat_is_a_link_of_the_owners_chain_and_cannot_be_made_from_older_ones():
    now = time.time()
    chain = make_chain(40)
    record = NodeRecord(
        node_id="a" * 40, dht=("127.0.0.1", 1), peer="", api="", capabilities={}, prefers="auto", priority=0,
        roles=(), an_id=None, load={}, term=0, timestamp=now - 20, expires_at=now + 60, chain=chain[-1].hex(),
        beat=2.0, links=40,
    )
    beat = lambda i: Beat(record.timestamp, i, chain[40 - i])  # noqa: E731 - what the owner reveals at beat i
    assert check_beat(record, beat(3), None, now=now)
    assert check_beat(record, beat(7), beat(3), now=now)  # from a beat already checked: 4 hashes
    assert not check_beat(record, Beat(record.timestamp, 4, chain[40 - 3]), None, now=now)  # an older link, relabelled
    assert not check_beat(record, Beat(record.timestamp, 3, b"\0" * 16), None, now=now)  # guessed
    assert not check_beat(record, Beat(record.timestamp + 1, 3, chain[37]), None, now=now)  # another record version
    assert check_beat(record, beat(20), None, now=now)  # due now
    assert not check_beat(record, beat(40), None, now=now)  # due in 40 s: from the future (beyond the clock skew)
    assert not check_beat(dataclasses.replace(record, chain=""), beat(3), None, now=now)  # a record without a chain


# --- gossip between real views ---


async def test_every_node_reads_every_record_and_an_unchanged_record_is_never_verified_again(nursery):
    nodes = await swarm(nursery, 6)
    ids = {n.ident.node_id for n in nodes}
    await until(everyone_knows(nodes, ids))
    await trio.sleep(2 * FAST.republish_seconds)  # stores and first rounds settle
    verified = [n.view.verified for n in nodes]  # type: ignore[union-attr]
    lives = {n.ident.node_id: n.view._until[nodes[0].ident.node_id] for n in nodes[1:]}  # type: ignore[union-attr]
    await trio.sleep(3 * FAST.record_ttl_seconds)  # records would have lapsed three times over without beats
    assert all(n.knows() == ids for n in nodes)
    assert [n.view.verified for n in nodes] == verified  # type: ignore[union-attr]
    # Node 0's life was extended at every other node by its beats alone.
    assert all(n.view._until[nodes[0].ident.node_id] > lives[n.ident.node_id] for n in nodes[1:])  # type: ignore[union-attr]


async def test_a_changed_record_reaches_every_member_and_is_verified_once_there(nursery):
    nodes = await swarm(nursery, 5)
    ids = {n.ident.node_id for n in nodes}
    await until(everyone_knows(nodes, ids))
    await trio.sleep(2 * FAST.republish_seconds)
    before = [n.view.verified for n in nodes[1:]]  # type: ignore[union-attr]
    nodes[0].load = {"slots": 1, "free_slots": 0}
    nodes[0].view.publish_soon()  # type: ignore[union-attr]
    me = nodes[0].ident.node_id
    took = await until(lambda: all(n.view.record(me).load == nodes[0].load for n in nodes[1:]))  # type: ignore[union-attr]
    print(f"a changed record reached 4 members {took:.2f} s after it was signed")
    await trio.sleep(1.0)
    # One new version, checked once by each member (a copy stored on a node in the DHT is checked there too).
    assert all(0 < n.view.verified - b <= 2 for n, b in zip(nodes[1:], before))  # type: ignore[union-attr]


async def test_a_node_joining_late_is_found_by_everyone_and_finds_everyone(nursery):
    nodes = await swarm(nursery, 5)
    await until(everyone_knows(nodes, {n.ident.node_id for n in nodes}))
    late = Node()
    await late.start(nursery, [nodes[3].address])
    nodes.append(late)
    took = await until(everyone_knows(nodes, {n.ident.node_id for n in nodes}))
    print(f"a late node was known by all and knew all {took:.2f} s after it started")


async def test_a_stopped_node_lapses_when_its_beats_stop(nursery):
    nodes = await swarm(nursery, 4)
    ids = {n.ident.node_id for n in nodes}
    await until(everyone_knows(nodes, ids))
    nodes[2].scope.cancel()
    gone = ids - {nodes[2].ident.node_id}
    rest = [n for i, n in enumerate(nodes) if i != 2]
    took = await until(everyone_knows(rest, gone), FAST.record_ttl_seconds + FAST.republish_seconds + 5)
    print(f"a stopped node lapsed everywhere {took:.2f} s after it stopped")


async def test_a_node_without_the_swarm_secret_is_never_a_member(nursery):
    nodes = await swarm(nursery, 3)
    ids = {n.ident.node_id for n in nodes}
    await until(everyone_knows(nodes, ids))
    outsider = Node(cred=SwarmCredential(CRED.name, b"x" * 32))  # same swarm name, wrong secret
    await outsider.start(nursery, [nodes[0].address])
    await until(lambda: sum(n.view.dropped for n in nodes) > 0)  # type: ignore[union-attr]
    await trio.sleep(1.0)
    assert all(n.knows() == ids for n in nodes)
    assert outsider.knows() == {outsider.ident.node_id}


async def test_a_node_that_hears_no_reply_keeps_its_members_for_a_while_instead_of_evicting_them(nursery):
    nodes = await swarm(nursery, 3)
    ids = {n.ident.node_id for n in nodes}
    await until(everyone_knows(nodes, ids))
    lonely = nodes[0].view
    assert lonely is not None
    clock = [time.time()]
    lonely._clock = lambda: clock[0]  # its own clock, which the test moves on
    lonely._heard_at = clock[0]
    nodes[1].scope.cancel()
    nodes[2].scope.cancel()  # nobody answers it any more: the host might be overloaded, or cut off
    clock[0] += FAST.record_ttl_seconds - 0.1  # newest beats are older than a record's life here...
    assert {r.node_id for r in lonely.live()} == ids  # ...but judged as of its last reply, they still count
    clock[0] += FAST.record_ttl_seconds + FAST.republish_seconds  # never longer than one more record life
    assert {r.node_id for r in lonely.live()} == {nodes[0].ident.node_id}
