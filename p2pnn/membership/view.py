"""MemberView: this node's record, published on an interval, and the records of every member it can find.

Discovery: the kademlia node id of every p2pnn node is its p2pnn node id, so
every id in the routing table names a record key; those ids, and any ids
heard of otherwise (the principal's role map), are read every
``refresh_seconds`` -- from this node's own storage when the copy there is
recent, else (at most once per member per re-publish interval) from the
member itself with one find_value RPC to the address in the routing table,
or by a network lookup for ids without an address -- and kept while their
records are valid. A record text already
verified is not verified again (its freshness is).
Each re-publish stores our record on the k closest nodes of the routing
table; a lookup of the nodes closest to our record's key (which also tells
them about us) and a walk towards a random id come with it, backing off to
every 4th re-publish while the members we know stay the same. The nodes met
on walks, in k-bucket replacement lists and in the records stored here are
read too, so a node learns of members its k-buckets have no room for.

The DHT addresses of the members last seen are kept in a small file in the
data directory (``dht-peers.json``) and added to the bootstrap peers at the
next start, so a node that comes back after its configured bootstrap peer
died still finds the swarm.

Healing: a partition expires records on both sides, and Kademlia drops the
unreachable from its routing tables, so neither side would look for the other
again. Every ``HEAL_SECONDS`` a node that misses members (records that
expired, for ``FORMER_SECONDS``) or has an empty
routing table pings the last addresses of those members, the configured
bootstrap peers, the saved peers (``dht-peers.json``, read again each
time) and the members recorded in the store that it has no record of (read
then, and every ``RECORDED_EVERY`` otherwise); whoever answers is back in
the routing table, and the next refresh reads its record.
"""

from __future__ import annotations

import json
import math
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import trio

from p2pnn import logs
from p2pnn.config import DhtConfig
from p2pnn.credential import SwarmCredential
from p2pnn.identity import Identity
from p2pnn.membership.dht import DhtNode
from p2pnn.membership.records import NodeRecord, RecordError, read_record, record_key, sign_record

log = logs.get(__name__)

VERIFIED_CACHE_SIZE = 4096  # record texts whose signature and HMAC were checked (an Ed25519 verify is ~0.1 ms)
CONCURRENT_LOOKUPS = 16  # remote reads of records in flight at once
PEER_CACHE_SIZE = 32  # DHT addresses remembered for the next start
LOOKUP_TIMEOUT_FACTOR = 3  # a network lookup gets this many RPC timeouts before it is given up for this round
WALK_BACKOFF_MAX = 4  # while the members stay the same, lookups back off up to this many re-publish intervals
HEAL_SECONDS = 2.0  # how often a node looks for members it lost (a healed partition is merged within a few of these)
FORMER_SECONDS = 600.0  # how long the address of a member whose record expired is still tried
HEAL_BATCH = 32  # addresses pinged in one re-join round at most
RECORDED_EVERY = 15.0  # seconds between two reads of the members recorded elsewhere while nothing is missing


