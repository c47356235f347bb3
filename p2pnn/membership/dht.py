"""DhtNode: a standard Kademlia node (the ``kademlia`` library, UDP) inside the trio program.

kademlia is asyncio code; this module is the one edge where it meets trio,
through trio-asyncio: ``run`` opens an asyncio loop on top of trio and every
call goes through ``aio_as_trio`` on that loop, so trio cancellation reaches
into kademlia and no thread is involved. Nothing outside this file knows
that asyncio exists.

Two changes to the stock library, both by subclassing:
- the RPC timeout (rpcudp's ``wait_timeout``, 5 s hard-coded) comes from
  configuration, through ``Server.protocol_class``;
- the storage runs a validator on every value stored here, from this node or
  over the wire, and keeps a value only when it is valid and not older than
  the one it would replace: a forged record cannot even displace a real one.
"""

from __future__ import annotations

import logging
import socket
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


class TimedProtocol(KademliaProtocol):
    """KademliaProtocol whose RPCs give up after ``rpc_timeout`` seconds instead of rpcudp's fixed 5."""

    rpc_timeout = 5.0

    def __init__(self, source_node: Node, storage: Any, ksize: int) -> None:
        super().__init__(source_node, storage, ksize)
        self._wait_timeout = self.rpc_timeout


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

    def __init__(self, *, node_id: str, validator: Validator, rpc_timeout: float, ttl: float) -> None:
        self.node_id = node_id
        self.server = _Server(
            node_id=bytes.fromhex(node_id), storage=ValidatingStorage(validator, ttl), rpc_timeout=rpc_timeout
        )
        self._loop: Any = None

    async def run(self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio_asyncio.open_loop() as loop:
            self._loop = loop
            try:
                await self._aio(self.server.listen, port, host)
                bound = self.server.transport.get_extra_info("sockname")[1]
                task_status.started(bound)
                await trio.sleep_forever()
            finally:
                self.server.stop()
                self._loop = None

    async def _aio(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._loop is None:
            raise RuntimeError("the DHT node is not running")
        return await trio_asyncio.aio_as_trio(fn, loop=self._loop)(*args)

    async def bootstrap(self, peers: list[tuple[str, int]]) -> int:
        """Join through ``peers``; returns how many nodes the join crawl found."""
        if not peers:
            return 0
        return len(await self._aio(self.server.bootstrap, peers))

    async def crawl(self) -> int:
        """Look up our own id (finds nodes near us, and tells them about us); returns the contacts known after."""
        nearest = self.server.protocol.router.find_neighbors(self.server.node)
        if nearest:
            spider = NodeSpiderCrawl(self.server.protocol, self.server.node, nearest, self.server.ksize, self.server.alpha)
            await self._aio(spider.find)
        return len(self.contact_ids())

    async def put(self, key: str, value: str) -> bool:
        """Store ``value`` on the nodes closest to ``key`` (and here); False when no node took it."""
        stored = await self._aio(self.server.set, key, value)
        # set() keeps a copy here only when this node is among the closest; a node always serves its own record.
        self.server.storage[self.digest(key)] = value
        return bool(stored)

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

    def contact_ids(self) -> list[str]:
        """Ids (hex) of every node in the routing table."""
        return [n.id.hex() for bucket in self.server.protocol.router.buckets for n in bucket.get_nodes()]

    @staticmethod
    def digest(key: str) -> bytes:
        from kademlia.utils import digest

        return digest(key)
