"""A TCP forwarder for tests: ``python tests/tcpproxy.py LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT``.

Prints ``ready PORT`` once it listens (port 0 picks one). Tests put it between
nodes in network namespaces and the host's PostgreSQL (which listens on
loopback only); SIGSTOP makes it a silent drop (connections accepted by the
kernel, nothing answered), SIGCONT heals it, SIGKILL refuses connections.
"""

from __future__ import annotations

import socket
import sys
import threading

BUFFER = 65536


def pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(BUFFER):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(listen: tuple[str, int], target: tuple[str, int]) -> None:
    server = socket.create_server(listen, reuse_port=False)
    print(f"ready {server.getsockname()[1]}", flush=True)
    while True:
        client, _ = server.accept()
        try:
            upstream = socket.create_connection(target, timeout=5)
        except OSError:
            client.close()
            continue
        upstream.settimeout(None)
        threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()


if __name__ == "__main__":
    serve((sys.argv[1], int(sys.argv[2])), (sys.argv[3], int(sys.argv[4])))
