"""What both clients send: a node's URL split and encoded once, and each call's request parts.

The connections themselves are ``_wire``'s pools: this module says where they go
(the node, or the proxy the environment names for it) and what each request
carries (target, headers, body, timeouts).
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any, NamedTuple

from p2pnn import __version__
from p2pnn.client._calls import Call
from p2pnn.client._errors import ClientError
from p2pnn.client._wire import ReadFailed, Route, Timeouts, TransportError

# Everything a pool raises when no (complete) answer came.
TRANSPORT_ERRORS = (TransportError,)
# What a broken or silent event stream raises: the clients open it again.
STREAM_BROKEN = (ReadFailed,)

# The characters a path keeps as they are: httpx's set. '?' and '#' are not in
# it, so in a task id or artifact name they stay part of the name (httpx, given
# the path as a relative URL, cut them off as a query or a fragment).
PATH_SAFE = "/!$&'()*+,;=:@%[]\\^|"
JSON_HEADERS = [(b"Content-Type", b"application/json")]
EVENT_STREAM_HEADERS = [(b"Accept", b"text/event-stream")]
DEFAULT_PORTS = {"http": 80, "https": 443}


class Proxy(NamedTuple):
    """An HTTP proxy the environment names: where it listens, and its credentials if the URL has them."""

    host: str
    port: int
    auth: tuple[str, str] | None


class Endpoint:
    """A node's base URL and token, encoded once; makes the pool's route and each request's parts.

    Error handling: a URL that cannot be split (a bad port, a host that is not
    a name) raises ClientError here; one with no or another scheme than
    http(s) fails at each request, as ConnectError.
    """

    def __init__(self, url: str, token: str | None, timeout: float) -> None:
        self.url = url
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
            host = (parts.hostname or "").encode("idna").decode("ascii")
        except (ValueError, UnicodeError) as exc:
            raise ClientError(f"invalid node URL {url!r}: {exc}") from None
        self._scheme = parts.scheme
        self._host = host
        self._port = port if port is not None else DEFAULT_PORTS.get(parts.scheme, 0)
        self._base_path = urllib.parse.quote(parts.path.rstrip("/"), safe=PATH_SAFE)
        self._netloc = parts.netloc.rpartition("@")[2]
        self.headers = [(b"Host", self._netloc.encode("idna")), (b"User-Agent", f"p2pnn/{__version__}".encode())]
        if token:
            self.headers.append((b"Authorization", f"Bearer {token}".encode()))
        self.timeout = timeout
        self._timeouts = self.timeouts()

    def timeouts(self, read: float | None = None) -> Timeouts:
        """``timeout`` for each phase of a request; ``read`` for the wait for the answer, if given."""
        t = self.timeout
        return Timeouts(connect=t, read=t if read is None else read, write=t)

    def target(self, path: str, params: Mapping[str, Any] | None = None) -> bytes:
        """The request target of ``path`` under the base URL, with ``params`` as the query.

        Values encode as httpx encoded them: True/False as ``true``/``false``, a
        list or tuple as the key repeated."""
        target = self._base_path + urllib.parse.quote(path, safe=PATH_SAFE)
        if params:
            pairs = [(k, _param(item)) for k, v in params.items()
                     for item in (v if isinstance(v, (list, tuple)) else (v,))]
            target += "?" + urllib.parse.urlencode(pairs)
        return target.encode("ascii")

    def request(self, call: Call) -> dict[str, Any]:
        """The keyword arguments of a pool's ``request`` for a ``_calls.Call``.

        A long poll (``call.wait``) has its read timeout widened by the wait, so
        the node's answer at the end of the wait is not cut off."""
        headers = self.headers
        body = None
        if call.json is not None:
            # As httpx encoded a json= body: compact UTF-8, and NaN refused (ValueError) as JSON has none.
            body = json.dumps(call.json, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
            headers = headers + JSON_HEADERS
        if call.headers:
            headers = headers + [(k.encode(), v.encode()) for k, v in call.headers.items()]
        timeouts = self.timeouts(self.timeout + call.wait) if call.wait else self._timeouts
        return {"method": call.method, "target": self.target(call.path, call.params), "headers": headers,
                "body": body, "timeouts": timeouts}

    def route(self) -> Route:
        """Where the pool connects: the node, or the proxy the environment names for it (which
        forwards an http request, and tunnels to an https node)."""
        scheme = self._scheme
        if scheme not in DEFAULT_PORTS:
            return Route("", 0, refused=f"unsupported URL scheme {scheme!r}: use http:// or https://")
        tls = _ssl_context() if scheme == "https" else None
        proxy = _proxy(scheme, self._netloc)
        if proxy is None:
            return Route(self._host, self._port, tls=tls, server_name=self._host)
        credentials: tuple[tuple[bytes, bytes], ...] = ()
        if proxy.auth is not None:
            token = base64.b64encode(":".join(proxy.auth).encode()).decode()
            credentials = ((b"Proxy-Authorization", f"Basic {token}".encode()),)
        authority = f"{self._host}:{self._port}".encode("ascii")
        if tls is None:  # the proxy forwards each request, named by its absolute URL
            return Route(proxy.host, proxy.port, prefix=b"http://" + authority, headers=credentials)
        tunnel = b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n" % (authority, authority)
        tunnel += b"".join(k + b": " + v + b"\r\n" for k, v in credentials) + b"\r\n"
        return Route(proxy.host, proxy.port, tls=tls, server_name=self._host, tunnel=tunnel)


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
    import certifi  # only an https node needs it

    return ssl.create_default_context(cafile=certifi.where())


def _proxy(scheme: str, netloc: str) -> Proxy | None:
    """The proxy $HTTP_PROXY / $HTTPS_PROXY / $ALL_PROXY name for this node, unless $NO_PROXY exempts it.

    httpx honoured these variables; a client talks to one node, so the choice is made once.
    Error handling: ClientError for a proxy that is not an ``http://`` one (none else is spoken)."""
    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme) or proxies.get("all")
    if not url or urllib.request.proxy_bypass_environment(netloc, proxies):
        return None
    url = url if "://" in url else f"http://{url}"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or 80
    except ValueError as exc:
        raise ClientError(f"invalid proxy URL {url!r}: {exc}") from None
    if parts.scheme != "http" or not parts.hostname:
        raise ClientError(f"unsupported proxy {url!r}: only an http:// proxy is spoken (it tunnels to an https node)")
    auth = None
    if parts.username is not None:
        auth = (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
    return Proxy(parts.hostname, port, auth)
