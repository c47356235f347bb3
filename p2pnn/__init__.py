"""p2pnn: a peer-to-peer swarm that runs PyTorch work.

The client library is re-exported here (``p2pnn.Client``, ``p2pnn.AsyncClient``)
and imported on first use, so the daemon's start-up does not pay for it.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

try:
    __version__ = metadata.version("p2pnn")
except metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"

_CLIENT_NAMES = frozenset({
    "AsyncClient", "Client", "ApiError", "BadRequest", "ClientError", "Conflict", "ConnectError", "Forbidden",
    "NotFound", "TaskTimeout", "Unauthorized",
})


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from p2pnn import client

        return getattr(client, name)
    raise AttributeError(f"module 'p2pnn' has no attribute {name!r}")


__all__ = ["__version__", *sorted(_CLIENT_NAMES)]
