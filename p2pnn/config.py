"""Configuration: a TOML file overridden by ``P2PNN_<SECTION>__<KEY>`` environment variables.

Every key, its type, its default and its allowed values are declared once,
in the dataclasses below; ``bootstrap/default.example.toml`` documents them
and a test keeps the two in step. A wrong section, key, type or value raises
:class:`ConfigError` whose message starts with the key (``store.backend: ...``).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "P2PNN_"
CONFIG_ENV = "P2PNN_CONFIG"


class ConfigError(ValueError):
    """Invalid configuration; the message names the key."""


def _key(*, choices: tuple[str, ...] = (), lo: float | None = None, hi: float | None = None, doc: str = "") -> dict:
    return {"choices": choices, "lo": lo, "hi": hi, "doc": doc}


def _default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "p2pnn")


@dataclass(frozen=True)
class NodeConfig:
    data_dir: str = field(default_factory=_default_data_dir, metadata=_key(doc="keys, the SQLite file, scratch space"))
    role: str = field(default="auto", metadata=_key(choices=("auto", "principal", "an", "ki"), doc="preferred role"))


@dataclass(frozen=True)
class ApiConfig:
    host: str = field(default="0.0.0.0", metadata=_key(doc="address the REST API binds"))
    port: int = field(default=3030, metadata=_key(lo=0, hi=65535, doc="0 picks a free port"))
    max_body_bytes: int = field(default=8 * 1024 * 1024, metadata=_key(lo=1024, hi=1 << 30))
    insecure: bool = field(default=False, metadata=_key(doc="no auth; binds 127.0.0.1 only"))


@dataclass(frozen=True)
class AuthConfig:
    algorithm: str = field(default="HS256", metadata=_key(choices=("HS256", "EdDSA")))
    issuer: str = field(default="p2pnn")
    audience: str = field(default="p2pnn-api")
    secret_file: str = field(default="", metadata=_key(doc="HS256 secret; default <data_dir>/api-secret"))
    private_key_file: str = field(default="", metadata=_key(doc="EdDSA signing key; default <data_dir>/api-ed25519.pem"))
    public_key_file: str = field(default="", metadata=_key(doc="EdDSA verify key; default <data_dir>/api-ed25519.pub.pem"))
    token_ttl_seconds: int = field(default=3600, metadata=_key(lo=1, hi=366 * 86400))
    leeway_seconds: int = field(default=10, metadata=_key(lo=0, hi=600, doc="clock skew allowed on exp/nbf"))
    key_generation: int = field(
        default=0, metadata=_key(lo=0, hi=1_000_000, doc="swarm tokens: raise on every member to rotate the swarm's token key")
    )
    revocation_refresh_seconds: float = field(
        default=5.0, metadata=_key(lo=0.5, hi=3600, doc="swarm: how often the deny list of revoked tokens is read")
    )


@dataclass(frozen=True)
class StoreConfig:
    backend: str = field(default="sqlite", metadata=_key(choices=("sqlite", "postgres")))
    path: str = field(default="", metadata=_key(doc="SQLite file; default <data_dir>/p2pnn.sqlite3"))
    url: str = field(default="", metadata=_key(doc="postgresql://user@host:port/db (PostgreSQL or CockroachDB)"))
    schema: str = field(default="public")
    pool_size: int = field(default=4, metadata=_key(lo=1, hi=64))
    connect_timeout_seconds: float = field(default=5.0, metadata=_key(lo=1, hi=300, doc="postgres: one connection attempt"))
    statement_timeout_seconds: float = field(
        default=10.0, metadata=_key(lo=0.5, hi=3600, doc="postgres: one transaction, then it is an error and retried")
    )
    unreachable_exit_seconds: float = field(
        default=300.0, metadata=_key(lo=5, hi=86400, doc="store unreachable this long at start: exit 75 (systemd restarts)")
    )
    sqlite_synchronous: str = field(
        default="full", metadata=_key(choices=("full", "normal"), doc="normal: faster, may lose the last commits on power loss")
    )


@dataclass(frozen=True)
class BusConfig:
    backend: str = field(default="local", metadata=_key(choices=("local", "amqp"), doc="local: in-process queue"))
    url: str = field(default="", metadata=_key(doc="amqp[s]://user:password@host:port/vhost; overrides the keys below"))
    host: str = field(default="127.0.0.1")
    port: int = field(default=5672, metadata=_key(lo=1, hi=65535))
    vhost: str = field(default="/")
    user: str = field(default="guest")
    password_file: str = field(default="", metadata=_key(doc="file holding the password; empty: guest"))
    tls_ca_file: str = field(default="", metadata=_key(doc="CA bundle; set: connect with TLS"))
    prefix: str = field(default="p2pnn", metadata=_key(doc="start of every queue and exchange name"))
    prefetch: int = field(default=100, metadata=_key(lo=1, hi=10_000, doc="unacked tasks an An holds"))
    heartbeat_seconds: int = field(default=30, metadata=_key(lo=0, hi=3600))
    blocked_timeout_seconds: float = field(default=60.0, metadata=_key(lo=1, hi=3600))
    queue_type: str = field(default="auto", metadata=_key(choices=("auto", "quorum", "classic")))
    short_queue_type: str = field(default="classic", metadata=_key(
        choices=("auto", "quorum", "classic"), doc="the short queue's type: classic hands a task on before its disk write"))
    ki_message_ttl_seconds: float = field(default=30.0, metadata=_key(lo=1, hi=86400))
    ki_queue_expires_seconds: float = field(default=3600.0, metadata=_key(lo=60, hi=30 * 86400))
    delivery_limit: int = field(default=20, metadata=_key(lo=1, hi=1000))
    beat_interval_seconds: float = field(default=1.0, metadata=_key(lo=0.05, hi=60))
    beat_timeout_seconds: float = field(default=5.0, metadata=_key(lo=0.2, hi=600))
    forward_ahead: float = field(default=2.0, metadata=_key(
        lo=0, hi=16, doc="short tasks an An may forward to a Ki beyond its free slots, per slot (0: only into free slots)"))
    forward_ahead_age_seconds: float = field(default=0.5, metadata=_key(
        lo=0, hi=3600, doc="no forwarding ahead to a Ki whose oldest task in hand is older than this"))
    park_fail_seconds: float = field(
        default=300.0, metadata=_key(lo=1, hi=7 * 86400, doc="a task no live Ki can run fails after this long")
    )
    direct_short: bool = field(default=True, metadata=_key(
        doc="amqp: tasks known to be short go to the short queue, which every Ki consumes (one hop, no An)"))


@dataclass(frozen=True)
class ComputeConfig:
    slots: int = field(default=2, metadata=_key(lo=0, hi=256, doc="worker processes; 0 runs no tasks here"))
    torch_threads: int = field(default=1, metadata=_key(lo=1, hi=256))
    preload_torch: bool = field(default=True, metadata=_key(doc="workers import torch at start, not at their first job"))
    max_attempts: int = field(default=3, metadata=_key(lo=1, hi=20))
    lease_seconds: float = field(default=30.0, metadata=_key(lo=1, hi=3600))
    max_epochs: int = field(default=200, metadata=_key(lo=1, hi=100_000))
    max_wall_seconds: float = field(default=3600.0, metadata=_key(lo=1, hi=7 * 86400))
    max_tensor_elements: int = field(default=1_000_000, metadata=_key(lo=1, hi=1 << 34))
    max_samples: int = field(default=100_000, metadata=_key(lo=10, hi=1 << 30))
    rendezvous_port_first: int = field(
        default=29400, metadata=_key(lo=1, hi=65535, doc="first port data-parallel groups meet on at this node")
    )
    rendezvous_port_count: int = field(default=100, metadata=_key(lo=1, hi=10_000, doc="ports from the first one on"))
    rendezvous_timeout_seconds: float = field(
        default=120.0, metadata=_key(lo=1, hi=3600, doc="how long a rank waits for its group before the attempt fails")
    )


@dataclass(frozen=True)
class SweeperConfig:
    interval_seconds: float = field(default=2.0, metadata=_key(lo=0.05, hi=3600))
    pending_after_seconds: float = field(default=10.0, metadata=_key(lo=0.1, hi=86400, doc="re-publish pending tasks this old"))
    stranded_after_seconds: float = field(
        default=10.0, metadata=_key(lo=0.5, hi=3600, doc="re-publish queued tasks with no message on its way this old")
    )
    queued_after_seconds: float = field(default=600.0, metadata=_key(lo=0, hi=7 * 86400, doc="amqp: re-publish queued tasks this old"))
    standby: bool = field(default=True, metadata=_key(doc="amqp without a swarm: nodes without the principal role sweep too, slower"))


@dataclass(frozen=True)
class LogConfig:
    level: str = field(default="info", metadata=_key(choices=("debug", "info", "warning", "error")))
    format: str = field(default="json", metadata=_key(choices=("json", "text")))


@dataclass(frozen=True)
class SwarmConfig:
    name: str = field(default="", metadata=_key(doc="empty: no swarm, the embedded single node holds every role"))
    secret_file: str = field(default="", metadata=_key(doc="the swarm's join secret (at least 32 bytes), shared by every member"))
    advertise_host: str = field(default="", metadata=_key(doc="IP address other nodes reach this one at"))
    priority: int = field(default=0, metadata=_key(lo=-1000, hi=1000, doc="election rank: higher wins, then node id"))
    preempt: bool = field(default=True, metadata=_key(doc="a higher-ranked node that joins takes over once"))
    heartbeat_seconds: float = field(default=0.2, metadata=_key(lo=0.05, hi=60))
    election_timeout_seconds: float = field(default=0.8, metadata=_key(lo=0.2, hi=600))
    answer_timeout_seconds: float = field(default=0.4, metadata=_key(lo=0.05, hi=60))
    lease_seconds: float = field(default=1.2, metadata=_key(lo=0.5, hi=3600))
    store_timeout_seconds: float = field(
        default=0.5, metadata=_key(lo=0.05, hi=600, doc="deadline of each election store call and fenced write (role map, sweep); shorter than the lease")
    )
    ki_per_an: int = field(default=4, metadata=_key(lo=1, hi=1000, doc="about one An per this many Ki"))


@dataclass(frozen=True)
class DhtConfig:
    host: str = field(default="0.0.0.0", metadata=_key(doc="address the Kademlia UDP server binds"))
    port: int = field(default=8468, metadata=_key(lo=0, hi=65535, doc="0 picks a free port"))
    bootstrap_peers: tuple[str, ...] = field(default=(), metadata=_key(doc="HOST:PORT of DHT nodes to join through"))
    rpc_timeout_seconds: float = field(default=1.0, metadata=_key(lo=0.05, hi=60))
    record_ttl_seconds: float = field(default=15.0, metadata=_key(lo=1, hi=86400))
    republish_seconds: float = field(default=5.0, metadata=_key(lo=0.1, hi=86400))
    refresh_seconds: float = field(default=1.0, metadata=_key(lo=0.05, hi=3600, doc="how often a node gossips membership"))


@dataclass(frozen=True)
class PeerConfig:
    host: str = field(default="0.0.0.0", metadata=_key(doc="address the peer-link WebSocket server binds"))
    port: int = field(default=8469, metadata=_key(lo=0, hi=65535, doc="0 picks a free port"))
    replay_window_seconds: float = field(default=10.0, metadata=_key(lo=0.5, hi=3600))
    connect_timeout_seconds: float = field(default=1.0, metadata=_key(lo=0.05, hi=60))


@dataclass(frozen=True)
class Config:
    node: NodeConfig = field(default_factory=NodeConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    bus: BusConfig = field(default_factory=BusConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    sweeper: SweeperConfig = field(default_factory=SweeperConfig)
    log: LogConfig = field(default_factory=LogConfig)
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    dht: DhtConfig = field(default_factory=DhtConfig)
    peer: PeerConfig = field(default_factory=PeerConfig)

    @property
    def swarm_mode(self) -> bool:
        return bool(self.swarm.name)

    @property
    def data_dir(self) -> Path:
        return Path(self.node.data_dir).expanduser()

    def replace(self, section: str, **changes: Any) -> "Config":
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


def sections() -> dict[str, type]:
    return {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def _coerce(name: str, typ: type, value: Any, *, from_env: bool) -> Any:
    if typing.get_origin(typ) is tuple:  # a list of strings: a TOML array, or comma-separated in the environment
        items = [v.strip() for v in str(value).split(",") if v.strip()] if from_env else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ConfigError(f"{name}: expected a list of strings, got {type(value).__name__} {value!r}")
        return tuple(items)
    if from_env:
        text = str(value).strip()
        try:
            if typ is bool:
                if text.lower() in ("1", "true", "yes", "on"):
                    return True
                if text.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if typ is int:
                return int(text)
            if typ is float:
                return float(text)
        except ValueError:
            raise ConfigError(f"{name}: expected {typ.__name__}, got {text!r}") from None
        return text
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not typ:
        raise ConfigError(f"{name}: expected {typ.__name__}, got {type(value).__name__} {value!r}")
    return value


def _check(name: str, meta: Mapping[str, Any], value: Any) -> None:
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{name}: must be one of {', '.join(meta['choices'])}, got {value!r}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and value < lo or hi is not None and value > hi:
        raise ConfigError(f"{name}: must be between {lo} and {hi}, got {value!r}")


def _build_section(section: str, cls: type, values: Mapping[str, Any], env: Mapping[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"{section}.{key}: unknown key (known: {', '.join(known)})")
    kwargs: dict[str, Any] = {}
    for key, f in known.items():
        name = f"{section}.{key}"
        env_name = f"{ENV_PREFIX}{section.upper()}__{key.upper()}"
        if env_name in env:
            kwargs[key] = _coerce(name, hints[key], env[env_name], from_env=True)
        elif key in values:
            kwargs[key] = _coerce(name, hints[key], values[key], from_env=False)
        else:
            continue
        _check(name, f.metadata, kwargs[key])
    return cls(**kwargs)


def load(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (``path``, else ``$P2PNN_CONFIG``, else none) and apply the environment.

    Error handling: a missing or unparsable file, an unknown section or key,
    a wrong type or a value out of range raises ConfigError naming it.
    """
    env = os.environ if env is None else env
    path = path or env.get(CONFIG_ENV) or None
    raw: dict[str, Any] = {}
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config: file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
    known = sections()
    for section, values in raw.items():
        if section not in known:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(known)})")
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: must be a table")
    for name in env:
        if name.startswith(ENV_PREFIX) and "__" in name:
            section, _, key = name[len(ENV_PREFIX):].lower().partition("__")
            if section not in known:
                raise ConfigError(f"{name}: unknown section {section!r}")
            if key not in {f.name for f in dataclasses.fields(known[section])}:
                raise ConfigError(f"{section}.{key}: unknown key (from {name})")
    built = {s: _build_section(s, cls, raw.get(s, {}), env) for s, cls in known.items()}
    config = Config(**built)
    if config.store.backend == "postgres" and not config.store.url:
        raise ConfigError("store.url: required when store.backend is postgres")
    check_swarm(config)
    return config


