"""API tokens: JWT bearer tokens with a pinned algorithm and three roles.

viewer < operator < admin. A viewer reads; an operator submits tasks and
cancels its own; an admin does everything. The algorithm is fixed by
configuration and is the only one accepted, so ``alg: none`` and
HS256-signed-with-the-public-key confusion are refused by construction.

Swarm tokens: in a swarm, every member derives the same token key from the
swarm's join secret (which every member already has) and the key generation
``auth.key_generation``: ``HMAC-SHA256(join secret, label, swarm name,
generation)``, used as the HS256 secret or as the seed of an Ed25519 key
(EdDSA). Such a token carries ``kid = "<swarm>/<generation>"``; a token
minted by any member, or by ``p2pnn-node token`` with the swarm's
configuration, is accepted by every member. Rotation: raise
``auth.key_generation`` on every member; tokens of the old generation are
refused from then on. Revocation of one token: its ``jti`` in the store's
deny list (``p2pnn-node revoke``), which every member reads every
``auth.revocation_refresh_seconds``. A token without ``kid`` is checked
against the node's own key (its data directory), as on a lone node.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import jwt
import trio

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnn import identity, logs
from p2pnn.callers import ROLES, Caller
from p2pnn.config import Config
from p2pnn.store import StoreError

class AuthError(Exception):
    """The request is not authenticated (401) or not allowed (403)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


log = logs.get(__name__)

# Tokens whose signature and claims were verified, kept so that a client's every request does not
# pay for a signature check again (a third of a millisecond of a short request's CPU). The time
# window and the deny list are still checked on each use; the oldest entry goes first when full.
VERIFIED_CACHE_SIZE = 1024
SWARM_KEY_LABEL = b"p2pnn api token key"  # domain separation: this HMAC of the join secret is used for nothing else


def swarm_token_key(secret: bytes, swarm: str, generation: int) -> bytes:
    """The 32 bytes every member of ``swarm`` derives for API tokens of ``generation``."""
    message = b"\0".join((SWARM_KEY_LABEL, swarm.encode(), str(generation).encode()))
    return hmac.new(secret, message, hashlib.sha256).digest()


