"""DhtNode: a standard Kademlia node (the ``kademlia`` library, UDP) inside the trio program.

kademlia is asyncio code; this module is the one edge where it meets trio,
through trio-asyncio: ``run`` opens an asyncio loop on top of trio and every
call goes through ``aio_as_trio`` on that loop, so trio cancellation reaches
into kademlia and no thread is involved. Nothing outside this file knows
that asyncio exists.

trio-asyncio turns any exception the asyncio loop reports (an unretrieved
task error) into an exception in the trio program; a garbage datagram from
anyone would then stop the node. So the loop gets an exception handler that
logs instead, and the protocol below guards its datagram handling.

Changes to the stock library, all by subclassing:
- the RPC timeout (rpcudp's ``wait_timeout``, 5 s hard-coded) comes from
  configuration, through ``Server.protocol_class``;
- the protocol drops malformed datagrams, and late replies to requests that
  were cancelled or timed out (rpcudp would raise InvalidStateError);
- the storage runs a validator on every value stored here, from this node or
  over the wire, and keeps a value only when it is valid and not older than
  the one it would replace: a forged record cannot even displace a real one.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import trio
import trio_asyncio
from kademlia.crawling import NodeSpiderCrawl, ValueSpiderCrawl
from kademlia.network import Server
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.storage import ForgetfulStorage

from p2pnn import logs

log = logs.get(__name__)

# The library logs every unanswered RPC at ERROR; a dead peer is routine in a swarm.
for _noisy in ("kademlia", "rpcudp"):
    logging.getLogger(_noisy).setLevel(logging.CRITICAL)

# Validator: (key digest, value, value stored now or None) -> the value's timestamp when it may be
# stored, None when it is to be dropped.
Validator = Callable[[bytes, Any, Any], "float | None"]

# RPCs sent ("sent", "timeout") and served ("served") by every DHT node of this process, for benchmarks.
RPC_STATS: Counter[str] = Counter()


MISSES_TO_EVICT = 2  # unanswered RPCs in a row before a contact leaves the routing table
WELCOME_AGAIN_SECONDS = 30.0  # a contact that did not fit its full k-bucket is not welcomed again sooner


class TimedProtocol(KademliaProtocol):
    """KademliaProtocol whose RPCs give up after ``rpc_timeout`` seconds instead of rpcudp's fixed 5."""

    rpc_timeout = 5.0
    # Serves the ``members`` RPC (membership gossip): (sender id, sender address, its record, its
    # summary, beats it passes on) -> the reply. Set by the DhtNode; None: the RPC is not answered.
    gossip: Callable[[bytes, tuple[str, int], Any, Any, Any], Any] | None = None

    def __init__(self, source_node: Node, storage: Any, ksize: int) -> None:
        super().__init__(source_node, storage, ksize)
        self._wait_timeout = self.rpc_timeout
        self._misses: dict[bytes, int] = {}
        self._welcomed: dict[bytes, float] = {}

    def welcome_if_new(self, node: Node) -> None:
        """Add a node we hear from to the routing table, at most once a while per node, and send it nothing.

        The library also stores on every new node each value it is closer to; here the owners
        re-publish every record to the k closest nodes often enough, so that traffic is left out. And
        a node that does not fit its full k-bucket stays "new" to the library: every message from it
        would ping the bucket's oldest contact again; on a busy swarm that is what times RPCs out.
        """
        if not self.router.is_new_node(node):
            return
        now = time.monotonic()
        if now - self._welcomed.get(node.id, -WELCOME_AGAIN_SECONDS) < WELCOME_AGAIN_SECONDS:
            return
        if len(self._welcomed) > 4096:
            self._welcomed = {i: t for i, t in self._welcomed.items() if now - t < WELCOME_AGAIN_SECONDS}
        self.router.add_contact(node)
        if self.router.is_new_node(node):  # its k-bucket is full: it waits in the replacement list
            self._welcomed[node.id] = now
        else:
            self._welcomed.pop(node.id, None)

    def handle_call_response(self, result: Any, node: Node) -> Any:
        """The library drops a contact at its first unanswered RPC; here at the MISSES_TO_EVICT-th in a row.

        On a loaded host one reply is sometimes late; evicting at once empties routing tables in a cascade.
        """
        RPC_STATS["sent"] += 1
        if result[0]:
            self._misses.pop(node.id, None)
            return super().handle_call_response(result, node)
        RPC_STATS["timeout"] += 1
        misses = self._misses.get(node.id, 0) + 1
        if misses >= MISSES_TO_EVICT:
            self._misses.pop(node.id, None)
            self.router.remove_contact(node)
            self._welcomed.pop(node.id, None)  # welcome it back as soon as it answers (a healed partition)
        else:
            self._misses[node.id] = misses
        return result

    def rpc_members(self, sender: tuple[str, int], nodeid: bytes, text: Any, summary: Any, beats: Any) -> Any:
        """Membership gossip: the sender's record and beats in, what it lacks (by its summary) out."""
        self.welcome_if_new(Node(nodeid, sender[0], sender[1]))
        return None if self.gossip is None else self.gossip(nodeid, sender, text, summary, beats)

    async def _solve_datagram(self, datagram: bytes, address: tuple[str, int]) -> None:
        try:
            await super()._solve_datagram(datagram, address)
        except Exception as exc:  # noqa: BLE001 - anyone can send anything to a UDP port
            log.debug("dht.bad_datagram", sender=f"{address[0]}:{address[1]}", error=repr(exc))

    async def _accept_request(self, msg_id: bytes, data: Any, address: tuple[str, int]) -> None:
        RPC_STATS["served"] += 1
        if isinstance(data, list) and data and isinstance(data[0], str):
            RPC_STATS["served:" + data[0][:16]] += 1
        try:
            await super()._accept_request(msg_id, data, address)
        except Exception as exc:  # noqa: BLE001 - a malformed request, or the socket closed under it
            log.debug("dht.bad_request", sender=f"{address[0]}:{address[1]}", error=repr(exc))

    def _accept_response(self, msg_id: bytes, data: Any, address: tuple[str, int]) -> None:
        entry = self._outstanding.get(msg_id)
        if entry is not None and entry[0].done():  # the caller gave up (cancelled) before the reply came
            entry[1].cancel()
            del self._outstanding[msg_id]
            return
        super()._accept_response(msg_id, data, address)

    def _timeout(self, msg_id: bytes) -> None:
        entry = self._outstanding.pop(msg_id, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result((False, None))


class ValidatingStorage(ForgetfulStorage):
    def __init__(self, validator: Validator, ttl: float) -> None:
        super().__init__(ttl=ttl)
        self._validator = validator

    def __setitem__(self, key: bytes, value: Any) -> None:
        current = self.data.get(key, (None, None))[1]
        if self._validator(key, value, current) is not None:
            super().__setitem__(key, value)


class _Server(Server):
    def __init__(self, *, node_id: bytes, storage: ValidatingStorage, rpc_timeout: float) -> None:
        super().__init__(node_id=node_id, storage=storage)
        self.protocol_class = type("P2pnnProtocol", (TimedProtocol,), {"rpc_timeout": rpc_timeout})


def _log_asyncio_error(loop: Any, context: dict[str, Any]) -> None:
    log.debug("dht.asyncio_error", message=str(context.get("message")), error=repr(context.get("exception")))


def resolve(peers: tuple[str, ...] | list[str]) -> list[tuple[str, int]]:
    """``HOST:PORT`` strings as (IP, port): kademlia keeps host names as literal strings, so resolve them first.

    Error handling: a name that does not resolve is logged and skipped.
    """
    out = []
    for peer in peers:
        host, _, port = peer.rpartition(":")
        host = host.strip("[]")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)
        except (socket.gaierror, ValueError) as exc:
            log.warning("dht.bootstrap_unresolved", peer=peer, error=str(exc))
            continue
        ip = next((i[4][0] for i in infos if i[0] == socket.AF_INET), infos[0][4][0])
        out.append((ip, int(port)))
    return out


