"""RabbitMQ transport: one pika connection in one thread of its own, seen from trio as a TaskBus.

Topology (every name starts with the configured prefix ``P``):

    P.tasks        durable queue (quorum where the server has them): the
                   swarm's task queue. Messages redelivered more than
                   ``delivery_limit`` times go to the dead-letter exchange.
    P.short        durable queue (classic unless ``short_queue_type`` says
                   otherwise: see _Link._connect) of tasks known to be short: every Ki with room consumes it, no An
                   in between. A message redelivered more than
                   ``delivery_limit`` times (given back by full Ki), or
                   that no Ki took within ``ki_message_ttl`` (every Ki
                   busy with long tasks, or none consuming it), is
                   dead-lettered to P.tasks, where an An places it.
    P.ki.<id>      durable queue of one Ki. A message nobody takes from it
                   within ``ki_message_ttl`` (its Ki died or is full) is
                   dead-lettered back to P.tasks, where an An forwards it
                   again: a dead Ki's queue loses nothing. The queue itself
                   goes away after ``ki_queue_expires`` without consumers.
    P.dead         fanout exchange and durable queue: poison messages, kept
                   for an operator; the task itself stays in the store.
    P.beats        fanout exchange: Ki capacity beats (transient).
    P.cancel       fanout exchange: cancellation requests (transient).

Threading: a ``BlockingConnection`` is not thread-safe, so the connection,
its channels and every pika call live in one thread (``_Link``). Trio hands
it work with ``add_callback_threadsafe`` (pika's one thread-safe call) and
gets results back through ``TrioToken.run_sync_soon``, which never blocks the
pika thread. The thread pumps ``process_data_events`` all the time, so
heartbeats flow whatever trio is doing.

Publisher confirms are asynchronous: messages go out on the underlying
channel (``BlockingChannel._impl``; the blocking wrapper would wait for each
confirm in turn, a few hundred messages a second at best) and a batch is
confirmed when the broker has acked every sequence number in it, usually
with one ``multiple`` ack. A returned (unroutable) or nacked message fails
its batch.

Reconnect: any connection or channel error closes the connection; the
thread reconnects with exponential back-off, declares the topology again and
re-opens every consumer. Publishes in flight fail (the caller leaves their
tasks ``pending`` for the sweeper); acks of deliveries from the lost
connection are dropped, since the broker delivers those messages again.
"""

from __future__ import annotations

import collections
import json
import math
import queue as queue_mod
import ssl
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Mapping

import pika
import pika.exceptions
import trio

from p2pnn import logs
from p2pnn.bus.base import SHORT, TASKS, BusError, Delivery, Inbox, Subscription, TaskBus

log = logs.get(__name__)

PUMP_SECONDS = 0.1  # process_data_events slice: bounds the latency of work handed over without a wake-up
BACKOFF_FIRST = 0.2  # first pause before reconnecting
BACKOFF_MAX = 5.0  # back-off doubles up to this
QUORUM_SINCE = (3, 10)  # quorum queues with message TTL and at-least-once dead-lettering
# A stopped Ki hands on what waits in its queue this long at most (what is left waits out its TTL).
DRAIN_SECONDS, DRAIN_MAX = 2.0, 10_000
BROADCAST_TTL_MS = 10_000  # a beat or cancel older than this is useless: do not let it pile up
JOIN_SECONDS = 5.0  # how long shutdown waits for the pika thread to close the connection
DEPTH_EVERY = 2.0  # how often queue depths are refreshed for metrics
# How long a publish waits for the broker's confirm. Past it the publish is an error (the
# caller's sweeper covers the task), so shutdown or a hand-back cannot hang on a dead link.
CONFIRM_SECONDS = 5.0


