"""A broker a test may break: a private RabbitMQ node.

The machine's RabbitMQ is shared by everyone's tests, so a test that needs a
broker to restart or die runs its own. (A test that needs the database to
vanish puts tests/tcpproxy.py in between and stops it.)
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import trio

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # the script itself: /usr/sbin's wrapper switches user
START_SECONDS = 120.0  # an Erlang VM booting on two loaded cores takes 20 s or more
STOP_SECONDS = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRabbitMQ:
    """A RabbitMQ node of the test's own, on free loopback ports, with no plugins.

    Resource handling: ``start`` launches it in a process group of its own
    and waits until it accepts AMQP; ``kill`` SIGKILLs that group (a crash);
    ``restart`` is kill then start on the same data directory, so durable
    queues and persistent messages survive as they would a real restart;
    ``stop`` kills it and removes its files.
    """

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="p2pnn-rabbit-"))
        self.port = free_port()
        self.dist_port = free_port()
        self.nodename = f"p2pnn-test-{os.getpid()}-{secrets.token_hex(3)}@localhost"
        self._proc: subprocess.Popen | None = None
        (self.root / "enabled_plugins").write_text("[].\n")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def start(self) -> None:
        env = {
            **os.environ, "HOME": str(self.root), "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port), "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"), "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.root / "none"), "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.root / "none.config"),
        }
        log = open(self.root / "server.out", "ab")
        self._proc = subprocess.Popen(
            [RABBITMQ_SERVER], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + START_SECONDS
        while not self._accepts_amqp():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.root / "server.out").read_text(errors="replace")[-2000:]
                self.kill()
                raise RuntimeError(f"private RabbitMQ did not start: {tail}")
            time.sleep(0.5)

    def _accepts_amqp(self) -> bool:
        import logging

        import pika

        logging.getLogger("pika").setLevel(logging.CRITICAL)  # refused connections while it boots are expected

        try:
            pika.BlockingConnection(pika.URLParameters(self.url + "?connection_attempts=1&socket_timeout=2")).close()
            return True
        except Exception:
            return False

    def kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(STOP_SECONDS)
        # The port is free again once the VM is gone; wait for it so start() cannot race it.
        deadline = time.monotonic() + STOP_SECONDS
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    break
            time.sleep(0.2)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)


class StallingProxy:
    """A TCP proxy on a free loopback port in front of ``target``, run in the test's trio loop.

    ``stall()`` stops moving bytes (both ways, on every link) and leaves new
    connections waiting: to the client the server went silent, as behind a
    dead switch. ``resume()`` moves them again. ``drop()`` closes every link
    (the client sees a reset). Resource handling: ``run`` (nursery.start)
    serves until cancelled and closes every link then.
    """

    def __init__(self, target_host: str, target_port: int, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = port  # 0: a free one; another: that one (a proxy back on the address of one stopped)
        self._flowing = trio.Event()
        self._flowing.set()
        self._links: set[trio.SocketStream] = set()

    def stall(self) -> None:
        self._flowing = trio.Event()

    def resume(self) -> None:
        self._flowing.set()

    async def drop(self) -> None:
        for stream in list(self._links):
            await stream.aclose()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._serve, listeners, handler_nursery=nursery)

    async def _serve(self, client: trio.SocketStream) -> None:
        await self._flowing.wait()
        try:
            server = await trio.open_tcp_stream(*self.target)
        except OSError:
            await client.aclose()
            return
        self._links |= {client, server}
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                nursery.start_soon(self._pump, server, client, nursery.cancel_scope)
        finally:
            self._links -= {client, server}
            for stream in (client, server):
                with trio.CancelScope(shield=True):
                    await stream.aclose()

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope) -> None:
        try:
            while True:
                await self._flowing.wait()
                data = await source.receive_some(65536)
                if not data:
                    break
                await self._flowing.wait()  # bytes read just before a stall are held, not delivered
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        scope.cancel()
