"""The HTTP both clients speak: httpcore's connection pools, fed requests built here.

httpcore is the transport httpx itself runs on; the clients call it directly
because httpx's own layers (URL, request and response models, cookies,
client machinery) cost about 0.6 ms per call on top of it, a third of a
short call's round trip. What httpx did for the clients is done here once per
client where it can be (the base URL is split, the fixed headers encoded, the
proxy chosen when the client is made) and once per request where it must be
(path, query, body, timeouts).
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

import httpcore

from p2pnn import __version__
from p2pnn.client._calls import Call
from p2pnn.client._errors import ClientError

# httpx's defaults, which the clients ran with: up to 100 requests at once
# (each ``wait`` holds one connection for its event stream), and idle
# connections dropped after 5 s, as the node's server closes them about then:
# a connection it is closing must not be picked for the next request.
MAX_CONNECTIONS = 100
MAX_KEEPALIVE_CONNECTIONS = 20
KEEPALIVE_EXPIRY = 5.0

# Everything httpcore raises when no (complete) answer came: it has no common base class.
TRANSPORT_ERRORS = (
    httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError, httpcore.ProxyError,
    httpcore.UnsupportedProtocol,
)
# What a broken or silent event stream raises: the clients open it again.
STREAM_BROKEN = (httpcore.ReadTimeout, httpcore.ReadError, httpcore.RemoteProtocolError)

# The characters a path keeps as they are: httpx's set. '?' and '#' are not in
# it, so in a task id or artifact name they stay part of the name (httpx, given
# the path as a relative URL, cut them off as a query or a fragment).
PATH_SAFE = "/!$&'()*+,;=:@%[]\\^|"
JSON_HEADERS = [(b"Content-Type", b"application/json")]
EVENT_STREAM_HEADERS = [(b"Accept", b"text/event-stream")]


class Endpoint:
    """A node's base URL and token, encoded once; makes the pool and each request's parts.

    Error handling: a URL that cannot be split (a bad port, a host that is not
    a name) raises ClientError here; one with no or another scheme than
    http(s) fails at the first request, as ConnectError, as it did with httpx.
    """

    def __init__(self, url: str, token: str | None, timeout: float) -> None:
        self.url = url
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
            host = (parts.hostname or "").encode("idna")
        except (ValueError, UnicodeError) as exc:
            raise ClientError(f"invalid node URL {url!r}: {exc}") from None
        self._scheme = parts.scheme.encode("ascii", "replace")
        self._host = host
        self._port = port
        self._base_path = urllib.parse.quote(parts.path.rstrip("/"), safe=PATH_SAFE)
        self.headers = [(b"Host", parts.netloc.rpartition("@")[2].encode("idna")),
                        (b"User-Agent", f"p2pnn/{__version__}".encode())]
        if token:
            self.headers.append((b"Authorization", f"Bearer {token}".encode()))
        self.timeout = timeout
        self.extensions = {"timeout": self.timeouts()}

    def timeouts(self, read: float | None = None) -> dict[str, float]:
        """httpcore's per-request timeouts: ``timeout`` for each phase, ``read`` for the wait for the answer."""
        t = self.timeout
        return {"connect": t, "read": t if read is None else read, "write": t, "pool": t}

    def target(self, path: str, params: Mapping[str, Any] | None = None) -> httpcore.URL:
        """The URL of ``path`` under the base URL, with ``params`` as the query.

        Values encode as httpx encoded them: True/False as ``true``/``false``, a
        list or tuple as the key repeated."""
        target = self._base_path + urllib.parse.quote(path, safe=PATH_SAFE)
        if params:
            pairs = [(k, _param(item)) for k, v in params.items()
                     for item in (v if isinstance(v, (list, tuple)) else (v,))]
            target += "?" + urllib.parse.urlencode(pairs)
        return httpcore.URL(scheme=self._scheme, host=self._host, port=self._port, target=target.encode("ascii"))

    def request(self, call: Call) -> dict[str, Any]:
        """The keyword arguments of ``pool.request`` for a ``_calls.Call``.

        A long poll (``call.wait``) has its read timeout widened by the wait, so
        the node's answer at the end of the wait is not cut off."""
        headers = self.headers
        content = None
        if call.json is not None:
            # As httpx encodes a json= body: compact UTF-8, and NaN refused (ValueError) as JSON has none.
            content = json.dumps(call.json, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
            headers = headers + JSON_HEADERS
        if call.headers:
            headers = headers + [(k.encode(), v.encode()) for k, v in call.headers.items()]
        extensions = {"timeout": self.timeouts(self.timeout + call.wait)} if call.wait else self.extensions
        return {"method": call.method, "url": self.target(call.path, call.params), "headers": headers,
                "content": content, "extensions": extensions}

    def pool_options(self) -> dict[str, Any]:
        """What either pool class is made with: limits, TLS trust and the proxy, as httpx chose them."""
        options: dict[str, Any] = {"max_connections": MAX_CONNECTIONS,
                                   "max_keepalive_connections": MAX_KEEPALIVE_CONNECTIONS,
                                   "keepalive_expiry": KEEPALIVE_EXPIRY}
        if self._scheme == b"https":
            options["ssl_context"] = _ssl_context()
        proxy = _proxy(self._scheme.decode(), self.headers[0][1].decode())
        if proxy is not None:
            options["proxy"] = proxy
        return options


def _param(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    return "" if value is None else str(value)


def _ssl_context() -> ssl.SSLContext:
    """The CAs httpx trusted: $SSL_CERT_FILE, else $SSL_CERT_DIR, else certifi's bundle."""
    if os.environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    if os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=os.environ["SSL_CERT_DIR"])
    import certifi  # httpcore's own dependency; only an https node needs it

    return ssl.create_default_context(cafile=certifi.where())


def _proxy(scheme: str, netloc: str) -> httpcore.Proxy | None:
    """The proxy $HTTP_PROXY / $HTTPS_PROXY / $ALL_PROXY name for this node, unless $NO_PROXY exempts it.

    httpx honoured these variables; a client talks to one node, so the choice is made once."""
    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme) or proxies.get("all")
    if not url or urllib.request.proxy_bypass_environment(netloc, proxies):
        return None
    url = url if "://" in url else f"http://{url}"
    parts = urllib.parse.urlsplit(url)
    auth = None
    if parts.username is not None:
        auth = (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
        url = url.replace(parts.netloc, parts.netloc.rpartition("@")[2], 1)
    return httpcore.Proxy(url, auth=auth)
