"""PeerLinks: signed control messages between members over WebSocket.

Every message, request and reply, is a signed envelope (:mod:`p2pnn.credential`)
whose body carries ``type``, the sender's ``term``, a timestamp ``ts`` and a
random ``nonce``. A message is refused when the envelope does not verify
(forged, unsigned, no swarm credential), when the sender is not a member
whose record carries the same public key, when ``ts`` is outside the replay
window, or when its nonce was seen within the window (a replay).

Links are request/reply: a request gets the handler's reply, or a plain
refusal. Outgoing connections are kept open per peer and re-opened on error.
"""

from __future__ import annotations

import json
import secrets
import time
from functools import partial
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    WebSocketRequest,
    connect_websocket_url,
    serve_websocket,
)

from p2pnn import logs
from p2pnn.credential import EnvelopeError, SwarmCredential, open_envelope, seal
from p2pnn.identity import Identity
from p2pnn.membership.records import NodeRecord

log = logs.get(__name__)

MAX_MESSAGE_BYTES = 64 * 1024  # a role map for a few hundred nodes; anything larger is not ours
CONNECT_TIMEOUT = 5.0  # seconds an incoming WebSocket handshake may take
DISCONNECT_TIMEOUT = 1.0  # seconds a closing handshake may take; a dead peer must not hold up shutdown
MAX_LINKS = 256  # open outgoing connections kept; beyond that the oldest is closed

Handler = Callable[[dict[str, Any]], Awaitable["dict[str, Any] | None"]]


class Refused(Exception):
    """A message that is not accepted; the message says why."""


class PeerLinks:
    """Resource handling: ``run`` (nursery.start) serves until cancelled and hands back the bound port;
    outgoing connections live in its nursery and close with it.

    Error handling: ``request`` returns None when the peer cannot be reached, does not answer in time,
    or answers with something that does not verify; it never raises for the peer's sake.
    """

    def __init__(
        self,
        *,
        ident: Identity,
        cred: SwarmCredential,
        member: Callable[[str], NodeRecord | None],
        handler: Handler,
        term: Callable[[], int],
        replay_window: float,
        connect_timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ident = ident
        self.cred = cred
        self._member = member
        self._handler = handler
        self._term = term
        self.replay_window = replay_window
        self.connect_timeout = connect_timeout
        self._clock = clock
        self._seen: dict[str, float] = {}  # nonce -> when it may be forgotten
        self._links: dict[str, tuple[WebSocketConnection, trio.Lock]] = {}
        self._nursery: trio.Nursery | None = None
        self.refused: dict[str, int] = {}  # reason -> count
        self.last_ok: dict[str, float] = {}  # node id -> when a request to it last got a reply
        self.last_failed: dict[str, float] = {}

    # --- envelopes ---

    def seal(self, msg_type: str, **fields: Any) -> str:
        body = {"type": msg_type, "term": self._term(), "ts": self._clock(), "nonce": secrets.token_hex(12), **fields}
        return seal(body, self.ident, self.cred)

    def verify(self, text: str | bytes) -> dict[str, Any]:
        """The body of an acceptable message. Error handling: raises Refused with the reason."""
        if len(text) > MAX_MESSAGE_BYTES:
            raise Refused("message too large")
        try:
            body = open_envelope(text, self.cred)
        except EnvelopeError as exc:
            raise Refused(str(exc)) from None
        sender = self._member(body["id"])
        if sender is None or sender.public_key != body["pub"]:
            raise Refused("sender is not a member")
        now = self._clock()
        ts, nonce = body.get("ts"), body.get("nonce")
        if not isinstance(ts, (int, float)) or not isinstance(nonce, str) or not isinstance(body.get("term"), int):
            raise Refused("message lacks ts, nonce or term")
        if abs(now - ts) > self.replay_window:
            raise Refused("stale message (outside the replay window)")
        self._forget_old_nonces(now)
        if nonce in self._seen:
            raise Refused("replayed message (nonce seen)")
        self._seen[nonce] = ts + self.replay_window
        return body

    def _forget_old_nonces(self, now: float) -> None:
        if len(self._seen) > 1024:
            self._seen = {n: until for n, until in self._seen.items() if until > now - self.replay_window}

    def _refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        log.info("peer.refused", reason=reason)

    # --- serving ---

    async def run(self, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            server = await nursery.start(
                partial(serve_websocket, self._serve, host, port, None, connect_timeout=CONNECT_TIMEOUT,
                        disconnect_timeout=DISCONNECT_TIMEOUT)
            )
            task_status.started(server.port)

    async def _serve(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                text = await ws.get_message()
                try:
                    body = self.verify(text)
                except Refused as exc:
                    self._refuse(str(exc))
                    await ws.send_message(json.dumps({"refused": str(exc)}))
                    continue
                reply = await self._handler(body)
                if reply:
                    await ws.send_message(self.seal(reply["type"], **{k: v for k, v in reply.items() if k != "type"}))
                else:
                    await ws.send_message(json.dumps({"ok": True}))
        except ConnectionClosed:
            pass

    # --- requests ---

    async def request(self, peer: NodeRecord, msg_type: str, *, timeout: float, **fields: Any) -> dict[str, Any] | None:
        """Send a signed request to ``peer``; its signed reply body, ``{}`` for a bare acknowledgement, or None."""
        try:
            with trio.fail_after(timeout):
                answer = await self._exchange(peer.peer, self.seal(msg_type, **fields))
        except (OSError, HandshakeError, ConnectionClosed, trio.TooSlowError, trio.BrokenResourceError) as exc:
            self._drop(peer.peer)
            self.last_failed[peer.node_id] = self._clock()
            log.debug("peer.unreachable", peer=peer.node_id[:12], error=repr(exc))
            return None
        self.last_ok[peer.node_id] = self._clock()
        try:
            plain = json.loads(answer)
        except ValueError:
            return None
        if "body" not in plain:
            return {} if plain.get("ok") else None  # acknowledged, or refused
        try:
            body = self.verify(answer)
        except Refused as exc:
            self._refuse(f"reply: {exc}")
            return None
        return body if body["id"] == peer.node_id else None

    async def _exchange(self, url: str, text: str) -> str:
        assert self._nursery is not None, "PeerLinks.run must be started first"
        link = self._links.get(url)
        if link is None:
            with trio.fail_after(self.connect_timeout):
                conn = await connect_websocket_url(self._nursery, url, ssl_context=None, message_queue_size=4)
            if len(self._links) >= MAX_LINKS:
                self._drop(next(iter(self._links)))
            link = self._links[url] = (conn, trio.Lock())
        conn, lock = link
        async with lock:
            await conn.send_message(text)
            return await conn.get_message()

    def _drop(self, url: str) -> None:
        link = self._links.pop(url, None)
        if link is not None and self._nursery is not None:
            self._nursery.start_soon(_close_quietly, link[0])


async def _close_quietly(conn: WebSocketConnection) -> None:
    with trio.move_on_after(1):
        await conn.aclose()
