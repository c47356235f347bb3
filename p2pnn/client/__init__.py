"""The client side of p2pnn: a library for a node's REST API, and the ``p2pnn`` command.

- ``Client`` (``_sync.py``): blocking, for scripts and notebooks.
- ``AsyncClient`` (``_async.py``): the same methods under asyncio or trio (anyio).
- ``_calls.py``: what each call sends and how its answer reads, shared by both.
- ``_http.py``: what both send: the node's URL and token encoded once, each call's request parts, the proxy.
- ``_wire.py``: HTTP/1.1 under both: h11's framing over kept-alive sockets (sync) or anyio streams (async).
- ``_errors.py``: ``ClientError`` and its subclasses, one per answer a caller handles differently.
- ``_settings.py``: node URL and token from arguments, ``P2PNN_URL`` / ``P2PNN_TOKEN``, or a config file.
- ``_sse.py``: the Server-Sent Events parser ``wait`` follows a task with.
- ``cli.py``: the ``p2pnn`` command (submit, watch, ls, get, cancel, artifact, nodes).
"""

from p2pnn.client._async import AsyncClient
from p2pnn.client._errors import (
    ApiError,
    BadRequest,
    ClientError,
    Conflict,
    ConnectError,
    Forbidden,
    NotFound,
    TaskTimeout,
    Unauthorized,
)
from p2pnn.client._sync import Client

__all__ = [
    "ApiError", "AsyncClient", "BadRequest", "Client", "ClientError", "Conflict", "ConnectError", "Forbidden",
    "NotFound", "TaskTimeout", "Unauthorized",
]