class DhtNode:
    """One Kademlia node whose id is the p2pnn node id.

    Resource handling: ``run`` (started with ``nursery.start``) binds the UDP
    port, hands back the bound port, serves until cancelled and then closes
    the socket. The other methods may be called only while ``run`` runs.

    Error handling: unreachable peers are not errors (Kademlia routes around
    them); each call returns what it could find.
    """

    def __init__(
        self, *, node_id: str, validator: Validator, rpc_timeout: float, ttl: float,
        gossip: Callable[[bytes, tuple[str, int], Any, Any, Any], Any] | None = None,
    ) -> None:
        """``ttl``: how long a stored value is kept after it was last stored; ``gossip``: serves ``members``."""
        self.node_id = node_id
        self.server = _Server(
            node_id=bytes.fromhex(node_id), storage=ValidatingStorage(validator, ttl), rpc_timeout=rpc_timeout
        )
        self._gossip = gossip
        self._loop: Any = None

    async def run(self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        shared = trio_asyncio.current_loop.get()
        if shared is not None:  # several DHT nodes in one program (a benchmark) share one asyncio loop
            await self._serve(shared, host, port, task_status)
            return
        async with trio_asyncio.open_loop() as loop:
            await self._serve(loop, host, port, task_status)

    async def _serve(self, loop: Any, host: str, port: int, task_status: Any) -> None:
        loop.set_exception_handler(_log_asyncio_error)
        self._loop = loop
        try:
            await self._aio(self.server.listen, port, host)
            if self.server.transport is None:
                raise OSError(f"cannot bind the DHT to {host}:{port} (UDP)")
            self.server.protocol.gossip = self._gossip
            bound = self.server.transport.get_extra_info("sockname")[1]
            task_status.started(bound)
            await trio.sleep_forever()
        finally:
            self.server.stop()
            self._loop = None

    async def _aio(self, fn: Callable[..., Any], *args: Any, failed: Any = None) -> Any:
        """``fn(*args)`` on the asyncio loop; ``failed`` when the library raises.

        kademlia 2.2.3 has edge cases that raise instead of returning "nothing
        found" (``set`` when a crawl finds no node: ValueError from max());
        the swarm treats them all as an unanswered round and tries again later.
        """
        if self._loop is None:  # shutting down: siblings are being cancelled too
            await trio.sleep_forever()
        try:
            return await trio_asyncio.aio_as_trio(fn, loop=self._loop)(*args)
        except Exception as exc:  # noqa: BLE001 - the library's failures are routine here; trio.Cancelled passes
            log.debug("dht.call_failed", call=getattr(fn, "__name__", repr(fn)), error=repr(exc))
            return failed

    async def greet(self, peers: list[tuple[str, int]]) -> int:
        """Ping ``peers`` and put those that answer in the routing table, without a crawl; returns how many answered."""
        if not peers:
            return 0
        found = await self._aio(lambda: asyncio.gather(*(self.server.bootstrap_node(p) for p in peers)), failed=[])
        for node in found:
            if node is not None:
                self.server.protocol.welcome_if_new(node)
        return sum(node is not None for node in found)

    async def crawl(self, target: bytes | None = None) -> dict[str, tuple[str, int]]:
        """Look up the nodes closest to ``target`` (default: our own id, which also tells them about us).

        Returns the nodes found, id (hex) -> (IP, port): a walk towards random
        targets reaches nodes a routing table of k-buckets cannot hold at once.
        """
        node = Node(target) if target is not None else self.server.node
        nearest = self.server.protocol.router.find_neighbors(node)
        if not nearest:
            return {}
        spider = NodeSpiderCrawl(self.server.protocol, node, nearest, self.server.ksize, self.server.alpha)
        found = await self._aio(spider.find, failed=[])
        return {n.id.hex(): (n.ip, n.port) for n in found}

    async def put(self, key: str, value: str, *, crawl: bool = True) -> bool:
        """Store ``value`` on the nodes closest to ``key`` (and here); False when no node took it.

        ``crawl``: look those nodes up over the network first (the library's ``set``); otherwise store
        on the k closest nodes of our own routing table, which saves the lookup's RPCs.
        """
        # set() keeps a copy here only when this node is among the closest; a node always serves its own record.
        dkey = self.digest(key)
        self.server.storage[dkey] = value
        if crawl:
            return bool(await self._aio(self.server.set, key, value))
        nearest = self.server.protocol.router.find_neighbors(Node(dkey))
        if not nearest:
            return False

        async def store_all() -> bool:
            RPC_STATS["store"] += len(nearest)
            return any(await asyncio.gather(*(self.server.protocol.call_store(n, dkey, value) for n in nearest)))

        return bool(await self._aio(store_all))

    def local(self, key: str) -> Any:
        """The copy of ``key`` held here, None when there is none: no network traffic."""
        return self.server.storage.get(self.digest(key))

    async def get(self, key: str, *, network: bool = False) -> Any:
        """The value under ``key``: the local copy, or (``network``, or none here) a network lookup."""
        dkey = self.digest(key)
        if not network:
            local = self.server.storage.get(dkey)
            if local is not None:
                return local
        target = Node(dkey)
        nearest = self.server.protocol.router.find_neighbors(target)
        if not nearest:
            return None
        spider = ValueSpiderCrawl(self.server.protocol, target, nearest, self.server.ksize, self.server.alpha)
        return await self._aio(spider.find)

    async def ask(self, node_id: str, address: tuple[str, int], key: str) -> Any:
        """The value under ``key`` as the node at ``address`` holds it: one find_value RPC, no crawl.

        A node always keeps its own record, so this is how a member's record is
        read from the member itself. None when it does not answer or has no value.
        """
        peer = Node(bytes.fromhex(node_id), address[0], address[1])
        answer = await self._aio(self.server.protocol.call_find_value, peer, Node(self.digest(key)), failed=(False, None))
        ok, data = answer
        return data.get("value") if ok and isinstance(data, dict) else None

    async def exchange(self, node_id: str, address: tuple[str, int], text: str, summary: bytes, beats: bytes) -> Any:
        """One ``members`` RPC to the node at ``address``: its reply, None when it does not answer."""
        peer = Node(bytes.fromhex(node_id), address[0], address[1])
        protocol = self.server.protocol

        async def call() -> Any:
            RPC_STATS["members"] += 1
            result = await protocol.members(tuple(address), self.server.node.id, text, summary, beats)
            return protocol.handle_call_response(result, peer)

        ok, data = await self._aio(call, failed=(False, None))
        return data if ok else None

    def contacts(self) -> dict[str, tuple[str, int]]:
        """Every node in the routing table, and those heard from that did not fit it: id (hex) -> (IP, port).

        A full k-bucket keeps the nodes it has no room for in a replacement list; they are members too.
        """
        buckets = self.server.protocol.router.buckets
        spare = {n.id.hex(): (n.ip, n.port) for b in buckets for n in b.replacement_nodes.values()}
        return {**spare, **{n.id.hex(): (n.ip, n.port) for b in buckets for n in b.get_nodes()}}

    def stored(self) -> list[tuple[bytes, Any]]:
        """Every (key digest, value) held here (other nodes' records among them)."""
        return [(k, v) for k, (_, v) in list(self.server.storage.data.items())]

    def contact_ids(self) -> list[str]:
        """Ids (hex) of every node in the routing table."""
        return [n.id.hex() for bucket in self.server.protocol.router.buckets for n in bucket.get_nodes()]

    @staticmethod
    def digest(key: str) -> bytes:
        from kademlia.utils import digest

        return digest(key)
