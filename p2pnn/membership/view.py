"""MemberView: this node's record, published on an interval, and the records of every member it can find.

Discovery: the kademlia node id of every p2pnn node is its p2pnn node id, so
every id in the routing table names a record key; those ids, and any ids
heard of otherwise (the principal's role map), are read every
``refresh_seconds`` -- from this node's own storage when the copy there is
recent, else by a network lookup -- and kept while their records are valid.
A crawl for our own id on every re-publish keeps the routing table filling
as nodes join.

The DHT addresses of the members last seen are kept in a small file in the
data directory (``dht-peers.json``) and added to the bootstrap peers at the
next start, so a node that comes back after its configured bootstrap peer
died still finds the swarm.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
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

PEER_CACHE_SIZE = 32  # DHT addresses remembered for the next start
LOOKUP_TIMEOUT_FACTOR = 3  # a network lookup gets this many RPC timeouts before it is given up for this round


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
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ident = ident
        self.cred = cred
        self.config = config
        self._peer_cache = peer_cache
        self._bootstrap = list(dict.fromkeys([*bootstrap, *self._cached_peers()]))
        self._make_record = make_record
        self._clock = clock
        self.dht = DhtNode(
            node_id=ident.node_id, validator=self._validate, rpc_timeout=config.rpc_timeout_seconds,
            ttl=config.record_ttl_seconds,
        )
        self.members: dict[str, NodeRecord] = {}
        self.dropped = 0
        self._also: set[str] = set()
        self._republish = trio.Event()
        self.dht_port = 0

    # --- validation, for everything stored here and everything read ---

    def _validate(self, dkey: bytes, value: Any, current: Any) -> float | None:
        now = self._clock()
        try:
            record = read_record(value, self.cred, now=now, key_digest=dkey)
        except RecordError as exc:
            self.dropped += 1
            log.info("membership.record_dropped", reason=str(exc))
            return None
        if current is not None:
            try:
                if read_record(current, self.cred, now=now, key_digest=dkey).timestamp > record.timestamp:
                    return None  # an older copy of a record we have a newer one of
            except RecordError:
                pass
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
            task_status.started(self.dht_port)

    async def _join(self) -> None:
        if not self._bootstrap:
            return
        with trio.move_on_after(self.config.rpc_timeout_seconds * LOOKUP_TIMEOUT_FACTOR):
            found = await self.dht.bootstrap(self._bootstrap)
            log.info("dht.joined", via=",".join(f"{h}:{p}" for h, p in self._bootstrap), found=found)

    async def _publish(self) -> None:
        now = self._clock()
        record = self._make_record(now, now + self.config.record_ttl_seconds)
        self.members[record.node_id] = record
        with trio.move_on_after(self.config.rpc_timeout_seconds * LOOKUP_TIMEOUT_FACTOR):
            await self.dht.put(record_key(self.cred.name, record.node_id), sign_record(record, self.ident, self.cred))

    async def _publish_loop(self) -> None:
        while True:
            with trio.move_on_after(self.config.republish_seconds):
                await self._republish.wait()
            self._republish = trio.Event()
            if not self.dht.contact_ids() and self._bootstrap:
                await self._join()  # the bootstrap peer was not up yet, or everyone we knew is gone
            with trio.move_on_after(self.config.rpc_timeout_seconds * LOOKUP_TIMEOUT_FACTOR):
                await self.dht.crawl()
            await self._publish()
            self._save_peers()

    async def _refresh_loop(self) -> None:
        while True:
            await self.refresh()
            await trio.sleep(self.config.refresh_seconds)

    async def refresh(self) -> None:
        """Re-read the record of every node we know of; forget the expired ones."""
        ids = (set(self.dht.contact_ids()) | self._also | set(self.members)) - {self.ident.node_id}
        async with trio.open_nursery() as nursery:
            for node_id in ids:
                nursery.start_soon(self._read, node_id)
        now = self._clock()
        for node_id, rec in list(self.members.items()):
            if rec.expires_at <= now and node_id != self.ident.node_id:
                del self.members[node_id]
                log.info("membership.expired", member=node_id[:12])

    async def _read(self, node_id: str) -> None:
        key = record_key(self.cred.name, node_id)
        dkey = self.dht.digest(key)
        now = self._clock()
        record = self._parse(await self.dht.get(key), dkey, now)
        if record is None or record.timestamp < now - 2 * self.config.republish_seconds:
            with trio.move_on_after(self.config.rpc_timeout_seconds * LOOKUP_TIMEOUT_FACTOR):
                fresher = self._parse(await self.dht.get(key, network=True), dkey, now)
                if fresher is not None and (record is None or fresher.timestamp > record.timestamp):
                    record = fresher
        if record is None:
            return
        known = self.members.get(node_id)
        if known is None or record.timestamp >= known.timestamp:
            if known is None:
                log.info("membership.joined", member=node_id[:12], peer=record.peer)
                self._also.discard(node_id)
            self.members[node_id] = record

    def _parse(self, value: Any, dkey: bytes, now: float) -> NodeRecord | None:
        if value is None:
            return None
        try:
            return read_record(value, self.cred, now=now, key_digest=dkey)
        except RecordError as exc:
            self.dropped += 1
            log.debug("membership.record_dropped", reason=str(exc))
            return None
