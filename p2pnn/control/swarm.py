"""SwarmNode: one node's part in the swarm -- membership, peer links, election, role assignment.

The node gives it one callback, ``on_assignment(roles, an_id)``, and every
role change goes through it: assignments from the principal's heartbeat,
the principal's own roles, and dropping ``principal`` on stepping down.
Assignments are applied by one task, latest first, so a slow change (a Ki
handing its tasks back) never holds up the peer link that delivered it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from p2pnn import logs
from p2pnn.config import Config
from p2pnn.control.election import Election, rank
from p2pnn.control.links import PeerLinks
from p2pnn.control.policy import Candidate, assign_roles
from p2pnn.credential import SwarmCredential
from p2pnn.identity import Identity
from p2pnn.membership.dht import resolve
from p2pnn.membership.records import NodeRecord, capabilities
from p2pnn.membership.view import MemberView
from p2pnn.store import Assignment, Fence, StoreError, TaskStore

log = logs.get(__name__)

OnAssignment = Callable[[frozenset[str], "str | None"], Awaitable[None]]
PEER_CACHE_FILE = "dht-peers.json"  # in the data directory: DHT addresses of members seen, to bootstrap from next time
RESIGN_TIMEOUT = 2.0  # seconds a stopping principal spends releasing its lease; else it lapses by itself
MEMBER_RECORD_SECONDS = 60.0  # a node refreshes its address in the store this often
MEMBER_FORGET_SECONDS = 600.0  # addresses not refreshed for this long are not tried any more
ROLE_MAP_REWRITE_SECONDS = 10.0  # the principal re-writes an unchanged role map this often (a cheap audit trail of liveness)


def advertise_host(config: Config, bootstrap: list[tuple[str, int]]) -> str:
    """The IP address peers reach this node at (see swarm.advertise_host)."""
    if config.swarm.advertise_host:
        return config.swarm.advertise_host
    if config.dht.host not in ("0.0.0.0", "::", ""):
        return config.dht.host
    if bootstrap:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.connect(bootstrap[0])  # no packet is sent: this only asks the kernel for a route
                return probe.getsockname()[0]
            except OSError:
                pass
    return "127.0.0.1"


class SwarmNode:
    """Resource handling: ``run`` (nursery.start) binds the peer link and the DHT, joins, and runs
    until cancelled; ``started`` is reached once this node's record is published.

    Error handling: unreachable peers and store outages are logged and retried; only a port that
    cannot be bound raises (OSError) from ``run``.
    """

    def __init__(
        self,
        *,
        config: Config,
        ident: Identity,
        cred: SwarmCredential,
        store: TaskStore,
        on_assignment: OnAssignment,
        load: Callable[[], dict[str, int]],
        api_url: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.ident = ident
        self.cred = cred
        self.store = store
        self._on_assignment = on_assignment
        self._load = load
        self._clock = clock
        self.bootstrap = resolve(config.dht.bootstrap_peers)
        self.host = advertise_host(config, self.bootstrap)
        self.api_url = api_url.replace("://127.0.0.1:", f"://{self.host}:") if self.host != "127.0.0.1" else api_url
        self.prefers = config.node.role
        self.capabilities = capabilities()
        self.peer_port = 0
        self.roles: frozenset[str] = frozenset()
        self.an_id: str | None = None
        self.role_map: dict[str, Assignment] = {}
        self._written_at = 0.0
        self._wanted: tuple[frozenset[str], str | None] | None = None
        self._apply = trio.Event()
        self.view = MemberView(
            ident=ident, cred=cred, config=config.dht, bootstrap=self.bootstrap, make_record=self._record,
            peer_cache=config.data_dir / PEER_CACHE_FILE, recorded=self._recorded_members, clock=clock,
        )
        self.links = PeerLinks(
            ident=ident, cred=cred, member=self.view.record, handler=self._on_message, term=lambda: self.election.term,
            replay_window=config.peer.replay_window_seconds, connect_timeout=config.peer.connect_timeout_seconds,
            clock=clock,
        )
        self.election = Election(
            me=ident.node_id, my_rank=rank(config.swarm.priority, self.prefers, ident.node_id), swarm=cred.name,
            store=store, config=config.swarm, links=self.links, peers=self._peers, lead=self._lead,
            follow=self._follow, stepped_down=self._stepped_down, clock=clock,
        )

    # --- lifecycle ---

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self.peer_port = await nursery.start(self.links.run, self.config.peer.host, self.config.peer.port)
                await nursery.start(self.view.run, self.config.dht.host, self.config.dht.port)
                nursery.start_soon(self._apply_loop)
                nursery.start_soon(self.election.run)
                nursery.start_soon(self._record_member_loop)
                nursery.start_soon(self._orphan_watch)
                log.info("swarm.joined", swarm=self.cred.name, dht=f"{self.host}:{self.view.dht_port}",
                         peer=f"ws://{self.host}:{self.peer_port}", members=len(self.view.live()))
                task_status.started()
        finally:
            # A principal that stops cleanly hands its term back, so the next one need not wait for the lease.
            with trio.CancelScope(shield=True), trio.move_on_after(RESIGN_TIMEOUT):
                await self.election.resign()

    def _record(self, now: float, expires_at: float) -> NodeRecord:
        return NodeRecord(
            node_id=self.ident.node_id, dht=(self.host, self.view.dht_port), peer=f"ws://{self.host}:{self.peer_port}",
            api=self.api_url, capabilities=self.capabilities, prefers=self.prefers, priority=self.config.swarm.priority,
            roles=tuple(sorted(self.roles)), an_id=self.an_id, load=self._load(), term=self.election.term,
            timestamp=now, expires_at=expires_at,
        )

    async def _record_member_loop(self) -> None:
        """Keep this node's DHT address in the store, where a node that lost the swarm looks for members."""
        while True:
            try:
                await self.store.record_member(self.cred.name, self.ident.node_id, (self.host, self.view.dht_port),
                                               now=self._clock())
            except StoreError as exc:
                log.warning("swarm.member_unrecorded", error=str(exc))
            await trio.sleep(MEMBER_RECORD_SECONDS)

    async def _recorded_members(self) -> dict[str, tuple[str, int]]:
        try:
            with trio.fail_after(self.config.swarm.store_timeout_seconds):
                return await self.store.members(self.cred.name, since=self._clock() - MEMBER_FORGET_SECONDS)
        except (StoreError, trio.TooSlowError):
            return {}

    def _peers(self) -> list[NodeRecord]:
        return [r for r in self.view.live() if r.node_id != self.ident.node_id]

    # --- assignments: the one way roles change ---

    def _want(self, roles: frozenset[str], an_id: str | None) -> None:
        if (roles, an_id) != (self.roles, self.an_id) or self._wanted is not None:
            self._wanted = (roles, an_id)
            self._apply.set()

    async def _apply_loop(self) -> None:
        while True:
            await self._apply.wait()
            self._apply = trio.Event()
            wanted, self._wanted = self._wanted, None
            if wanted is None or wanted == (self.roles, self.an_id):
                continue
            roles, an_id = wanted
            await self._on_assignment(roles, an_id)
            self.roles, self.an_id = roles, an_id
            log.info("swarm.assigned", roles=",".join(sorted(roles)) or "-", an=(an_id or "-")[:12], term=self.election.term)
            self.view.publish_soon()

    def _follow(self, body: dict[str, Any]) -> None:
        raw = body.get("roles")
        if not isinstance(raw, dict):
            return
        role_map = {}
        for node_id, value in raw.items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], list):
                role_map[str(node_id)] = Assignment(tuple(str(r) for r in value[0]), value[1] if isinstance(value[1], str) else None)
        self.role_map = role_map
        self.view.learn(role_map)
        # A node the principal does not count among the live (it was cut off, or has just come back)
        # holds no role until the principal gives it one: its An or Ki work would run outside the membership.
        mine = role_map.get(self.ident.node_id)
        if mine is None:
            self._want(frozenset(), None)
        else:
            self._want(frozenset(mine.roles), mine.an_id)

    async def _orphan_watch(self) -> None:
        """A node that hears no principal for longer than a failover takes drops its roles: whatever An or Ki
        work it did would run outside the membership of the principal it can no longer hear (a partition)."""
        while True:
            await trio.sleep(self.config.swarm.heartbeat_seconds)
            if self.roles and self.election.orphaned() and self._wanted != (frozenset(), None):
                log.warning("swarm.orphaned", detail="no principal heard: roles dropped until one assigns them again")
                self._want(frozenset(), None)

    def _stepped_down(self) -> None:
        self._want(self.roles - {"principal"}, self.an_id)

    async def _lead(self, fence: Fence) -> dict[str, Any] | None:
        """One principal beat: the role map for the members alive now, written fenced when it changed."""
        links = self.links
        alive = [
            r for r in self._peers() if links.last_failed.get(r.node_id, 0.0) <= links.last_ok.get(r.node_id, 0.0)
        ]
        me = self.view.record(self.ident.node_id)
        candidates = [Candidate(r.node_id, r.prefers, r.has_gpu) for r in alive]
        candidates.append(Candidate(self.ident.node_id, self.prefers, bool(me and me.has_gpu)))
        role_map = assign_roles(self.ident.node_id, candidates, ki_per_an=self.config.swarm.ki_per_an, previous=self.role_map)
        now = self._clock()
        if role_map != self.role_map or now - self._written_at > ROLE_MAP_REWRITE_SECONDS:
            try:
                written = await self.store.record_roles(fence, role_map, now=now)
            except StoreError as exc:  # a store blip costs this beat's write, not the node: the next beat tries again
                log.warning("principal.roles_unwritten", term=fence.term, error=str(exc))
                role_map = self.role_map
            else:
                if not written:
                    return None
                if role_map != self.role_map:
                    log.info("principal.assigned", term=fence.term, roles=_summary(role_map))
                self.role_map, self._written_at = role_map, now
        mine = role_map.get(self.ident.node_id)
        if mine is None:  # the store failed before any role map was written
            return {"roles": {}, "lease_expires": self.election.lease_expires}
        self._want(frozenset(mine.roles), mine.an_id)
        return {
            "roles": {node: [list(a.roles), a.an_id] for node, a in role_map.items()},
            "lease_expires": self.election.lease_expires,
        }

    async def _on_message(self, body: dict[str, Any]) -> dict[str, Any] | None:
        sender = self.view.record(body["id"])
        assert sender is not None  # PeerLinks accepts members only
        return await self.election.on_message(body, sender)

    # --- what the API shows ---

    def cluster(self) -> dict[str, Any]:
        e = self.election
        return {
            "swarm": self.cred.name, "node_id": self.ident.node_id, "principal": e.principal, "term": e.term,
            "lease_expires_at": e.lease_expires if e.fence is not None else None, "leading": e.leading,
            "roles": {node: {"roles": list(a.roles), "an": a.an_id} for node, a in self.role_map.items()},
        }

    def nodes(self) -> list[dict[str, Any]]:
        now = self._clock()
        out = []
        for rec in sorted(self.view.live(), key=lambda r: r.node_id):
            assigned = self.role_map.get(rec.node_id)
            mine = rec.node_id == self.ident.node_id
            failed = self.links.last_failed.get(rec.node_id, 0.0)
            last_seen = now if mine else max(rec.timestamp, self.links.last_ok.get(rec.node_id, 0.0))
            out.append({
                "id": rec.node_id,
                "addresses": {"dht": f"{rec.dht[0]}:{rec.dht[1]}", "peer": rec.peer, "api": rec.api},
                "roles": sorted(self.roles) if mine else list(assigned.roles if assigned else rec.roles),
                "an": self.an_id if mine else (assigned.an_id if assigned else rec.an_id),
                "prefers": rec.prefers, "priority": rec.priority, "capabilities": rec.capabilities, "load": rec.load,
                # Healthy: the principal counts it among the live (its role map), and our last request reached it.
                "term": rec.term, "last_seen": last_seen,
                "healthy": mine or (failed <= last_seen and (assigned is not None or not self.role_map)),
            })
        return out


def _summary(role_map: dict[str, Assignment]) -> str:
    return " ".join(f"{node[:8]}={'+'.join(a.roles)}" + (f"@{a.an_id[:8]}" if a.an_id else "") for node, a in sorted(role_map.items()))
