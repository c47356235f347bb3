"""Node identity and the API's signing keys, kept in the data directory.

``p2pnn-node init`` makes them once; later starts read them. The node id is
the SHA-1 of the node's raw Ed25519 public key: 160 bits, the size of a
Kademlia id.

Files (all mode 0600, the directory 0700):
    node-ed25519.pem       the node's private key (PKCS#8 PEM)
    api-secret             HS256 secret for API tokens (64 hex characters)
    api-ed25519.pem        EdDSA signing key for API tokens
    api-ed25519.pub.pem    its public key, the one a verifying node needs
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

NODE_KEY = "node-ed25519.pem"
API_SECRET = "api-secret"
API_KEY = "api-ed25519.pem"
API_PUBLIC_KEY = "api-ed25519.pub.pem"


class IdentityError(RuntimeError):
    """A key file is missing, unreadable or not a key."""


@dataclass(frozen=True)
class Identity:
    node_id: str
    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def public_bytes(self) -> bytes:
        return self.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def node_id_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha1(raw).hexdigest()


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def init_data_dir(data_dir: Path) -> list[str]:
    """Create the data directory and every key that is missing; existing keys are kept.

    Returns the names of the files created.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    made = []
    if not (data_dir / NODE_KEY).exists():
        _write_private(data_dir / NODE_KEY, _pem(Ed25519PrivateKey.generate()))
        made.append(NODE_KEY)
    if not (data_dir / API_SECRET).exists():
        _write_private(data_dir / API_SECRET, secrets.token_hex(32).encode())
        made.append(API_SECRET)
    if not (data_dir / API_KEY).exists():
        key = Ed25519PrivateKey.generate()
        _write_private(data_dir / API_KEY, _pem(key))
        pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        (data_dir / API_PUBLIC_KEY).write_bytes(pub)
        made.extend([API_KEY, API_PUBLIC_KEY])
    return made


def _load_pem(path: Path, what: str, parse: Callable[[bytes], Any], expected: type) -> Any:
    try:
        key = parse(path.read_bytes())
    except FileNotFoundError:
        raise IdentityError(f"{path}: no such key file (run `p2pnn-node init`)") from None
    except ValueError as exc:
        raise IdentityError(f"{path}: not a PEM {what} ({exc})") from None
    if not isinstance(key, expected):
        raise IdentityError(f"{path}: not an Ed25519 key")
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    return _load_pem(
        path, "private key", lambda data: serialization.load_pem_private_key(data, password=None), Ed25519PrivateKey
    )


def load_public_key(path: Path) -> Ed25519PublicKey:
    return _load_pem(path, "public key", serialization.load_pem_public_key, Ed25519PublicKey)


def load_identity(data_dir: Path) -> Identity:
    key = load_private_key(data_dir / NODE_KEY)
    return Identity(node_id=node_id_of(key.public_key()), private_key=key)


MIN_SECRET_BYTES = 32  # HMAC-SHA256 keys shorter than its output add no strength and invite guessable secrets


def read_secret(path: Path, *, key: str = "", make: str = "p2pnn-node init") -> bytes:
    """The secret in ``path``. Error handling: IdentityError naming ``key`` (the setting that named the
    file) and the command ``make`` that creates one, when it is missing or too short."""
    where = f"{key}: " if key else ""
    try:
        secret = path.read_bytes().strip()
    except FileNotFoundError:
        raise IdentityError(f"{where}{path}: no such secret file (create it with `{make}`)") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise IdentityError(f"{where}{path}: secret is shorter than {MIN_SECRET_BYTES} bytes (create one with `{make}`)")
    return secret


def read_swarm_secret(secret_file: str) -> bytes:
    """The swarm's join secret, from the file ``swarm.secret_file`` names. Error handling: IdentityError
    naming that key and how to make the file."""
    return read_secret(
        Path(secret_file).expanduser(), key="swarm.secret_file", make=f"p2pnn-node init --swarm-secret {secret_file}",
    )


def make_swarm_secret(path: Path) -> bool:
    """Write a new random join secret to ``path`` (mode 0600), unless a file is there; True if it wrote one.

    Every member of a swarm needs a copy of the same file: make it once, then copy it.
    """
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(path, secrets.token_hex(MIN_SECRET_BYTES).encode() + b"\n")
    return True