class MemberView:
    """Resource handling: ``run`` (nursery.start) joins, publishes and keeps re-reading until cancelled.

    Error handling: invalid records are dropped (counted in ``dropped``), never raised.
    """

    def __init__(
        self,
        *,
        ident: Identity,
        cred: SwarmCredential,
        config: DhtConfig,
        bootstrap: list[tuple[str, int]],
        make_record: Callable[[float, float], NodeRecord],
        peer_cache: Path | None = None,
        recorded: Callable[[], Awaitable[dict[str, tuple[str, int]]]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``recorded``: the DHT addresses of the members recorded outside the DHT (the store), for healing."""
        self.ident = ident
        self.cred = cred
        self.config = config
        self._peer_cache = peer_cache
        self._configured = list(bootstrap)
        self._recorded = recorded
        self._recorded_at = -math.inf
        self._bootstrap = list(dict.fromkeys([*bootstrap, *self._cached_peers()]))
        # Members whose records expired (a partition, a crash): id -> (DHT address, until when it is tried).
        self._former: dict[str, tuple[tuple[str, int], float]] = {}
        self._make_record = make_record
        self._clock = clock
        self.dht = DhtNode(
            node_id=ident.node_id, validator=self._validate, rpc_timeout=config.rpc_timeout_seconds,
            ttl=config.record_ttl_seconds,
        )
        self.members: dict[str, NodeRecord] = {}
        self.dropped = 0
        self._also: set[str] = set()
        self._looked_up: dict[str, float] = {}
        self._verified: dict[Any, NodeRecord] = {}
        self._lookups = trio.CapacityLimiter(CONCURRENT_LOOKUPS)
        # Nodes met on walks towards random ids: id -> (address, until when it is worth asking).
        self._walked: dict[str, tuple[tuple[str, int], float]] = {}  # node id -> when its record was last looked up over the network
        self._republish = trio.Event()
        self._walk_every = 1  # re-publish intervals between two lookups (crawls); doubles while nothing changes
        self._walk_in = 0  # re-publishes left before the next lookup
        self._last_seen: frozenset[str] = frozenset()
        self.dht_port = 0

    # --- validation, for everything stored here and everything read ---

    def _check(self, value: Any, dkey: bytes, now: float) -> NodeRecord:
        """read_record, remembering texts already verified. Error handling: RecordError as read_record."""
        cache_key = (value, dkey) if isinstance(value, (str, bytes)) else None
        record = self._verified.get(cache_key) if cache_key is not None else None
        if record is None:
            record = read_record(value, self.cred, now=now, key_digest=dkey)
            if len(self._verified) >= VERIFIED_CACHE_SIZE:
                self._verified.clear()
            self._verified[cache_key] = record
        elif record.expires_at <= now:
            raise RecordError("record expired")
        return record

    def _validate(self, dkey: bytes, value: Any, current: Any) -> float | None:
        now = self._clock()
        try:
            record = self._check(value, dkey, now)
        except RecordError as exc:
            self.dropped += 1
            log.info("membership.record_dropped", reason=str(exc))
            return None
        if current is not None:
            # An older copy never replaces a newer one, even one that has expired here: a replayed old
            # record (validly signed, and perhaps claiming a longer life) must not bring back old data.
            try:
                held: NodeRecord | None = self._check(current, dkey, now)
            except RecordError:
                try:
                    held = read_record(current, self.cred, now=now, key_digest=dkey, expired_ok=True)
                except RecordError:
                    held = None  # what is held here is not a valid record at all
            if held is not None and held.timestamp >= record.timestamp and current != value:
                return None
        return record.timestamp

    def record(self, node_id: str) -> NodeRecord | None:
        rec = self.members.get(node_id)
        if rec is not None and rec.expires_at <= self._clock():
            return None
        return rec

    def live(self) -> list[NodeRecord]:
        now = self._clock()
        return [r for r in self.members.values() if r.expires_at > now]

    def learn(self, node_ids: Iterable[str]) -> None:
        """Ids heard of outside the DHT (the role map); read at the next refresh."""
        self._also.update(i for i in node_ids if i != self.ident.node_id)

    def publish_soon(self) -> None:
        """Re-publish now (role, term or load changed) rather than at the next interval."""
        self._republish.set()

    def _cached_peers(self) -> list[tuple[str, int]]:
        if self._peer_cache is None:
            return []
        try:
            return [(str(h), int(p)) for h, p in json.loads(self._peer_cache.read_text())][:PEER_CACHE_SIZE]
        except (OSError, ValueError, TypeError):
            return []

    def _save_peers(self) -> None:
        if self._peer_cache is None:
            return
        peers = [list(r.dht) for r in self.live() if r.node_id != self.ident.node_id][:PEER_CACHE_SIZE]
        if peers:
            tmp = self._peer_cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(peers))
            tmp.replace(self._peer_cache)

    # --- loops ---

    async def run(self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.dht_port = await nursery.start(self.dht.run, host, port)
            await self._join()
            await self._publish()
            nursery.start_soon(self._publish_loop)
            nursery.start_soon(self._refresh_loop)
            nursery.start_soon(self._heal_loop)
            task_status.started(self.dht_port)

    async def _join(self) -> None:
        if not self._bootstrap:
            return
        with trio.move_on_after(self.config.rpc_timeout_seconds * LOOKUP_TIMEOUT_FACTOR):
            found = await self.dht.bootstrap(self._bootstrap)
            log.info("dht.joined", via=",".join(f"{h}:{p}" for h, p in self._bootstrap), found=found)

    async def _publish(self, crawl: bool = True) -> None:
        now = self._clock()
        record = self._make_record(now, now + self.config.record_ttl_seconds)
        self.members[record.node_id] = record
        # Bounded by half the re-publish interval rather than an RPC timeout: a store to k nodes under
        # load takes a while, and cutting it short is how records expire across a busy swarm.
        with trio.move_on_after(self.config.republish_seconds / 2):
            await self.dht.put(
                record_key(self.cred.name, record.node_id), sign_record(record, self.ident, self.cred), crawl=crawl
            )

    async def _publish_loop(self) -> None:
        next_at = trio.current_time() + self.config.republish_seconds
        while True:
            with trio.move_on_after(max(0.0, next_at - trio.current_time())):
                await self._republish.wait()
            self._republish = trio.Event()
            # The period counts from one publish to the next, whatever the work below takes; a random
            # tenth shorter, so that nodes started together do not stay in step.
            next_at = trio.current_time() + self.config.republish_seconds * random.uniform(0.9, 1.0)
            # Lookups (the crawl towards our key before storing, the walk towards a random id) back off
            # exponentially while the members we know stay the same; otherwise the record goes to the
            # k closest nodes of the routing table.
            seen = frozenset(self.members) | frozenset(self.dht.contact_ids())
            if seen != self._last_seen:
                self._last_seen, self._walk_every, self._walk_in = seen, 1, 0
            crawl = self._walk_in <= 0
            await self._publish(crawl=crawl)
            self._save_peers()
            if not crawl:
                self._walk_in -= 1
                continue
            self._walk_in = self._walk_every
            self._walk_every = min(2 * self._walk_every, WALK_BACKOFF_MAX)
            walk: dict[str, tuple[str, int]] = {}
            with trio.move_on_after(self.config.rpc_timeout_seconds * LOOKUP_TIMEOUT_FACTOR):
                walk = await self.dht.crawl(secrets.token_bytes(20))
            expires = self._clock() + self.config.record_ttl_seconds
            for node_id, address in walk.items():
                if node_id != self.ident.node_id:
                    self._walked[node_id] = (address, expires)

    async def _heal_loop(self) -> None:
        while True:
            await trio.sleep(HEAL_SECONDS * random.uniform(0.75, 1.25))
            await self.heal()

    def missing(self) -> dict[str, tuple[str, int]]:
        """Members this node lost (their records expired, not read since): id -> last DHT address."""
        now = self._clock()
        self._former = {i: (a, until) for i, (a, until) in self._former.items() if until > now and i not in self.members}
        return {i: a for i, (a, _) in self._former.items()}

    async def heal(self) -> None:
        """Re-join when members are missing or the routing table is empty: ping the configured bootstrap peers,
        the saved peers (``dht-peers.json`` read again) and the last addresses of the missing members.

        A partition expires records on both sides; once it heals, whichever side pings first is welcomed
        into the other's routing table, and the next refresh reads the records again.
        """
        missing = self.missing()
        contacts = self.dht.contacts()
        now = self._clock()
        if self._recorded is not None and (missing or not contacts or now - self._recorded_at >= RECORDED_EVERY):
            # Members recorded in the store that this node has no record of: the other side of a partition
            # it never knew, or everyone, for a node whose bootstrap and saved peers are gone.
            self._recorded_at = now
            for node_id, address in (await self._recorded()).items():
                if node_id != self.ident.node_id and node_id not in self.members and node_id not in contacts:
                    missing[node_id] = address
        if not missing and contacts:
            return
        own = self.members.get(self.ident.node_id)
        known = set(contacts.values()) | ({tuple(own.dht)} if own else set())
        addresses = [a for a in dict.fromkeys([*missing.values(), *self._configured, *self._cached_peers()])
                     if a not in known][:HEAL_BATCH]
        if not addresses:
            return
        found = 0
        with trio.move_on_after(self.config.rpc_timeout_seconds * LOOKUP_TIMEOUT_FACTOR):
            found = await self.dht.bootstrap(addresses)
        # Dead members stay "missing" for a while: only a round that reached someone is worth an info line.
        (log.info if found else log.debug)("dht.rejoin", missing=len(missing), pinged=len(addresses), found=found)

    async def _refresh_loop(self) -> None:
        while True:
            await self.refresh()
            await trio.sleep(self.config.refresh_seconds * random.uniform(0.75, 1.25))

    async def refresh(self) -> None:
        """Re-read the record of every node we know of; forget the expired ones."""
        now = self._clock()
        self._walked = {i: (a, until) for i, (a, until) in self._walked.items() if until > now}
        # The records stored here name members too (with their DHT address): the k closest nodes to a
        # member's key hold a copy, so they know it even when no k-bucket or walk has it.
        held = {}
        for dkey, value in self.dht.stored():
            try:
                rec = self._check(value, dkey, now)
            except RecordError:
                continue
            held[rec.node_id] = tuple(rec.dht)
        contacts = {**held, **{i: a for i, (a, _) in self._walked.items()}, **self.dht.contacts()}
        ids = (set(contacts) | self._also | set(self.members)) - {self.ident.node_id}
        async with trio.open_nursery() as nursery:
            for node_id in ids:
                nursery.start_soon(self._read, node_id, contacts.get(node_id))
        now = self._clock()
        for node_id, rec in list(self.members.items()):
            if rec.expires_at <= now and node_id != self.ident.node_id:
                del self.members[node_id]
                self._looked_up.pop(node_id, None)
                self._former[node_id] = (tuple(rec.dht), now + FORMER_SECONDS)
                log.info("membership.expired", member=node_id[:12])

    async def _read(self, node_id: str, address: tuple[str, int] | None) -> None:
        key = record_key(self.cred.name, node_id)
        dkey = self.dht.digest(key)
        now = self._clock()
        # Only the copy held here: a network lookup for every record not stored here, every refresh,
        # was most of the DHT traffic. The remote read below is at most once per re-publish interval.
        record = self._parse(self.dht.local(key), dkey, now)
        known = self.members.get(node_id)
        newest = max((r for r in (record, known) if r is not None), key=lambda r: r.timestamp, default=None)
        stale = newest is None or newest.timestamp < now - 2 * self.config.republish_seconds
        # At most one remote read per node per re-publish interval (a record is not newer before then),
        # a few at a time: asked of the node itself (one RPC), else looked up (a crawl, several RPCs).
        due = now - self._looked_up.get(node_id, -math.inf) >= self.config.republish_seconds
        if stale and due:
            self._looked_up[node_id] = now
            async with self._lookups:
                with trio.move_on_after(self.config.rpc_timeout_seconds * LOOKUP_TIMEOUT_FACTOR):
                    if address is None and known is not None:
                        address = known.dht
                    if address is not None:
                        value = await self.dht.ask(node_id, address, key)
                    else:
                        value = await self.dht.get(key, network=True)
                    fresher = self._parse(value, dkey, now)
                    if fresher is not None and (record is None or fresher.timestamp > record.timestamp):
                        record = fresher
            if known is not None and (record is None or record.timestamp <= known.timestamp):
                # No newer copy of a member's record close to expiry (a reply lost on a busy host):
                # try again at the next refresh rather than a re-publish interval later, after it expired.
                self._looked_up.pop(node_id, None)
        if record is None:
            return
        if known is None or record.timestamp >= known.timestamp:
            if known is None:
                log.info("membership.joined", member=node_id[:12], peer=record.peer)
                self._also.discard(node_id)
            self.members[node_id] = record

    def _parse(self, value: Any, dkey: bytes, now: float) -> NodeRecord | None:
        if value is None:
            return None
        try:
            return self._check(value, dkey, now)
        except RecordError as exc:
            self.dropped += 1
            log.debug("membership.record_dropped", reason=str(exc))
            return None