class Authenticator:
    """Mints and verifies API tokens.

    Error handling: ``verify`` raises AuthError(401) for every malformed,
    expired, foreign or wrongly signed token, with a message that names the
    problem but never echoes the token.
    """

    def __init__(
        self, *, algorithm: str, issuer: str, audience: str, verify_key: Any, signing_key: Any | None, leeway: int,
        swarm_key: tuple[str, Any, Any] | None = None,
    ) -> None:
        """``swarm_key``: (kid, verify key, signing key) of the swarm's tokens; those are minted with it."""
        self.algorithm = algorithm
        self.issuer = issuer
        self.audience = audience
        self._verify_key = verify_key
        self._signing_key = signing_key
        self._leeway = leeway
        self._swarm_key = swarm_key
        self._revoked: frozenset[str] = frozenset()
        # token -> (caller, jti, valid from, valid until), each time with the leeway applied
        self._verified: dict[str, tuple[Caller, Any, float, float]] = {}

    @classmethod
    def from_config(cls, config: Config) -> "Authenticator":
        auth, data = config.auth, config.data_dir
        if auth.algorithm == "HS256":
            secret = identity.read_secret(
                Path(auth.secret_file or data / identity.API_SECRET), key="auth.secret_file",
                make="p2pnn-node init" if not auth.secret_file else f"openssl rand -hex 32 > {auth.secret_file}",
            )
            verify_key = signing_key = secret
        else:
            public = Path(auth.public_key_file or data / identity.API_PUBLIC_KEY)
            verify_key = identity.load_public_key(public)
            private = Path(auth.private_key_file or data / identity.API_KEY)
            # A node that only verifies needs just the public key.
            signing_key = identity.load_private_key(private) if private.exists() else None
        swarm_key = None
        if config.swarm_mode:
            secret = identity.read_swarm_secret(config.swarm.secret_file)
            material = swarm_token_key(secret, config.swarm.name, auth.key_generation)
            kid = f"{config.swarm.name}/{auth.key_generation}"
            if auth.algorithm == "HS256":
                swarm_key = (kid, material, material)
            else:
                private_key = Ed25519PrivateKey.from_private_bytes(material)
                swarm_key = (kid, private_key.public_key(), private_key)
        return cls(
            algorithm=auth.algorithm, issuer=auth.issuer, audience=auth.audience,
            verify_key=verify_key, signing_key=signing_key, leeway=auth.leeway_seconds, swarm_key=swarm_key,
        )

    def revoke(self, jtis: Iterable[str]) -> None:
        """The deny list: tokens with these ``jti`` are refused from now on (replaces the previous list)."""
        self._revoked = frozenset(jtis)

    async def follow_revocations(self, fetch: Callable[[float], Awaitable[Iterable[str]]], interval: float) -> None:
        """Keep the deny list in step with ``fetch(now)`` (the store's), every ``interval`` seconds, until cancelled.

        Error handling: a failed read is logged and the list in force is kept until the next one succeeds.
        """
        while True:
            try:
                self.revoke(await fetch(time.time()))
            except StoreError as exc:
                log.warning("auth.revocations_unread", error=str(exc))
            await trio.sleep(interval)

    def mint(self, sub: str, role: str, ttl_seconds: int) -> str:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        if not sub:
            raise ValueError("sub must not be empty")
        kid, signing_key = (self._swarm_key[0], self._swarm_key[2]) if self._swarm_key else (None, self._signing_key)
        if signing_key is None:
            raise ValueError("this node has no signing key for API tokens")
        now = int(time.time())
        claims = {
            "sub": sub, "role": role, "iss": self.issuer, "aud": self.audience,
            "iat": now, "nbf": now, "exp": now + ttl_seconds, "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, signing_key, algorithm=self.algorithm, headers={"kid": kid} if kid else None)

    def verify(self, header: str | None) -> Caller:
        if not header:
            raise AuthError(401, "missing Authorization header (expected: Bearer <token>)")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError(401, "malformed Authorization header (expected: Bearer <token>)")
        known = self._verified.get(token)
        if known is not None:
            caller, jti, valid_from, valid_until = known
            if valid_from <= time.time() <= valid_until and jti not in self._revoked:
                return caller
            del self._verified[token]  # checked in full below, which names what is wrong
        caller, claims = self._verify(token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            del self._verified[next(iter(self._verified))]
        starts = max(float(claims.get("nbf", 0) or 0), float(claims.get("iat", 0) or 0))
        self._verified[token] = (caller, claims.get("jti"), starts - self._leeway, float(claims["exp"]) + self._leeway)
        return caller

    def _verify(self, token: str) -> tuple[Caller, dict[str, Any]]:
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError as exc:
            raise AuthError(401, f"invalid token: {type(exc).__name__}") from None
        if kid is None:
            verify_key = self._verify_key
        elif self._swarm_key is not None and kid == self._swarm_key[0]:
            verify_key = self._swarm_key[1]
        else:  # another swarm's, or a generation rotated away
            raise AuthError(401, "token signed by a key this node does not accept (another swarm, or rotated)")
        try:
            claims = jwt.decode(
                token, verify_key, algorithms=[self.algorithm],
                audience=self.audience, issuer=self.issuer, leeway=self._leeway,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "token expired") from None
        except jwt.InvalidAudienceError:
            raise AuthError(401, "token has the wrong audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError(401, "token has the wrong issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(401, f"token lacks the {exc.claim} claim") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError(401, f"token algorithm refused (this node accepts {self.algorithm} only)") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(401, f"invalid token: {type(exc).__name__}") from None
        if claims.get("jti") in self._revoked:
            raise AuthError(401, "token revoked")
        role = claims.get("role")
        if role not in ROLES:
            raise AuthError(401, "token has no valid role claim")
        return Caller(sub=str(claims["sub"]), role=role), claims


def require(caller: Caller, role: str) -> None:
    if not caller.at_least(role):
        raise AuthError(403, f"this needs the {role} role; the token has {caller.role}")
