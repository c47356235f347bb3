"""Where the client finds its node and token: arguments, then P2PNN_URL / P2PNN_TOKEN, then a config file.

The file is TOML, ``$P2PNN_CLIENT_CONFIG`` or ``~/.config/p2pnn/client.toml``::

    url = "http://10.0.0.10:3030"
    token_file = "~/.config/p2pnn/token"   # or: token = "eyJ..."
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from p2pnn.client._errors import ClientError
from p2pnn.client._http import Endpoint

DEFAULT_URL = "http://127.0.0.1:3030"  # a node on this machine with the default api.port
CONFIG_ENV = "P2PNN_CLIENT_CONFIG"
URL_ENV = "P2PNN_URL"
TOKEN_ENV = "P2PNN_TOKEN"
KEYS = ("url", "token", "token_file")


@dataclass(frozen=True)
class Settings:
    url: str
    token: str | None


def config_path(env: Mapping[str, str]) -> Path:
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]).expanduser()
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "p2pnn" / "client.toml"


def resolve(
    url: str | None = None,
    token: str | None = None,
    *,
    config: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Each of url and token from the first place that sets it: the arguments, the environment, the file.

    Error handling: an unreadable or invalid file (one named explicitly must
    exist) raises ClientError naming the file and key.
    """
    env = os.environ if env is None else env
    path = Path(config).expanduser() if config is not None else config_path(env)
    file = _read(path, required=config is not None or CONFIG_ENV in env)
    url = url or env.get(URL_ENV) or file.get("url") or DEFAULT_URL
    if not token:
        token = env.get(TOKEN_ENV) or file.get("token")
        if not token and file.get("token_file"):
            token_path = Path(file["token_file"]).expanduser()
            try:
                token = token_path.read_text().strip()
            except OSError as exc:
                raise ClientError(f"{path}: token_file: cannot read {token_path}: {exc.strerror}") from None
    if not url.startswith(("http://", "https://")):
        raise ClientError(f"node URL must start with http:// or https://, got {url!r}")
    return Settings(url=url.rstrip("/"), token=token or None)


def _read(path: Path, *, required: bool) -> dict[str, str]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        if required:
            raise ClientError(f"{path}: no such config file") from None
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ClientError(f"{path}: {exc}") from None
    for key, value in data.items():
        if key not in KEYS:
            raise ClientError(f"{path}: {key}: unknown key (known: {', '.join(KEYS)})")
        if not isinstance(value, str):
            raise ClientError(f"{path}: {key}: must be a string")
    return data


def endpoint(url: str | None, token: str | None, timeout: float) -> Endpoint:
    """The node either client talks to: its URL, the token's header and the timeout.

    With no ``url``, both come from ``resolve()`` (environment, then the file).
    Error handling: ClientError for a URL that cannot be split (``Endpoint``)."""
    settings = resolve() if url is None else Settings(url.rstrip("/"), token)
    return Endpoint(settings.url, settings.token, timeout)
