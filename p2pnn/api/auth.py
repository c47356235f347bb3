"""API tokens: JWT bearer tokens with a pinned algorithm and three roles.

viewer < operator < admin. A viewer reads; an operator submits tasks and
cancels its own; an admin does everything. The algorithm is fixed by
configuration and is the only one accepted, so ``alg: none`` and
HS256-signed-with-the-public-key confusion are refused by construction.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import jwt

from p2pnn import identity
from p2pnn.callers import ROLES, Caller
from p2pnn.config import Config

class AuthError(Exception):
    """The request is not authenticated (401) or not allowed (403)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Authenticator:
    """Mints and verifies API tokens.

    Error handling: ``verify`` raises AuthError(401) for every malformed,
    expired, foreign or wrongly signed token, with a message that names the
    problem but never echoes the token.
    """

    def __init__(self, *, algorithm: str, issuer: str, audience: str, verify_key: Any, signing_key: Any | None, leeway: int) -> None:
        self.algorithm = algorithm
        self.issuer = issuer
        self.audience = audience
        self._verify_key = verify_key
        self._signing_key = signing_key
        self._leeway = leeway

    @classmethod
    def from_config(cls, config: Config) -> "Authenticator":
        auth, data = config.auth, config.data_dir
        if auth.algorithm == "HS256":
            secret = identity.read_secret(Path(auth.secret_file or data / identity.API_SECRET))
            verify_key = signing_key = secret
        else:
            public = Path(auth.public_key_file or data / identity.API_PUBLIC_KEY)
            verify_key = identity.load_public_key(public)
            private = Path(auth.private_key_file or data / identity.API_KEY)
            # A node that only verifies needs just the public key.
            signing_key = identity.load_private_key(private) if private.exists() else None
        return cls(
            algorithm=auth.algorithm, issuer=auth.issuer, audience=auth.audience,
            verify_key=verify_key, signing_key=signing_key, leeway=auth.leeway_seconds,
        )

    def mint(self, sub: str, role: str, ttl_seconds: int) -> str:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        if not sub:
            raise ValueError("sub must not be empty")
        if self._signing_key is None:
            raise ValueError("this node has no signing key for API tokens")
        now = int(time.time())
        claims = {
            "sub": sub, "role": role, "iss": self.issuer, "aud": self.audience,
            "iat": now, "nbf": now, "exp": now + ttl_seconds, "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._signing_key, algorithm=self.algorithm)

    def verify(self, header: str | None) -> Caller:
        if not header:
            raise AuthError(401, "missing Authorization header (expected: Bearer <token>)")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError(401, "malformed Authorization header (expected: Bearer <token>)")
        try:
            claims = jwt.decode(
                token.strip(), self._verify_key, algorithms=[self.algorithm],
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
        role = claims.get("role")
        if role not in ROLES:
            raise AuthError(401, "token has no valid role claim")
        return Caller(sub=str(claims["sub"]), role=role)


def require(caller: Caller, role: str) -> None:
    if not caller.at_least(role):
        raise AuthError(403, f"this needs the {role} role; the token has {caller.role}")