def check_swarm(config: Config) -> None:
    """Cross-key rules of swarm mode; the bootstrap peers are parsed here so a typo stops the node at start."""
    for peer in config.dht.bootstrap_peers:
        host, sep, port = peer.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ConfigError(f"dht.bootstrap_peers: expected HOST:PORT, got {peer!r}")
    if config.swarm.heartbeat_seconds >= config.swarm.election_timeout_seconds:
        raise ConfigError("swarm.heartbeat_seconds: must be shorter than swarm.election_timeout_seconds")
    if config.swarm.heartbeat_seconds >= config.swarm.lease_seconds:
        raise ConfigError("swarm.heartbeat_seconds: must be shorter than swarm.lease_seconds (the lease is renewed each beat)")
    if config.swarm.store_timeout_seconds >= config.swarm.lease_seconds:
        raise ConfigError("swarm.store_timeout_seconds: must be shorter than swarm.lease_seconds")
    if config.dht.republish_seconds >= config.dht.record_ttl_seconds:
        raise ConfigError("dht.republish_seconds: must be shorter than dht.record_ttl_seconds")
    if config.bus.backend == "amqp" and config.sweeper.stranded_after_seconds >= config.bus.ki_message_ttl_seconds:
        raise ConfigError(
            "sweeper.stranded_after_seconds: must be shorter than bus.ki_message_ttl_seconds "
            "(a stranded task should be found before an unclaimed message would come back)"
        )
    if not config.swarm_mode:
        if config.dht.bootstrap_peers:
            raise ConfigError("dht.bootstrap_peers: joining a swarm needs swarm.name")
        return
    if config.store.backend != "postgres":
        raise ConfigError("swarm.name: swarm mode needs a shared store (store.backend = postgres)")
    if not config.swarm.secret_file:
        raise ConfigError("swarm.secret_file: swarm mode needs the swarm's join secret")


def describe() -> list[tuple[str, str, Any, str]]:
    """(section, key, default, doc) for every key, in declaration order: the example file's source."""
    rows = []
    for section, cls in sections().items():
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
            rows.append((section, f.name, default, f.metadata.get("doc", "")))
    return rows
