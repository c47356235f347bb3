"""Election: Bully over the peer links, with terms granted by the store's lease.

Rank is ``(swarm.priority, what it was started as, node id)``, where a node
started as ``principal`` outranks one on ``auto``, which outranks one started
as ``an`` or ``ki`` (such a node leads only when no other can); the highest
live node should lead. Messages:

- ``election``: sent to every higher-ranked member when no heartbeat came
  for ``election_timeout``. A higher-ranked receiver answers ``alive`` (and
  runs its own election); a principal receiving one from a higher-ranked node
  hands over (releases its lease) when ``preempt`` is on.
- ``coordinator``: the principal's heartbeat, every ``heartbeat_seconds``,
  carrying its term and the role map.

A node that hears no ``alive`` takes the store's lease by compare-and-set:
the store grants the next term (terms only grow, and each is granted once),
and only while no other holder's lease runs. The principal renews the lease
on every beat and stops acting -- steps down -- when a renewal is refused or
when the lease lapses unrenewed (store unreachable, node cut off). Messages
carrying a term older than the one a node has seen are ignored, and their
sender learns the newer term from the reply.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from p2pnn import logs
from p2pnn.config import SwarmConfig
from p2pnn.control.links import PeerLinks
from p2pnn.membership.records import NodeRecord
from p2pnn.store import Fence, StoreError, TaskStore

log = logs.get(__name__)

Rank = tuple[int, int, str]
PREFERENCE_RANK = {"principal": 2, "auto": 1, "an": 0, "ki": 0}  # started as an/ki: lead only as a last resort


def rank(priority: int, prefers: str, node_id: str) -> Rank:
    return (priority, PREFERENCE_RANK.get(prefers, 1), node_id)


def rank_of(record: NodeRecord) -> Rank:
    return rank(record.priority, record.prefers, record.node_id)


class Election:
    """Resource handling: ``run`` loops until cancelled; a principal cancelled mid-term keeps its
    lease until it lapses (a killed node cannot release it either).

    Error handling: store errors are logged and retried on the next beat; a
    principal whose lease lapses meanwhile steps down.
    """

    def __init__(
        self,
        *,
        me: str,
        my_rank: Rank,
        swarm: str,
        store: TaskStore,
        config: SwarmConfig,
        links: PeerLinks,
        peers: Callable[[], list[NodeRecord]],
        lead: Callable[[Fence], Awaitable[dict[str, Any] | None]],
        follow: Callable[[dict[str, Any]], None],
        stepped_down: Callable[[], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.me = me
        self.my_rank = my_rank
        self.swarm = swarm
        self.store = store
        self.config = config
        self.links = links
        self._peers = peers
        self._lead = lead
        self._follow = follow
        self._stepped_down = stepped_down
        self._clock = clock
        self.term = 0
        self.principal: str | None = None
        self.fence: Fence | None = None
        self.lease_expires = 0.0
        self.last_heard = clock()  # a node that just started listens for a principal before it runs an election
        self._challenge = False
        self._wake = trio.Event()

    # --- state ---

    @property
    def leading(self) -> bool:
        """This node is principal and its lease has not lapsed by its own clock."""
        return self.fence is not None and self._clock() < self.lease_expires

    def current_fence(self) -> Fence | None:
        return self.fence if self.leading else None

    def _poke(self) -> None:
        self._wake.set()

    # --- the loop ---

    async def run(self) -> None:
        while True:
            if self.fence is not None:
                await self._beat()
                with trio.move_on_after(self.config.heartbeat_seconds):
                    await self._wake.wait()
            else:
                due = self.last_heard + self.config.election_timeout_seconds
                if self._challenge or self._clock() >= due:
                    await self._elect()
                    continue
                with trio.move_on_after(max(0.0, due - self._clock())):
                    await self._wake.wait()
            self._wake = trio.Event()

    async def _elect(self) -> None:
        self._challenge = False
        peers = self._peers()
        higher = [p for p in peers if rank_of(p) > self.my_rank]
        # A challenge (preempt) also tells the lower-ranked principal, which then hands its lease over.
        targets = higher + [p for p in peers if p.node_id == self.principal and rank_of(p) < self.my_rank]
        answers: list[dict[str, Any] | None] = []

        async def ask(peer: NodeRecord) -> None:
            answers.append(await self.links.request(peer, "election", timeout=self.config.answer_timeout_seconds))

        async with trio.open_nursery() as nursery:
            for peer in targets:
                nursery.start_soon(ask, peer)
        if any(a and a.get("type") == "alive" for a in answers):
            log.info("election.deferred", higher=len(higher), term=self.term)
            self.last_heard = self._clock()  # a higher node runs; wait for its coordinator message
            return
        started = self._clock()
        try:
            term = await self.store.acquire_lease(
                self.swarm, self.me, now=started, lease_seconds=self.config.lease_seconds
            )
        except StoreError as exc:
            log.warning("election.store_unreachable", error=str(exc))
            term = None
        if term is None:
            # The lease still runs (a principal we cannot hear, or one that died moments ago): try again soon.
            self.last_heard = self._clock() - self.config.election_timeout_seconds + self.config.heartbeat_seconds
            return
        self.term, self.principal = term, self.me
        self.fence = Fence(self.swarm, term, self.me)
        self.lease_expires = started + self.config.lease_seconds
        log.info("election.won", term=term, peers=len(self._peers()))

    async def _beat(self) -> None:
        fence = self.fence
        assert fence is not None
        started = self._clock()
        try:
            renewed: bool | None = await self.store.renew_lease(fence, now=started, lease_seconds=self.config.lease_seconds)
        except StoreError as exc:
            log.warning("principal.lease_unrenewed", term=fence.term, error=str(exc))
            renewed = None
        if renewed:
            self.lease_expires = started + self.config.lease_seconds
        elif renewed is False or not self.leading:
            self._step_down("lease lost" if renewed is False else "lease lapsed")
            return
        payload = await self._lead(fence)
        if payload is None:  # a fenced write was refused: the term is over
            self._step_down("fenced write refused")
            return
        if self.fence is not fence or not self.leading:
            return

        async def tell(peer: NodeRecord) -> None:
            reply = await self.links.request(peer, "coordinator", timeout=self.config.answer_timeout_seconds, **payload)
            if reply and reply.get("term", 0) > fence.term and self.fence is fence:
                self._step_down(f"a member has seen term {reply['term']}")

        async with trio.open_nursery() as nursery:
            for peer in self._peers():
                nursery.start_soon(tell, peer)

    def _step_down(self, why: str) -> None:
        if self.fence is None:
            return
        log.warning("principal.stepped_down", term=self.fence.term, reason=why)
        self.fence = None
        self.principal = None
        self.last_heard = self._clock()
        self._stepped_down()

    async def resign(self) -> None:
        """Hand the term back (a clean stop): the next principal need not wait for the lease to lapse."""
        await self._release("this node is stopping")

    async def _release(self, why: str = "a higher-ranked node takes over") -> None:
        fence = self.fence
        if fence is None:
            return
        self._step_down(why)
        try:
            await self.store.release_lease(fence, now=self._clock())
        except StoreError as exc:  # it lapses by itself
            log.warning("principal.release_failed", term=fence.term, error=str(exc))

    # --- messages from peers (called by PeerLinks with verified bodies) ---

    async def on_message(self, body: dict[str, Any], sender: NodeRecord) -> dict[str, Any] | None:
        kind, term = body.get("type"), body["term"]
        if term < self.term:
            log.debug("peer.stale_term", type=kind, term=term, seen=self.term, sender=sender.node_id[:12])
            return {"type": "stale"}  # the reply carries our term: a stale principal learns it is one
        sender_rank = rank_of(sender)
        if kind == "election":
            if self.my_rank > sender_rank:
                if self.fence is None and not self._principal_fresh():
                    self._challenge = True
                self._poke()
                return {"type": "alive"}
            if self.fence is not None and self.config.preempt:
                await self._release()
            return None
        if kind == "coordinator":
            if self.fence is not None and sender.node_id != self.me:
                if term <= self.fence.term:
                    return {"type": "stale"}
                self._step_down(f"{sender.node_id[:12]} leads term {term}")
            self.term = term
            if self.principal != sender.node_id:
                log.info("election.follow", principal=sender.node_id[:12], term=term)
            self.principal = sender.node_id
            self.last_heard = self._clock()
            self._follow(body)
            if self.config.preempt and self.my_rank > sender_rank and self.fence is None and not self._challenge:
                log.info("election.preempt", principal=sender.node_id[:12], term=term)
                self._challenge = True
                self._poke()
            return None
        if kind == "ping":
            return {"type": "pong"}
        return {"type": "unknown"}

    def _principal_fresh(self) -> bool:
        return self.principal is not None and self._clock() - self.last_heard < self.config.election_timeout_seconds