@dataclass(frozen=True)
class AmqpSettings:
    """Connection and topology settings, built from ``[bus]`` by ``from_config``."""

    url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    prefix: str = "p2pnn"
    heartbeat: int = 30
    blocked_timeout: float = 60.0
    tls_ca_file: str = ""
    queue_type: str = "auto"  # auto | quorum | classic
    short_queue_type: str = "classic"  # the short queue's: auto | quorum | classic (see _Link._connect)
    ki_message_ttl: float = 30.0
    ki_queue_expires: float = 3600.0
    delivery_limit: int = 20
    connect_name: str = "p2pnn"

    def parameters(self) -> pika.URLParameters:
        params = pika.URLParameters(self.url)
        params.heartbeat = self.heartbeat
        params.blocked_connection_timeout = self.blocked_timeout
        params.connection_attempts = 1
        params.socket_timeout = 5
        params.client_properties = {"connection_name": self.connect_name}
        if self.tls_ca_file:
            context = ssl.create_default_context(cafile=self.tls_ca_file)
            params.ssl_options = pika.SSLOptions(context, params.host)
        return params


_JSON = pika.BasicProperties(content_type="application/json")


class _Batch:
    """One confirmed publish, as trio waits for it."""

    def __init__(self, messages: list[tuple[str, str, bytes, dict[str, Any] | None]]) -> None:
        self.messages = messages  # (exchange, routing key, body, headers)
        self.remaining = 0
        self.error: str | None = None
        self.done = trio.Event()


class _Fanout:
    """Where a topic's messages go on this node: every subscriber's channel (a full one misses it)."""

    def __init__(self) -> None:
        self.sends: list[trio.MemorySendChannel] = []

    def send_nowait(self, message: dict[str, Any]) -> None:
        for send in list(self.sends):
            try:
                send.send_nowait(message)
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                pass


@dataclass(eq=False)
class _Consumer:
    queue: str  # full name, or "" for a topic's server-named queue
    prefetch: int
    send: Any  # a queue's trio.MemorySendChannel, or a topic's _Fanout
    topic: str = ""  # exchange name for subscriptions
    ki_queue: bool = False
    channel: Any = None
    tag: str = ""  # the broker's consumer tag on ``channel``
    generation: int = -1
    deliveries: int = 0
    unacked: set[int] = field(default_factory=set)  # delivery tags on this channel not yet settled


@dataclass(frozen=True)
class _Tag:
    generation: int
    consumer: _Consumer
    delivery_tag: int


