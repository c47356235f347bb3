"""The swarm credential and the signed envelope every DHT record and peer message travels in.

A swarm is a name and a join secret (a file of at least 32 bytes that every
member has). An envelope is ``{"body": {...}, "sig": ..., "mac": ...}``:

- ``sig``: Ed25519 signature by the sender's node key over the canonical JSON
  of the body (sorted keys, no spaces). The body carries the sender's public
  key and id, and the id must be the SHA-1 of that key, so a record cannot be
  re-signed under someone else's id.
- ``mac``: HMAC-SHA256 under the join secret over the same bytes, so only a
  member of the swarm can make an envelope that others accept, whatever key
  it holds.

Both are checked on every read; :func:`open_envelope` raises
:class:`EnvelopeError` naming what was wrong, and the caller drops the data.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from p2pnn.identity import Identity

MAX_ENVELOPE_BYTES = 7000  # a kademlia RPC carries at most 8 KiB, key and framing included


class EnvelopeError(ValueError):
    """An envelope that is malformed, unsigned, forged, from another swarm or not from a member."""


@dataclass(frozen=True)
class SwarmCredential:
    name: str
    secret: bytes

    def mac(self, payload: bytes) -> str:
        return hmac.new(self.secret, payload, hashlib.sha256).hexdigest()


def canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def seal(body: dict[str, Any], ident: Identity, cred: SwarmCredential) -> str:
    """The envelope (JSON text) of ``body``, which gets ``swarm``, ``id`` and ``pub`` added."""
    body = {**body, "swarm": cred.name, "id": ident.node_id, "pub": b64(ident.public_bytes)}
    payload = canonical(body)
    return json.dumps({"body": body, "sig": b64(ident.private_key.sign(payload)), "mac": cred.mac(payload)})


def open_envelope(text: str | bytes, cred: SwarmCredential) -> dict[str, Any]:
    """The body of a valid envelope.

    Error handling: raises EnvelopeError when the text is not an envelope, the
    HMAC is not the swarm's, the swarm name differs, the id is not the hash of
    the key, or the signature does not verify. Freshness is the caller's
    (records and messages have different windows).
    """
    if len(text) > MAX_ENVELOPE_BYTES * 4:
        raise EnvelopeError("envelope too large")
    try:
        outer = json.loads(text)
        body, sig, mac = outer["body"], outer["sig"], outer["mac"]
        if not isinstance(body, dict) or not isinstance(sig, str) or not isinstance(mac, str):
            raise TypeError
        payload = canonical(body)
        pub_raw = base64.b64decode(body["pub"], validate=True)
        signature = base64.b64decode(sig, validate=True)
    except (ValueError, TypeError, KeyError):
        raise EnvelopeError("not a signed envelope") from None
    if not hmac.compare_digest(mac, cred.mac(payload)):
        raise EnvelopeError("bad swarm credential (HMAC)")
    if body.get("swarm") != cred.name:
        raise EnvelopeError(f"from another swarm: {body.get('swarm')!r}")
    if body.get("id") != hashlib.sha1(pub_raw).hexdigest():
        raise EnvelopeError("node id is not the hash of its public key")
    try:
        Ed25519PublicKey.from_public_bytes(pub_raw).verify(signature, payload)
    except (InvalidSignature, ValueError):
        raise EnvelopeError("bad signature") from None
    return body
