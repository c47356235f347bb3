"""Election: Bully over the peer links, with terms granted by the store's lease.

Rank is ``(swarm.priority, what it was started as, node id)``, where a node
started as ``principal`` outranks one on ``auto``, which outranks one started
as ``an`` or ``ki`` (such a node leads only when no other can); the highest
live node should lead. Messages:

- ``election``: sent to every higher-ranked member when no heartbeat came
  for ``election_timeout``. A higher-ranked receiver that can lead answers
  ``alive`` (and runs its own election); a principal receiving one from a
  higher-ranked node hands over (releases its lease) when ``preempt`` is on.
- ``coordinator``: the principal's heartbeat, every ``heartbeat_seconds``,
  carrying its term and the role map.

A node that hears no ``alive`` takes the store's lease by compare-and-set:
the store grants the next term (terms only grow, and each is granted once),
and only while no other holder's lease runs. A candidate refused because the
lease still runs reads when it lapses and tries again at that moment, so a
failover takes about what was left of the dead principal's lease.

Only a node that can lead answers ``alive``: a principal acting on a renewed
lease, or a follower whose last store call succeeded. Every store call of
the election runs under ``store_timeout_seconds`` (shorter than the lease),
and so do the principal's other fenced writes (the sweeper's, through
``fenced``).
A principal whose renewal fails (an error, or no answer in time) stops
acting at once -- no role-map writes, no heartbeats, no ``alive`` -- and
resumes only when a later renewal succeeds while its lease still runs (the
store's compare-and-set proves that nobody else took the term meanwhile). It
steps down for good when a renewal is refused, when the lease lapses on its
own clock, when a fenced write is refused, when a reply or a coordinator
message carries a newer term, and when it hands over (preempt) or stops.
Messages carrying a term older than the one a node has seen are ignored, and
their sender learns the newer term from the reply.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from p2pnn import logs
from p2pnn.config import SwarmConfig
from p2pnn.control.links import PeerLinks
from p2pnn.membership.records import NodeRecord
from p2pnn.store import Fence, StoreError, TaskStore

log = logs.get(__name__)

T = TypeVar("T")
Rank = tuple[int, int, str]
PREFERENCE_RANK = {"principal": 2, "auto": 1, "an": 0, "ki": 0}  # started as an/ki: lead only as a last resort
LAPSE_MARGIN = 0.01  # seconds after a lease's recorded end before a candidate asks for it (clock rounding)
RETRY_MIN_SECONDS = 0.02  # a refused candidate waits at least this long: a lease that seems lapsed already is no reason to spin


def rank(priority: int, prefers: str, node_id: str) -> Rank:
    return (priority, PREFERENCE_RANK.get(prefers, 1), node_id)


def rank_of(record: NodeRecord) -> Rank:
    return rank(record.priority, record.prefers, record.node_id)


class StoreTimeout(StoreError):
    """A store call of the election did not finish within ``store_timeout_seconds``."""


class Election:
    """Resource handling: ``run`` loops until cancelled; a principal cancelled mid-term keeps its
    lease until it lapses (a killed node cannot release it either), unless ``resign`` hands it back.

    Error handling: store errors and deadlines are logged and retried on the next beat; a
    principal stops acting on the first one and steps down once its lease lapses.
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
        self.lease_expires = 0.0  # when our lease ends in the store, by our clock (start of the last renewal + lease)
        self.acting = False  # a principal whose last renewal failed holds its fence but does not act
        self.store_ok = True  # the election's last store call succeeded: this node could lead
        self.last_heard = clock()  # a node that just started listens for a principal before it runs an election
        self.principal_heard_at = clock()  # the last heartbeat of a principal (or our own last renewal)
        self._renewing_since: float | None = None  # when the renewal in flight started
        self._probe_at = 0.0  # a node that lost the store asks it again from then on
        self._retry_at: float | None = None  # a refused candidate asks again when the lease it met lapses
        self._challenge = False
        self._wake = trio.Event()
        self._telling: set[str] = set()  # peers a heartbeat is still on its way to
        self._nursery: trio.Nursery | None = None

    # --- state ---

    @property
    def leading(self) -> bool:
        """This node is principal, acting, its lease has not lapsed by its own clock, and no renewal has
        been waiting for the store longer than a heartbeat (a hung connection stops it within one beat,
        before the renewal's deadline says so)."""
        now = self._clock()
        return (self.fence is not None and self.acting and now < self.lease_expires
                and (self._renewing_since is None or now - self._renewing_since < self.config.heartbeat_seconds))

    def current_fence(self) -> Fence | None:
        return self.fence if self.leading else None

    async def fenced(self, write: Callable[[Fence], Awaitable[T]]) -> T | None:
        """Run a principal's fenced write (a sweep) under the election's store deadline, shorter than the
        lease: a write whose connection hangs gives up before the lease it was made under could lapse.
        None, without calling ``write``, when this node does not lead.

        Error handling: StoreError (StoreTimeout past the deadline), as for the election's own calls.
        """
        fence = self.current_fence()
        if fence is None:
            return None
        return await self._store(lambda: write(fence))

    def can_lead(self) -> bool:
        """Whether this node may answer ALIVE: it leads now, or it is a follower that reaches the store."""
        return self.leading if self.fence is not None else self.store_ok

    def _poke(self) -> None:
        self._wake.set()

    async def _store(self, call: Callable[[], Awaitable[T]]) -> T:
        """One store call under the election's deadline; ``store_ok`` records whether it answered.

        Error handling: StoreError (StoreTimeout past the deadline) for anything that did not answer.
        """
        try:
            with trio.fail_after(self.config.store_timeout_seconds):
                result = await call()
        except trio.TooSlowError:
            self.store_ok = False
            raise StoreTimeout(f"no answer from the store in {self.config.store_timeout_seconds} s") from None
        except StoreError:
            self.store_ok = False
            raise
        self.store_ok = True
        return result

    # --- the loop ---

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            next_beat = trio.current_time()
            while True:
                if self.fence is not None:
                    # Beats keep a fixed rate (a slow store call does not push the next renewal back).
                    next_beat = max(next_beat + self.config.heartbeat_seconds, trio.current_time())
                    await self._beat()
                    with trio.move_on_at(next_beat):
                        await self._wake.wait()
                else:
                    # A refused candidate asks again when the lease it met lapses, not before: the silence
                    # that made it a candidate is still there, and would have it ask again at once.
                    due = self.last_heard + self.config.election_timeout_seconds
                    if self._retry_at is not None:
                        due = self._retry_at
                    if not self.store_ok:
                        due = min(due, self._probe_at)
                    if self._challenge or self._clock() >= due:
                        await self._elect()
                        next_beat = trio.current_time()
                        continue
                    with trio.move_on_after(max(0.0, due - self._clock())):
                        await self._wake.wait()
                self._wake = trio.Event()

    async def _elect(self) -> None:
        challenge, self._challenge = self._challenge, False
        self._retry_at = None
        if not self.store_ok or challenge:
            # A node that cannot reach the store must not make others defer to it or make a principal hand over.
            try:
                await self._store(lambda: self.store.lease(self.swarm))
            except StoreError as exc:
                log.warning("election.store_unreachable", error=str(exc))
                self._probe_at = self._clock() + self.config.heartbeat_seconds
                return
            if not challenge and self._principal_fresh():
                return  # only a probe: the store answers again, and a principal leads
        heard = self.last_heard
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
        if self.fence is not None or (not challenge and self.last_heard > heard):
            return  # a coordinator message came while we asked
        started = self._clock()
        try:
            term = await self._store(lambda: self.store.acquire_lease(
                self.swarm, self.me, now=started, lease_seconds=self.config.lease_seconds
            ))
        except StoreError as exc:
            log.warning("election.store_unreachable", error=str(exc))
            self._probe_at = self._clock() + self.config.heartbeat_seconds
            return
        if term is None:
            # The lease still runs (a principal we cannot hear, or one that died moments ago): ask again when it
            # lapses, or at the next beat when we cannot tell. A coordinator message meanwhile cancels that.
            try:
                lease = await self._store(lambda: self.store.lease(self.swarm))
            except StoreError:
                lease = None
            now = self._clock()
            self._retry_at = now + self.config.heartbeat_seconds
            if lease is not None:
                self._retry_at = min(max(now + RETRY_MIN_SECONDS, lease.expires_at + LAPSE_MARGIN),
                                     now + self.config.election_timeout_seconds)
            log.info("election.lease_held", holder=lease.holder[:12] if lease else None,
                     term=lease.term if lease else None, retry_in=round(self._retry_at - now, 3))
            return
        self.term, self.principal = term, self.me
        self.fence = Fence(self.swarm, term, self.me)
        self.lease_expires = started + self.config.lease_seconds
        self.acting = True
        log.info("election.won", term=term, peers=len(self._peers()))

    async def _beat(self) -> None:
        fence = self.fence
        assert fence is not None
        started = self._renewing_since = self._clock()
        renewed: bool | None
        try:
            renewed = await self._store(lambda: self.store.renew_lease(
                fence, now=started, lease_seconds=self.config.lease_seconds
            ))
        except StoreError as exc:
            renewed = None
            error = str(exc)
        finally:
            self._renewing_since = None
        if self.fence is not fence:
            return  # stepped down while the renewal ran (a newer term arrived)
        if renewed:
            self.lease_expires = started + self.config.lease_seconds
            self.principal_heard_at = self._clock()
            if not self.acting:
                log.info("principal.resumed", term=fence.term)
                self.acting = True
        elif renewed is False:
            self._step_down("lease renewal refused")
            return
        elif self._clock() >= self.lease_expires:
            self._step_down("lease lapsed unrenewed")
            return
        else:
            self._suspend(f"lease renewal failed: {error}")
            return
        try:
            payload = await self._store(lambda: self._lead(fence))
        except StoreError as exc:
            self._suspend(f"role map not written: {exc}")
            return
        if payload is None:  # a fenced write was refused: the term is over
            self._step_down("fenced write refused")
            return
        if self.fence is not fence or not self.leading:
            return
        assert self._nursery is not None
        for peer in self._peers():
            if peer.node_id not in self._telling:  # a slow peer gets the next beat, not a queue of them
                self._telling.add(peer.node_id)
                self._nursery.start_soon(self._tell, peer, fence, payload)

    async def _tell(self, peer: NodeRecord, fence: Fence, payload: dict[str, Any]) -> None:
        try:
            reply = await self.links.request(peer, "coordinator", timeout=self.config.answer_timeout_seconds, **payload)
        finally:
            self._telling.discard(peer.node_id)
        if reply and reply.get("term", 0) > fence.term and self.fence is fence:
            self.term = max(self.term, reply["term"])
            self._step_down(f"a member has seen term {reply['term']}")

    def _suspend(self, why: str) -> None:
        """Stop acting (no writes, no heartbeats, no ALIVE) but keep the fence: a renewal may still succeed."""
        if not self.acting:
            return
        log.warning("principal.suspended", term=self.fence.term if self.fence else None, reason=why)
        self.acting = False
        self._stepped_down()

    def _step_down(self, why: str) -> None:
        if self.fence is None:
            return
        log.warning("principal.stepped_down", term=self.fence.term, reason=why)
        self.fence = None
        self.acting = False
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
            await self._store(lambda: self.store.release_lease(fence, now=self._clock()))
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
                if not self.can_lead():
                    return None  # a node that cannot lead must not make others wait for it
                if self.fence is None and not self._principal_fresh() and self._retry_at is None:
                    self._challenge = True  # (a candidate already waiting for the lease to lapse asks then)
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
            self.last_heard = self.principal_heard_at = self._clock()
            self._retry_at = None
            self._follow(body)
            if (self.config.preempt and self.my_rank > sender_rank and self.fence is None and not self._challenge
                    and self.store_ok):
                log.info("election.preempt", principal=sender.node_id[:12], term=term)
                self._challenge = True
                self._poke()
            return None
        if kind == "ping":
            return {"type": "pong"}
        return {"type": "unknown"}

    def orphaned(self) -> bool:
        """No principal has been heard for longer than a failover takes (election timeout + lease + a beat):
        this node is cut off from whoever leads, or nobody can lead."""
        limit = self.config.election_timeout_seconds + self.config.lease_seconds + self.config.heartbeat_seconds
        return self.fence is None and self._clock() - self.principal_heard_at > limit

    def _principal_fresh(self) -> bool:
        return self.principal is not None and self._clock() - self.last_heard < self.config.election_timeout_seconds