class _Link:
    """The pika thread. Every method not marked otherwise runs in that thread."""

    def __init__(
        self,
        settings: AmqpSettings,
        token: trio.lowlevel.TrioToken,
        on_redelivery: Callable[[str], None],
        on_malformed: Callable[[str], None] = lambda source: None,
    ) -> None:
        self.s = settings
        self._token = token
        self._on_redelivery = on_redelivery
        self._on_malformed = on_malformed
        self._commands: queue_mod.SimpleQueue[Callable[[], None]] = queue_mod.SimpleQueue()
        # Hand-offs between the threads are coalesced: one wake-up carries every command (or
        # callback) queued before it is served, not one each (a pipe write and a loop turn apiece).
        self._wake_pending = False  # the pika thread has been woken and has not yet started to drain
        self._to_trio: collections.deque[Callable[[], None]] = collections.deque()
        self._trio_pending = False  # a flush of _to_trio is scheduled in trio and has not yet started
        self._stopping = threading.Event()
        self.connected = threading.Event()
        self.conn: pika.BlockingConnection | None = None
        self.generation = 0
        self._declared: set[str] = set()
        self._pub: Any = None  # confirm-mode impl channel
        self._bcast: Any = None  # broadcast channel, no confirms
        self._seq = 0
        self._pending: dict[int, _Batch] = {}
        self.consumers: set[_Consumer] = set()
        self.quorum = False
        self.short_quorum = False
        self.depths: dict[str, int] = {}
        self.depth_queues: set[str] = set()
        self._last_depth = 0.0

    # --- called from trio (thread-safe) ---

    def submit(self, fn: Callable[[], None]) -> None:
        self._commands.put(fn)
        if self._wake_pending:  # the drain that wake-up starts takes this command too
            return
        self._wake_pending = True
        conn = self.conn
        if conn is not None:
            try:
                conn.add_callback_threadsafe(self._drain)
            except Exception:  # closing or closed: the loop drains the queue itself
                pass

    def stop(self) -> None:
        self._stopping.set()
        self._wake_pending = False
        self.submit(lambda: None)

    # --- called from the pika thread ---

    def to_trio(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in trio, after every ``fn`` handed over before it."""
        self._to_trio.append(fn)
        if self._trio_pending:
            return
        self._trio_pending = True
        try:
            self._token.run_sync_soon(self._flush_to_trio)
        except trio.RunFinishedError:
            pass

    def _flush_to_trio(self) -> None:  # in trio
        self._trio_pending = False  # from here on a new hand-over schedules another flush
        while self._to_trio:
            self._to_trio.popleft()()

    # --- the thread ---

    def main(self) -> None:
        backoff = BACKOFF_FIRST
        while not self._stopping.is_set():
            try:
                self._connect()
                backoff = BACKOFF_FIRST
                log.info("bus.connected", generation=self.generation, quorum=self.quorum, short_quorum=self.short_quorum)
                while not self._stopping.is_set():
                    self.conn.process_data_events(time_limit=PUMP_SECONDS)
                    self._drain()
                    self._refresh_depths()
            except Exception as exc:  # every pika error means: this connection is done
                if not self._stopping.is_set():
                    log.warning("bus.disconnected", error=f"{type(exc).__name__}: {exc}", retry_in=backoff)
            finally:
                self._teardown()
            if self._stopping.is_set():
                break
            self._stopping.wait(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
            self._drain()  # commands queued meanwhile fail fast rather than wait
        self._drain()

    def _connect(self) -> None:
        self.conn = pika.BlockingConnection(self.s.parameters())
        self.generation += 1
        version = self.conn._impl.server_properties.get("version", b"0")
        version = version.decode() if isinstance(version, bytes) else str(version)
        parsed = tuple(int(x) for x in version.split(".")[:2] if x.isdigit())
        self.quorum = self.s.queue_type == "quorum" or (self.s.queue_type == "auto" and parsed >= QUORUM_SINCE)
        # A quorum queue hands a message to its consumer only once its log reached the disk; a classic
        # queue hands it on at once and confirms it once on disk. Publishers wait for the confirm
        # either way, so a message is as safe in both on one broker, and the short queue's tasks, which
        # someone may be waiting for, take the earlier hand-off: under disk load (another process's
        # fsyncs) a quorum queue's delivery waited 5-8 ms, a classic one's 1-1.5 ms. A quorum short
        # queue survives the loss of a node of a RabbitMQ cluster; a classic one's tasks then wait for
        # the sweeper (see bus.short_queue_type).
        self.short_quorum = self.s.short_queue_type == "quorum" or (
            self.s.short_queue_type == "auto" and parsed >= QUORUM_SINCE
        )
        ch = self.conn.channel()
        p = self.s.prefix
        ch.exchange_declare(f"{p}.dead", "fanout", durable=True)
        ch.queue_declare(f"{p}.dead", durable=True, arguments=self._queue_args())
        ch.queue_bind(f"{p}.dead", f"{p}.dead")
        self._declare_queue(self.name(TASKS), self._tasks_args())
        self._declare_queue(self.name(SHORT), self._short_args())
        for topic in ("beats", "cancel"):
            ch.exchange_declare(f"{p}.{topic}", "fanout", durable=True)
        ch.close()
        # Publishing: confirms handled asynchronously on the underlying channel.
        pub = self.conn.channel()
        impl = pub._impl
        selected = threading.Event()
        impl.confirm_delivery(ack_nack_callback=self._on_confirm, callback=lambda _frame: selected.set())
        impl.add_on_return_callback(self._on_return)
        while not selected.is_set():
            self.conn.process_data_events(time_limit=PUMP_SECONDS)
        self._pub, self._seq = impl, 0
        self._declared: set[str] = set()  # Ki queues declared on this connection
        self._bcast = self.conn.channel()
        self.connected.set()
        for consumer in list(self.consumers):
            self._open_consumer(consumer)

    def _teardown(self) -> None:
        self.connected.clear()
        for batch in self._pending.values():
            batch.error = batch.error or "connection lost before the broker confirmed"
            batch.remaining = 0
            self.to_trio(batch.done.set)
        self._pending.clear()
        self._pub = self._bcast = None
        for consumer in self.consumers:
            consumer.channel = None
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # already gone
                pass

    def _drain(self) -> None:
        self._wake_pending = False  # from here on a new command wakes the thread again
        while True:
            try:
                fn = self._commands.get_nowait()
            except queue_mod.Empty:
                return
            try:
                fn()
            except Exception:
                if self.connected.is_set():
                    raise  # the connection is broken: reconnect
                # Disconnected: what needed the connection (an ack) is moot, the broker redelivers.

    def name(self, logical: str) -> str:
        return f"{self.s.prefix}.{logical}"

    def _queue_args(self, quorum: bool | None = None) -> dict[str, Any]:
        return {"x-queue-type": "quorum"} if (self.quorum if quorum is None else quorum) else {}

    def _dead_letter_args(self, quorum: bool | None = None) -> dict[str, Any]:
        # Quorum queues dead-letter at most once unless told otherwise; at-least-once needs
        # reject-publish overflow (RabbitMQ 3.10+). A message moved to its dead-letter target is
        # then only dropped from its queue once the target confirmed it.
        if not (self.quorum if quorum is None else quorum):
            return {}
        return {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}

    def _tasks_args(self) -> dict[str, Any]:
        args = {**self._queue_args(), "x-dead-letter-exchange": f"{self.s.prefix}.dead", **self._dead_letter_args()}
        if self.quorum:
            args["x-delivery-limit"] = self.s.delivery_limit
        return args

    def _to_tasks_args(self, quorum: bool | None = None) -> dict[str, Any]:
        """A queue whose dead letters go to the shared queue, for an An to place."""
        return {
            **self._queue_args(quorum),
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.name(TASKS),
            **self._dead_letter_args(quorum),
        }

    def _short_args(self) -> dict[str, Any]:
        args = {**self._to_tasks_args(self.short_quorum), "x-message-ttl": int(self.s.ki_message_ttl * 1000)}
        if self.short_quorum:
            args["x-delivery-limit"] = self.s.delivery_limit
        return args

    def _ki_args(self) -> dict[str, Any]:
        return {
            **self._to_tasks_args(),
            "x-message-ttl": int(self.s.ki_message_ttl * 1000),
            "x-expires": int(self.s.ki_queue_expires * 1000),
        }

    def declare_ki_queue(self, full_name: str) -> None:
        self._declare_queue(full_name, self._ki_args())

    def _declare_queue(self, full_name: str, arguments: dict[str, Any]) -> None:
        """Declare a durable queue on a channel of its own.

        A queue declared earlier with other arguments (by an older p2pnn, before
        at-least-once dead-lettering) is used as it is, with a warning, rather than
        refused with 406 on every reconnect: an operator moves it over by deleting
        the queue or by a policy. Error handling: any other refusal raises."""
        ch = self.conn.channel()
        try:
            ch.queue_declare(full_name, durable=True, arguments=arguments)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 406:  # PRECONDITION_FAILED: the arguments differ
                raise
            log.warning("bus.queue_arguments_differ", queue=full_name, error=str(exc))
            ch = self.conn.channel()
            ch.queue_declare(full_name, passive=True)
        ch.close()

    # publishing

    def publish(self, batch: _Batch) -> None:
        if self._pub is None or self.conn is None:
            batch.error = "not connected to RabbitMQ"
            self.to_trio(batch.done.set)
            return
        for exchange, key, body, headers in batch.messages:
            self._seq += 1
            self._pending[self._seq] = batch
            batch.remaining += 1
            props = pika.BasicProperties(
                delivery_mode=pika.DeliveryMode.Persistent, content_type="application/json",
                headers=headers, message_id=f"{self.generation}:{self._seq}",
            )
            self._pub.basic_publish(exchange, key, body, properties=props, mandatory=True)

    def broadcast(self, exchange: str, body: bytes) -> None:
        if self._bcast is not None:
            # On the underlying channel, as acks below: the frames go out with the thread's next
            # poll, several to a write, instead of a blocking flush (a poll loop of its own) each.
            self._bcast._impl.basic_publish(exchange, "", body, properties=_JSON)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        ok = isinstance(method, pika.spec.Basic.Ack)
        tags = [t for t in self._pending if t <= method.delivery_tag] if method.multiple else [method.delivery_tag]
        for tag in tags:
            batch = self._pending.pop(tag, None)
            if batch is None:
                continue
            if not ok:
                batch.error = batch.error or "the broker refused the message (nack)"
            batch.remaining -= 1
            if batch.remaining == 0:
                self.to_trio(batch.done.set)

    def _on_return(self, _channel: Any, method: Any, props: Any, _body: bytes) -> None:
        gen, _, seq = (props.message_id or "").partition(":")
        batch = self._pending.get(int(seq)) if seq.isdigit() and gen == str(self.generation) else None
        if batch is not None:
            batch.error = batch.error or f"no queue named {method.routing_key} (message returned)"

    # consuming

    def add_consumer(self, consumer: _Consumer) -> None:
        self.consumers.add(consumer)
        if self.conn is not None and self.connected.is_set():
            self._open_consumer(consumer)

    def remove_consumer(self, consumer: _Consumer) -> None:
        self.consumers.discard(consumer)
        if consumer.channel is not None and consumer.generation == self.generation:
            try:
                if consumer.ki_queue:
                    # A Ki that stops (its role changed, or it shuts down) consumes its queue no more: what
                    # it holds unacked, and what still waits in its queue, is dead-lettered to the shared
                    # queue now, for an An to place, instead of waiting out the Ki message TTL.
                    consumer.channel.basic_cancel(consumer.tag)  # first, or the broker delivers the next
                    consumer.channel.basic_nack(0, multiple=True, requeue=False)
                    self._hand_on_waiting(consumer)
                consumer.channel.close()  # anything else unacked goes back to the queue
            except Exception:
                pass
        consumer.channel = None

    def _hand_on_waiting(self, consumer: _Consumer) -> None:
        """Dead-letter what waits in a stopped Ki's queue; at most DRAIN_MAX messages, for DRAIN_SECONDS."""
        ch, deadline = consumer.channel, time.monotonic() + DRAIN_SECONDS
        for _ in range(DRAIN_MAX):
            method, _props, _body = ch.basic_get(consumer.queue, auto_ack=False)
            if method is None:
                return
            ch.basic_nack(method.delivery_tag, requeue=False)
            if time.monotonic() > deadline:
                return

    def _open_consumer(self, consumer: _Consumer) -> None:
        if consumer.ki_queue:
            self.declare_ki_queue(consumer.queue)
        ch = self.conn.channel()
        consumer.channel, consumer.generation, consumer.unacked = ch, self.generation, set()
        if consumer.topic:
            queue = ch.queue_declare(
                "", exclusive=True, auto_delete=True, arguments={"x-message-ttl": BROADCAST_TTL_MS}
            ).method.queue
            ch.queue_bind(queue, consumer.topic)
            ch.basic_consume(queue, lambda c, m, p, b: self._on_broadcast(consumer, b), auto_ack=True)
            return
        ch.basic_qos(prefetch_count=consumer.prefetch)
        gen = self.generation
        consumer.tag = ch.basic_consume(consumer.queue, lambda c, m, p, b: self._on_message(consumer, gen, m, p, b))

    def _on_message(self, consumer: _Consumer, gen: int, method: Any, props: Any, body: bytes) -> None:
        # Anything may arrive on a queue: a body that is not {"id": str, "headers": {...}} is
        # dropped (acked), logged and counted, never raised into the connection's thread.
        try:
            message = json.loads(body)
            task_id = message["id"]
            headers = message.get("headers") or {}
            if not isinstance(task_id, str) or not isinstance(headers, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            log.warning("bus.malformed_message", queue=consumer.queue, body=body[:200].decode(errors="replace"))
            self._on_malformed("ki" if consumer.ki_queue else "tasks")
            # On the underlying channel, as every other ack: no blocking flush inside a delivery callback.
            consumer.channel._impl.basic_ack(method.delivery_tag)
            return
        if method.redelivered:
            self._on_redelivery(consumer.queue)
        delivery = Delivery(task_id, _Tag(gen, consumer, method.delivery_tag), method.redelivered, headers)
        consumer.unacked.add(method.delivery_tag)
        send = consumer.send

        def hand_over() -> None:
            try:
                send.send_nowait(delivery)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # consumer gone: its channel closes and the broker redelivers

        self.to_trio(hand_over)

    def _on_broadcast(self, consumer: _Consumer, body: bytes) -> None:
        try:
            message = json.loads(body)
        except (ValueError, RecursionError):
            message = None
        if not isinstance(message, dict):
            log.warning("bus.malformed_broadcast", topic=consumer.topic, body=body[:200].decode(errors="replace"))
            self._on_malformed(consumer.topic.rsplit(".", 1)[-1])
            return
        if isinstance(message, dict):
            send = consumer.send

            def hand_over() -> None:
                try:
                    send.send_nowait(message)
                except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                    pass

            self.to_trio(hand_over)

    def settle(self, tag: _Tag, ack: bool) -> None:
        c = tag.consumer
        if tag.generation != self.generation or c.generation != tag.generation or c.channel is None:
            return  # from a lost connection or a closed consumer: the broker delivers it again
        c.unacked.discard(tag.delivery_tag)
        if ack:
            c.channel._impl.basic_ack(tag.delivery_tag)
        else:
            c.channel._impl.basic_nack(tag.delivery_tag, requeue=True)

    def ack_many(self, tags: list[_Tag]) -> None:
        """Ack ``tags``: one ``multiple`` ack per channel when they are every unsettled delivery up to
        the highest of them (the usual case for an An acking a forwarded batch), else one ack each."""
        by_consumer: dict[int, tuple[_Consumer, set[int]]] = {}
        for tag in tags:
            c = tag.consumer
            if tag.generation != self.generation or c.generation != tag.generation or c.channel is None:
                continue  # from a lost connection or a closed consumer: the broker delivers it again
            by_consumer.setdefault(id(c), (c, set()))[1].add(tag.delivery_tag)
        for c, acked in by_consumer.values():
            top = max(acked)
            if all(t in acked for t in c.unacked if t <= top):
                c.channel._impl.basic_ack(top, multiple=True)
                c.unacked -= {t for t in c.unacked if t <= top}
            else:
                for t in sorted(acked):
                    c.channel._impl.basic_ack(t)
                c.unacked -= acked

    def ensure_ki_queue(self, full_name: str, done: Callable[[str | None], None]) -> None:
        if self.conn is None or not self.connected.is_set():
            done("not connected to RabbitMQ")
            return
        if full_name in self._declared:  # declared on this connection already
            done(None)
            return
        try:
            self.declare_ki_queue(full_name)
            self._declared.add(full_name)
            done(None)
        except pika.exceptions.ChannelClosedByBroker as exc:
            done(str(exc))

    def _refresh_depths(self) -> None:
        now = time.monotonic()
        if not self.depth_queues or now - self._last_depth < DEPTH_EVERY:
            return
        self._last_depth = now
        ch = self.conn.channel()
        try:
            for q in self.depth_queues:
                self.depths[q] = ch.queue_declare(q, passive=True).method.message_count
            ch.close()
        except pika.exceptions.ChannelClosedByBroker:
            pass


class _AmqpInbox(Inbox):
    """Acks are coalesced: every ack asked for before the pika thread next drains its commands goes
    in one ``ack_many`` (one ``multiple`` ack when they cover every unsettled delivery up to the
    highest, as the claims of one group commit do), not one command and one frame each."""

    def __init__(self, link: _Link, receive: trio.MemoryReceiveChannel) -> None:
        self._link = link
        self._receive = receive
        self._acks: list[_Tag] = []  # appended in trio, taken whole by the pika thread
        # Held for the append and for the swap: without it an ack appended to the list the pika
        # thread has just taken would be neither sent nor start a batch of its own.
        self._acks_lock = threading.Lock()

    async def receive(self) -> Delivery:
        return await self._receive.receive()

    def receive_nowait(self) -> Delivery | None:
        try:
            return self._receive.receive_nowait()
        except trio.WouldBlock:
            return None

    async def ack(self, delivery: Delivery) -> None:
        with self._acks_lock:
            self._acks.append(delivery.tag)
            first = len(self._acks) == 1
        if first:  # the first since the last flush: one flush takes it and all that follow
            self._link.submit(self._flush_acks)
        await trio.lowlevel.checkpoint()

    def _flush_acks(self) -> None:  # in the pika thread
        # A fresh list first: an ack appended from here on starts (and submits) the next batch.
        with self._acks_lock:
            tags, self._acks = self._acks, []
        self._link.ack_many(tags)

    async def nack(self, delivery: Delivery) -> None:
        self._link.submit(lambda: self._link.settle(delivery.tag, False))
        await trio.lowlevel.checkpoint()

    async def ack_many(self, deliveries: list[Delivery]) -> None:
        tags = [d.tag for d in deliveries]
        if tags:
            self._link.submit(lambda: self._link.ack_many(tags))
        await trio.lowlevel.checkpoint()


class _AmqpSubscription(Subscription):
    def __init__(self, receive: trio.MemoryReceiveChannel) -> None:
        self._receive = receive

    async def receive(self) -> dict[str, Any]:
        return await self._receive.receive()


class AmqpBus(TaskBus):
    """Resource handling: ``run`` owns the pika thread; cancelling it closes the
    connection and joins the thread (within JOIN_SECONDS).

    Error handling: RabbitMQ down or restarting never stops the node: the
    thread reconnects, ``publish`` raises BusError meanwhile and consumers
    resume when the connection is back.
    """

    def __init__(
        self,
        settings: AmqpSettings,
        *,
        on_redelivery: Callable[[str], None] = lambda queue: None,
        on_malformed: Callable[[str], None] = lambda source: None,
    ) -> None:
        self.settings = settings
        self._on_redelivery = on_redelivery
        self._on_malformed = on_malformed
        self._link: _Link | None = None
        self._topics: dict[str, _Consumer] = {}  # topic -> the one consumer its subscribers share

    @property
    def link(self) -> _Link:
        assert self._link is not None, "AmqpBus.run must be started first"
        return self._link

    def name(self, logical: str) -> str:
        return f"{self.settings.prefix}.{logical}"

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._link = _Link(self.settings, trio.lowlevel.current_trio_token(), self._on_redelivery, self._on_malformed)
        thread = threading.Thread(target=self._link.main, name="p2pnn-amqp", daemon=True)
        thread.start()
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._link.stop()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(thread.join, JOIN_SECONDS)

    async def wait_connected(self, timeout: float) -> bool:
        """True once connected (for start-up and tests); False after ``timeout``."""
        with trio.move_on_after(timeout):
            while not self.link.connected.is_set():
                await trio.sleep(0.05)
            return True
        return False

    async def publish(
        self, task_ids: list[str], *, queue: str = TASKS, headers: Mapping[str, Mapping[str, Any]] | None = None
    ) -> None:
        if not task_ids:
            return
        key = self.name(queue)
        batch = _Batch([
            ("", key, json.dumps({"id": t, "headers": dict((headers or {}).get(t, {}))}).encode(), None)
            for t in task_ids
        ])
        if queue not in (TASKS, SHORT):  # a Ki's queue: make sure it exists, or the message is returned
            await self._ensure_ki_queue(key)
        self.link.submit(lambda: self.link.publish(batch))
        # Shielded: the confirm settles the batch either way, and a caller cancelled meanwhile
        # should learn whether its messages went out. Bounded: a link that stopped answering.
        with trio.CancelScope(shield=True), trio.move_on_after(CONFIRM_SECONDS):
            await batch.done.wait()
        if not batch.done.is_set():
            raise BusError(f"no confirm from the broker within {CONFIRM_SECONDS:g} s")
        if batch.error:
            raise BusError(batch.error)

    async def _ensure_ki_queue(self, full_name: str) -> None:
        result: list[str | None] = []
        event = trio.Event()

        def done(error: str | None) -> None:
            result.append(error)
            self.link.to_trio(event.set)

        self.link.submit(lambda: self.link.ensure_ki_queue(full_name, done))
        with trio.move_on_after(CONFIRM_SECONDS):
            await event.wait()
        if not result:
            raise BusError(f"RabbitMQ did not declare {full_name} within {CONFIRM_SECONDS:g} s")
        if result[0]:
            raise BusError(result[0])

    @asynccontextmanager
    async def consume(self, queue: str, *, prefetch: int) -> AsyncIterator[Inbox]:
        send, receive = trio.open_memory_channel[Delivery](math.inf)  # bounded by prefetch
        consumer = _Consumer(self.name(queue), max(1, prefetch), send, ki_queue=queue not in (TASKS, SHORT))
        self.link.submit(lambda: self.link.add_consumer(consumer))
        try:
            yield _AmqpInbox(self.link, receive)
        finally:
            self.link.submit(lambda: self.link.remove_consumer(consumer))
            send.close()

    async def broadcast(self, topic: str, body: Mapping[str, Any]) -> None:
        data = json.dumps(dict(body)).encode()
        self.link.submit(lambda: self.link.broadcast(self.name(topic), data))
        await trio.lowlevel.checkpoint()

    @asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[Subscription]:
        # Subscribers of one topic on this node share one broker queue (a node's An and its long
        # polls both read beats): each message crosses the connection once, however many read it.
        send, receive = trio.open_memory_channel[dict[str, Any]](1000)
        consumer = self._topics.get(topic)
        if consumer is None:
            consumer = self._topics[topic] = _Consumer("", 0, _Fanout(), topic=self.name(topic))
            self.link.submit(lambda: self.link.add_consumer(consumer))
        consumer.send.sends.append(send)
        try:
            yield _AmqpSubscription(receive)
        finally:
            consumer.send.sends.remove(send)
            send.close()
            if not consumer.send.sends:
                del self._topics[topic]
                self.link.submit(lambda: self.link.remove_consumer(consumer))

    def watch_depth(self, queue: str = TASKS) -> None:
        name = self.name(queue)
        self.link.submit(lambda: self.link.depth_queues.add(name))

    def depth(self, queue: str = TASKS) -> int:
        return self.link.depths.get(self.name(queue), -1) if self._link else -1
