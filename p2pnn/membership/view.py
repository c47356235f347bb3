"""MemberView: this node's record and beats, and the records of every member it can find.

Records and beats: a node signs its record (:mod:`records`) when its content
changes (roles, term, load, addresses) or its liveness hash chain is about to
end, and stores it in the DHT under its key (on the k closest nodes, after a
lookup of them); again at the next re-publish interval after the members
changed (the closest nodes may be others now) and once more ``SETTLE_STORES``
intervals later, else every ``STORE_EVERY`` intervals without the lookup. Between two records it stays alive by *beats*:
every ``republish_seconds`` the next link of the record's hash chain, which
only it can make and anyone checks with a few hashes. A member is live until
``record_ttl_seconds`` after the time of its newest beat this node has
checked; a record is verified (signature, HMAC) once per version.

Gossip instead of one read per member: every ``refresh_seconds`` a node
sends the ``members`` RPC to ``GOSSIP_FANOUT`` random members. The request
carries its own record and beat (so the other side learns of it at once) and
a summary of what it holds (10 bytes a member: id prefix, record version,
beat); the reply carries only what is newer there: beats, and the records of
versions the asker lacks (up to ``REPLY_BYTES``). While a reply says it had
more records than fit, the next round follows at once (a node joining a big swarm has all
records after a few rounds); in steady state a round costs ``GOSSIP_FANOUT``
RPCs sent and as many served, whatever the swarm's size, and verifies nothing
but the beats (hashes). Walks towards random ids are gone: a new member
spreads through the gossip.

Nodes known by id or address but not as members (routing-table contacts, ids
of the principal's role map) are asked directly with the same RPC, at most
once per re-publish interval each, without our record and beats (a node cut
off one way must not keep counting us live); ids without an address are
looked up in the DHT first.

Graceful degradation: on a loaded host a round can time out. A node that has
heard no gossip reply for a while judges its members as of its last reply
(at most ``record_ttl_seconds`` back) rather than evicting everyone, and
backs off (up to ``BACKOFF_MAX`` times the interval) instead of piling up
RPCs; unanswered RPCs evict a contact only at the second miss in a row
(dht.py).

The DHT addresses of the members last seen are kept in a small file in the
data directory (``dht-peers.json``) and added to the bootstrap peers at the
next start, so a node that comes back after its configured bootstrap peer
died still finds the swarm.

Healing: a partition lapses members on both sides, and Kademlia drops the
unreachable from its routing tables, so neither side would look for the other
again. Every ``HEAL_SECONDS`` a node that misses members (lapsed, for
``FORMER_SECONDS``) or has an empty routing table pings the last addresses of
those members, the configured bootstrap peers, the saved peers
(``dht-peers.json``, read again each time) and the members recorded in the
store that it has no record of (read then, and every ``RECORDED_EVERY``
otherwise): HEAL_BATCH of them at random per round, every other round while
none answers, so that a swarm that lost much (an overloaded host) is not
flooded with pings; whoever answers is back in the routing table, and the next
round reads its record and beats.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import struct
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
from p2pnn.membership.records import (
    CHAIN_SECONDS, MAX_LINKS, Beat, NodeRecord, RecordError, beat_time, check_beat, make_chain,
    read_record, record_key, sign_record,
)

log = logs.get(__name__)

VERIFIED_CACHE_SIZE = 4096  # record texts whose signature and HMAC were checked (a full check is ~0.2-0.4 ms)
CONCURRENT_LOOKUPS = 8  # RPCs to nodes not yet members in flight at once (bounded: a busy host must not pile them up)
UNKNOWN_PER_ROUND = 4  # nodes not yet members asked directly in one refresh round at most
PEER_CACHE_SIZE = 32  # DHT addresses remembered for the next start
LOOKUP_TIMEOUT_FACTOR = 3  # a network lookup gets this many RPC timeouts before it is given up for this round
GOSSIP_FANOUT = 2  # members pulled from per round: a beat reaches n members in about log3(n) + 2 rounds
SUMMARY = struct.Struct("!4sIH")  # a member in a gossip summary: id prefix, record version (ms, mod 2^32), beat
BEAT = struct.Struct("!20sdI16s")  # a beat on the wire: node id, record version, index, chain link
SUMMARY_MAX = 600  # members in one summary at most: the request, own record included, must stay under 8 KiB
REPLY_BYTES = 16000  # a gossip reply stops adding records here (about 20): one UDP datagram, a few IP fragments
RUMOR_SENDS = 4  # requests that pass on a beat newly checked here (two rounds): push beside the pull
REQUEST_BYTES = 7600  # a request (summary, own record, beats passed on) stays under rpcudp's 8 KiB
SOON = 0.05  # seconds before the next round while replies bring new records (joining): catch up quickly
BACKOFF_MAX = 4  # a node whose rounds go unanswered waits up to this many intervals between rounds
SETTLE_STORES = 4  # re-publish intervals after a store that followed a change, before it is made once more
STORE_EVERY = 6  # re-publish intervals between two stores of an unchanged record (members unchanged too) in the DHT
STORED_LIFE = 3  # a stored copy is forgotten STORED_LIFE stores after it was last stored
CHAIN_SPARE = 2  # a new record is signed when fewer links than this are left in the chain
HEAL_SECONDS = 2.0  # how often a node looks for members it lost (a healed partition is merged within a few of these)
FORMER_SECONDS = 600.0  # how long the address of a member whose record expired is still tried
HEAL_BATCH = 4  # addresses pinged in one re-join round at most (a random few: 200 nodes missing 200 must not flood)
HEAL_BACKOFF_MAX = 2  # rounds that reach nobody stretch the interval up to this many HEAL_SECONDS
RECORDED_EVERY = 15.0  # seconds between two reads of the members recorded elsewhere while nothing is missing


def _stamp(version: float) -> int:
    """A record version (its timestamp) in 32 bits, for summaries: milliseconds, wrapped."""
    return int(version * 1000) & 0xFFFFFFFF


class MemberView:
    """Resource handling: ``run`` (nursery.start) joins, publishes and keeps gossiping until cancelled.

    Error handling: invalid records and beats are dropped (records counted in ``dropped``), never raised.
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
            ttl=max(config.record_ttl_seconds, STORED_LIFE * STORE_EVERY * config.republish_seconds),
            gossip=self._serve_members,
        )
        self.members: dict[str, NodeRecord] = {}
        self._texts: dict[str, str] = {}  # the signed text of each member's record, to pass on
        self._beats: dict[str, Beat] = {}  # the newest checked beat of each member
        # Per member, kept up to date as records and beats come in (live() and every RPC served read them):
        self._until: dict[str, float] = {}  # until when it counts as live (_alive_until)
        self._parts: dict[str, bytes] = {}  # its entry in our summary
        self._rumors: dict[str, int] = {}  # members whose newest beat is still to be passed on: id -> sends left
        self.dropped = 0
        self.verified = 0  # full record checks (signature and HMAC) done, for tests and benchmarks
        self._also: set[str] = set()
        self._looked_up: dict[str, float] = {}  # node id -> when a node not yet a member was last asked
        self._verified: dict[Any, NodeRecord] = {}
        self._lookups = trio.CapacityLimiter(CONCURRENT_LOOKUPS)
        self._republish = trio.Event()
        self._chain: list[bytes] = []
        self._content: NodeRecord | None = None  # our record without its times and chain: what a change is
        self._heard_at = -math.inf  # when a gossip reply last came (clock)
        self._stored_seen: frozenset[str] = frozenset()
        self._restore = False  # the last store followed a change: make it once more, SETTLE_STORES intervals later
        self.dht_port = 0

    # --- validation, for everything stored here and everything read ---

    def _check(self, value: Any, dkey: bytes, now: float) -> NodeRecord:
        """read_record, remembering texts already verified. Error handling: RecordError as read_record."""
        cache_key = (value, dkey) if isinstance(value, (str, bytes)) else None
        record = self._verified.get(cache_key) if cache_key is not None else None
        if record is None:
            self.verified += 1
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

    # --- liveness ---

    def _alive_until(self, record: NodeRecord) -> float:
        """Until when ``record``'s node counts as live: ``record_ttl_seconds`` after its newest checked beat."""
        if record.node_id == self.ident.node_id:
            return math.inf
        beat = self._beats.get(record.node_id)
        index = beat.index if beat is not None and beat.version == record.timestamp else 0
        return min(record.expires_at, beat_time(record, index) + self.config.record_ttl_seconds)

    def _horizon(self) -> float:
        """The time members are judged live at: now, or (no gossip reply for a while: a loaded or cut-off host)
        shortly after the last reply, but never more than ``record_ttl_seconds`` ago."""
        now = self._clock()
        return max(min(now, self._heard_at + self.config.republish_seconds), now - self.config.record_ttl_seconds)

    def _admit(self, record: NodeRecord, text: str) -> None:
        """``record`` (signed as ``text``) is the member's record now."""
        self.members[record.node_id] = record
        self._texts[record.node_id] = text
        self._update(record.node_id)

    def _update(self, node_id: str) -> None:
        """The member's record or beat changed: its life and its summary entry too."""
        record = self.members[node_id]
        self._until[node_id] = self._alive_until(record)
        beat = self._beats.get(node_id)
        index = beat.index if beat is not None and beat.version == record.timestamp else 0
        self._parts[node_id] = SUMMARY.pack(bytes.fromhex(node_id)[:4], _stamp(record.timestamp), min(index, 0xFFFF))

    def _forget(self, node_id: str) -> None:
        self.members.pop(node_id, None)
        for cache in (self._texts, self._until, self._parts):
            cache.pop(node_id, None)

    def record(self, node_id: str) -> NodeRecord | None:
        rec = self.members.get(node_id)
        if rec is not None and self._until[node_id] <= self._horizon():
            return None
        return rec

    def live(self) -> list[NodeRecord]:
        horizon, until = self._horizon(), self._until
        return [r for i, r in self.members.items() if until[i] > horizon]

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

    # --- our own record and beats ---

    def _sign(self) -> bool:
        """Sign a new record of ours when its content changed or its chain is nearly used up; True when signed."""
        now = self._clock()
        draft = self._make_record(now, now)
        content = dataclasses.replace(draft, timestamp=0.0, expires_at=0.0)
        own = self.members.get(self.ident.node_id)
        if own is not None and content == self._content and self._own_beat(now).index < own.links - CHAIN_SPARE:
            return False
        beat = self.config.republish_seconds
        links = max(CHAIN_SPARE + 2, min(MAX_LINKS, math.ceil(CHAIN_SECONDS / beat)))
        self._chain = make_chain(links)
        record = dataclasses.replace(
            draft, expires_at=now + links * beat + self.config.record_ttl_seconds, chain=self._chain[-1].hex(),
            beat=beat, links=links,
        )
        self._admit(record, sign_record(record, self.ident, self.cred))
        self._content = content
        return True

    def _own_beat(self, now: float) -> Beat:
        own = self.members[self.ident.node_id]
        index = min(own.links, max(0, int((now - own.timestamp) // own.beat)))
        return Beat(own.timestamp, index, self._chain[own.links - index])

    async def _store(self, crawl: bool) -> None:
        own = self.ident.node_id
        # Bounded by half the re-publish interval rather than an RPC timeout: a store to k nodes under
        # load takes a while, and cutting it short only delays it to the next store.
        with trio.move_on_after(self.config.republish_seconds / 2):
            await self.dht.put(record_key(self.cred.name, own), self._texts[own], crawl=crawl)

    # --- gossip ---

    def _summary(self) -> bytes:
        """What this node holds, 10 bytes a member: id prefix, record version, beat index."""
        me = self.ident.node_id
        own = self._own_beat(self._clock())
        parts = [p for i, p in self._parts.items() if i != me]
        parts.append(SUMMARY.pack(bytes.fromhex(me)[:4], _stamp(own.version), min(own.index, 0xFFFF)))
        if len(parts) > SUMMARY_MAX:  # the rest is sent in full by whoever answers: more bytes, still correct
            parts = random.sample(parts, SUMMARY_MAX)
        return b"".join(parts)

    def _own_beat_bytes(self) -> bytes:
        beat = self._own_beat(self._clock())
        return BEAT.pack(bytes.fromhex(self.ident.node_id), beat.version, beat.index, beat.reveal)

    def _rumor_bytes(self, budget: int) -> bytes:
        """Beats newly checked here, to pass on in a request (each RUMOR_SENDS times), within ``budget`` bytes."""
        out = []
        for node_id in list(self._rumors)[: max(0, budget) // BEAT.size]:
            beat, record = self._beats.get(node_id), self.members.get(node_id)
            left = self._rumors.pop(node_id) - 1
            if beat is None or record is None or beat.version != record.timestamp:
                continue
            out.append(BEAT.pack(bytes.fromhex(node_id), beat.version, beat.index, beat.reveal))
            if left > 0:
                self._rumors[node_id] = left  # to the end of the queue
        return b"".join(out)

    def _serve_members(self, sender_id: Any, sender: tuple[str, int], text: Any, summary: Any, beats: Any) -> Any:
        """The ``members`` RPC: take the asker's record and the beats it passes on, answer with what it lacks.

        Error handling: whatever the input, never raises; what does not check out is ignored."""
        now = self._clock()
        if self.ident.node_id not in self.members:  # not started yet
            return None
        self._absorb([text], beats, now)
        asker = sender_id.hex() if isinstance(sender_id, bytes) else None
        held: dict[bytes, bytes] = {}  # id prefix -> the asker's summary entry
        if isinstance(summary, bytes):
            size = SUMMARY.size
            for offset in range(0, min(len(summary), SUMMARY_MAX * size) - size + 1, size):
                held[summary[offset:offset + 4]] = summary[offset:offset + size]
        me, horizon, until, parts, beats_held = self.ident.node_id, self._horizon(), self._until, self._parts, self._beats
        beat_out, records, size = [], [], 0
        for node_id, rec in self.members.items():
            if node_id == asker or until[node_id] <= horizon:
                continue
            if node_id == me:
                beat: Beat | None = self._own_beat(now)
                part = SUMMARY.pack(bytes.fromhex(me)[:4], _stamp(rec.timestamp), min(beat.index, 0xFFFF))
            else:
                beat, part = beats_held.get(node_id), parts[node_id]
            theirs = held.get(part[:4])
            if theirs == part:  # the asker holds just this: the common case in a steady swarm
                continue
            packed = (BEAT.pack(bytes.fromhex(node_id), beat.version, beat.index, beat.reveal)
                      if beat is not None and beat.version == rec.timestamp and beat.index > 0 else b"")
            if theirs is None or theirs[4:8] != part[4:8]:
                records.append((self._texts[node_id], packed))
            elif packed and beat is not None and beat.index > SUMMARY.unpack(theirs)[2]:
                beat_out.append(packed)
                size += len(packed)
        random.shuffle(records)  # askers that cannot take all get different ones from different members
        texts, more = [], False
        for text_out, packed in records:
            if size + len(text_out) + len(packed) > REPLY_BYTES:
                more = True
                break
            texts.append(text_out)
            beat_out.append(packed)
            size += len(text_out) + len(packed)
        return [more, texts, b"".join(beat_out)]

    def _absorb(self, texts: Any, beats: Any, now: float) -> bool:
        """Take records (checked once per version) and beats from a gossip message; True when a record was new here.

        A record is taken only when it (with the beats beside it) shows its node live.
        """
        me = self.ident.node_id
        fresh: dict[str, tuple[NodeRecord, str]] = {}
        for text in texts[:REPLY_BYTES // 200] if isinstance(texts, list) else ():
            if not isinstance(text, str):
                continue
            try:
                record = self._check(text, None, now)
            except RecordError as exc:
                self.dropped += 1
                log.info("membership.record_dropped", reason=str(exc))
                continue
            known = self.members.get(record.node_id)
            if record.node_id != me and (known is None or record.timestamp > known.timestamp):
                fresh[record.node_id] = (record, text)
        if isinstance(beats, bytes):
            size = BEAT.size
            for offset in range(0, min(len(beats), REPLY_BYTES) - size + 1, size):
                raw, version, index, reveal = BEAT.unpack_from(beats, offset)
                node_id = raw.hex()
                record = fresh[node_id][0] if node_id in fresh else self.members.get(node_id)
                if record is None or record.timestamp != version or node_id == me:
                    continue
                held = self._beats.get(node_id)
                held = held if held is not None and held.version == version else None
                if index <= (held.index if held is not None else 0):
                    continue
                beat = Beat(version, index, reveal)
                if check_beat(record, beat, held, now=now):
                    self._beats[node_id] = beat
                    self._rumors[node_id] = RUMOR_SENDS
                    if node_id not in fresh:
                        self._update(node_id)
        news = False
        horizon = self._horizon()
        for node_id, (record, text) in fresh.items():
            if self._alive_until(record) <= horizon:
                continue
            if node_id not in self.members:
                log.info("membership.joined", member=node_id[:12], peer=record.peer)
            self._admit(record, text)
            self._also.discard(node_id)
            self._former.pop(node_id, None)
            news = True
        return news

    async def _pull(self, node_id: str, address: tuple[str, int], push: bool = True) -> tuple[bool, bool]:
        """One gossip exchange with the node at ``address``: (answered, it had more records than fit its reply).

        ``push``: send our record, our beat and the beats to pass on too (to members). A node that is not a
        member here is only asked: were our beats pushed to it, it would keep counting us live while its
        replies never reach us (a one-way cut), though we count it out.
        """
        summary = self._summary()
        text: str | None = None
        beats = b""
        if push:
            text = self._texts[self.ident.node_id]
            beats = self._own_beat_bytes() + self._rumor_bytes(REQUEST_BYTES - len(summary) - len(text))
        reply = await self.dht.exchange(node_id, address, text, summary, beats)
        if not (isinstance(reply, list) and len(reply) == 3):
            return False, False
        now = self._clock()
        self._heard_at = now
        self._absorb(reply[1], reply[2], now)
        return True, bool(reply[0])

    # --- loops ---

    async def run(self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.dht_port = await nursery.start(self.dht.run, host, port)
            self._sign()
            await self._join()
            nursery.start_soon(self._publish_loop)
            nursery.start_soon(self._gossip_loop)
            nursery.start_soon(self._refresh_loop)
            nursery.start_soon(self._heal_loop)
            task_status.started(self.dht_port)

    async def _join(self) -> None:
        """Ping the bootstrap peers: those that answer are the first contacts, and gossip needs no more. The
        routing table fills from the gossip (every node heard from is welcomed) and from the lookups of the
        first re-publish interval (our own id, our record's key)."""
        if not self._bootstrap:
            return
        answered = 0
        with trio.move_on_after(self.config.rpc_timeout_seconds * LOOKUP_TIMEOUT_FACTOR):
            answered = await self.dht.greet(self._bootstrap)
        log.info("dht.joined", via=",".join(f"{h}:{p}" for h, p in self._bootstrap), answered=answered)

    async def _publish_loop(self) -> None:
        next_at = trio.current_time() + self.config.republish_seconds
        stores_in = STORE_EVERY
        # A lookup of our own id tells the nodes closest to it about us and fills that part of our routing
        # table (record lookups near our id need it): one re-publish interval after the join, not with it,
        # so that 200 nodes joining at once do not flood a two-core host.
        looked_up_own = False
        while True:
            with trio.move_on_after(max(0.0, next_at - trio.current_time())):
                await self._republish.wait()
            self._republish = trio.Event()
            # A random tenth shorter, so that nodes started together do not stay in step.
            next_at = trio.current_time() + self.config.republish_seconds * random.uniform(0.9, 1.0)
            if not looked_up_own:
                looked_up_own = True
                with trio.move_on_after(self.config.rpc_timeout_seconds * LOOKUP_TIMEOUT_FACTOR):
                    await self.dht.crawl()
            signed = self._sign()
            stores_in -= 1
            self._save_peers()
            # A new record, or one stored before the members changed (the nodes closest to its key may be
            # others now), is stored at once, after a lookup of the nodes closest to its key (which also
            # tells them about us); an unchanged one every STORE_EVERY intervals on the k closest nodes of
            # the routing table, which saves the lookup's RPCs.
            seen = frozenset(self.members)
            changed = signed or seen != self._stored_seen
            if not changed and stores_in > 0:
                continue
            # A store after a change is made again, with a lookup, SETTLE_STORES intervals later: the
            # routing tables of a swarm that just grew may not have named the closest nodes yet.
            crawl, self._restore = changed or self._restore, changed
            stores_in = SETTLE_STORES if changed else STORE_EVERY
            self._stored_seen = seen
            await self._store(crawl=crawl)

    async def _gossip_loop(self) -> None:
        backoff = 1
        while True:
            answered, more = await self.gossip()
            if more:
                await trio.sleep(SOON)
                continue
            backoff = 1 if answered else min(2 * backoff, BACKOFF_MAX)
            await trio.sleep(self.config.refresh_seconds * backoff * random.uniform(0.75, 1.25))

    async def gossip(self) -> tuple[bool, bool]:
        """One round: a ``members`` exchange with up to GOSSIP_FANOUT random members (or contacts, before
        there are members). Returns (any answered, any had more records than fit its reply)."""
        me = self.ident.node_id
        peers = {r.node_id: tuple(r.dht) for r in self.live() if r.node_id != me}
        if not peers:
            peers = {i: a for i, a in self.dht.contacts().items() if i != me}
        if not peers:
            return True, False  # nobody to ask is no reason to back off
        chosen = random.sample(sorted(peers), min(GOSSIP_FANOUT, len(peers)))
        results: list[tuple[bool, bool]] = []

        async def one(node_id: str) -> None:
            with trio.move_on_after(self.config.rpc_timeout_seconds * LOOKUP_TIMEOUT_FACTOR):
                results.append(await self._pull(node_id, peers[node_id]))

        async with trio.open_nursery() as nursery:
            for node_id in chosen:
                nursery.start_soon(one, node_id)
        return any(a for a, _ in results), any(n for _, n in results)

    async def _heal_loop(self) -> None:
        backoff = 1
        while True:
            await trio.sleep(backoff * HEAL_SECONDS * random.uniform(0.75, 1.25))
            reached = await self.heal()
            backoff = 1 if reached else min(2 * backoff, HEAL_BACKOFF_MAX)

    def missing(self) -> dict[str, tuple[str, int]]:
        """Members this node lost (their records lapsed, not read since): id -> last DHT address."""
        now = self._clock()
        self._former = {i: (a, until) for i, (a, until) in self._former.items() if until > now and i not in self.members}
        return {i: a for i, (a, _) in self._former.items()}

    async def heal(self) -> bool:
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
            return True
        own = self.members.get(self.ident.node_id)
        known = set(contacts.values()) | ({tuple(own.dht)} if own else set())
        addresses = [a for a in dict.fromkeys([*missing.values(), *self._configured, *self._cached_peers()])
                     if a not in known]
        if len(addresses) > HEAL_BATCH:
            addresses = random.sample(addresses, HEAL_BATCH)
        if not addresses:
            return True
        found = 0
        with trio.move_on_after(self.config.rpc_timeout_seconds * LOOKUP_TIMEOUT_FACTOR):
            found = await self.dht.greet(addresses)
        # Dead members stay "missing" for a while: only a round that reached someone is worth an info line.
        (log.info if found else log.debug)("dht.rejoin", missing=len(missing), pinged=len(addresses), found=found)
        return found > 0

    async def _refresh_loop(self) -> None:
        while True:
            await self.refresh()
            await trio.sleep(self.config.refresh_seconds * random.uniform(0.75, 1.25))

    async def refresh(self) -> None:
        """Lapse the members whose beats stopped; ask the nodes known but not yet members (a few a round)."""
        horizon = self._horizon()
        now = self._clock()
        for node_id, rec in list(self.members.items()):
            if node_id != self.ident.node_id and self._until[node_id] <= horizon:
                self._forget(node_id)
                self._former[node_id] = (tuple(rec.dht), now + FORMER_SECONDS)
                log.info("membership.expired", member=node_id[:12])
        self._beats = {i: b for i, b in self._beats.items() if i in self.members or i in self._former}
        self._rumors = {i: n for i, n in self._rumors.items() if i in self.members}
        contacts = self.dht.contacts()
        due = [i for i in (set(contacts) | self._also) - set(self.members) - {self.ident.node_id}
               if now - self._looked_up.get(i, -math.inf) >= self.config.republish_seconds]
        if len(self._looked_up) > 4 * VERIFIED_CACHE_SIZE:
            self._looked_up = {i: t for i, t in self._looked_up.items() if now - t < self.config.republish_seconds}
        async with trio.open_nursery() as nursery:
            for node_id in random.sample(due, min(UNKNOWN_PER_ROUND, len(due))):
                self._looked_up[node_id] = now
                nursery.start_soon(self._read, node_id, contacts.get(node_id))

    async def _read(self, node_id: str, address: tuple[str, int] | None) -> None:
        """Ask a node that is not a member yet for its record and beat (and all it knows): one ``members`` RPC
        to its address, looked up in the DHT first when only its id is known."""
        async with self._lookups:
            with trio.move_on_after(self.config.rpc_timeout_seconds * LOOKUP_TIMEOUT_FACTOR):
                if address is None:
                    key = record_key(self.cred.name, node_id)
                    value = await self.dht.get(key, network=True)
                    record = self._parse(value, self.dht.digest(key), self._clock())
                    if record is None:
                        return
                    address = tuple(record.dht)
                await self._pull(node_id, address, push=False)

    def _parse(self, value: Any, dkey: bytes, now: float) -> NodeRecord | None:
        if value is None:
            return None
        try:
            return self._check(value, dkey, now)
        except RecordError as exc:
            self.dropped += 1
            log.debug("membership.record_dropped", reason=str(exc))
            return None
