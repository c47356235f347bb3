"""The ``p2pnn-node`` command: parses its arguments, then hands over to the node or the client."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

import trio

from p2pnn import __version__, identity, logs
from p2pnn import config as config_mod
from p2pnn.config import Config, ConfigError
from p2pnn.store import StoreError, StoreUnreachable

log = logs.get("p2pnn.cli")

EXIT_CONFIG = 2  # configuration or usage error: nothing was started
EXIT_UNAVAILABLE = 75  # EX_TEMPFAIL: a service stayed unreachable past its bound; a restart may fix it

DESCRIPTION = """\
p2pnn-node runs one node of a p2pnn swarm: a REST API for neural-network
tasks (train, evaluate, infer, echo), a task store, and worker processes
that run the tasks with PyTorch. Alone, a node holds every role and needs no
other service (SQLite store, in-process queue). Given a swarm name, its join
secret, a shared PostgreSQL/CockroachDB store and a bootstrap peer, it joins
the swarm: the elected principal assigns it a role (An or Ki).

Configuration comes from a TOML file (--config or $P2PNN_CONFIG; every key
is documented in bootstrap/default.example.toml), overridden by
P2PNN_<SECTION>__<KEY> environment variables, overridden by flags.
"""


def _node_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="address the API binds (api.host)")
    p.add_argument("--port", type=int, help="API port (api.port; 0 picks a free one)")
    p.add_argument("--slots", type=int, help="worker processes (compute.slots)")
    p.add_argument(
        "--bootstrap", action="append", metavar="HOST:PORT", default=None,
        help="a DHT node of the swarm to join through (dht.bootstrap_peers; repeatable, replaces the configured list)",
    )
    p.add_argument("--swarm", metavar="NAME", help="the swarm to join (swarm.name)")
    p.add_argument(
        "--insecure", action="store_true",
        help="serve the API without authentication; binds 127.0.0.1 only and logs a warning",
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration file (default: $P2PNN_CONFIG)")
    p.add_argument("--data-dir", metavar="DIR", help="data directory: keys, SQLite file (node.data_dir)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pnn-node", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"p2pnn-node {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        # The summary is both the line in `p2pnn-node --help` and the description of `p2pnn-node NAME --help`.
        return sub.add_parser(name, help=summary, description=summary)

    run = command("run", "run a node; in a swarm the principal chooses its role (alone: every role)")
    _common(run)
    _node_flags(run)
    for role, what in (
        ("principal", "run a node that prefers to lead the swarm (a principal runs no tasks unless alone)"),
        ("an", "run a node that prefers the An role: it dispatches tasks to its Ki"),
        ("ki", "run a node that prefers the Ki role: it runs tasks in its worker processes"),
    ):
        p = command(role, what)
        _common(p)
        _node_flags(p)

    init = command("init", "create the data directory, the node key and the API signing keys (and a swarm secret)")
    _common(init)
    init.add_argument(
        "--swarm-secret", metavar="FILE",
        help="also write a new random swarm join secret to FILE (swarm.secret_file), unless FILE exists; "
             "copy that one file to every member",
    )

    token = command("token", "mint an API token (printed on stdout)")
    _common(token)
    token.add_argument("--role", required=True, choices=("viewer", "operator", "admin"))
    token.add_argument("--sub", required=True, metavar="NAME", help="who the token is for")
    token.add_argument("--ttl", type=int, metavar="SECONDS", help="lifetime (default: auth.token_ttl_seconds)")

    revoke = command("revoke", "revoke an API token in the swarm's store (every member refuses it soon)")
    _common(revoke)
    revoke.add_argument("token", metavar="TOKEN", help="the token (its jti and expiry are read from it)")

    demo = command(
        "demo", "start a throw-away node, train a digits classifier through the REST API, infer, print accuracy",
    )
    demo.add_argument("--epochs", type=int, default=40, help="training epochs (default 40, the train spec's default)")
    demo.add_argument("--model", default="mlp", choices=("mlp", "cnn", "transformer"), help="model (default mlp)")
    demo.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="torch device (default cpu)")
    return parser


def _load_config(args: argparse.Namespace, *, role: str | None = None) -> Config:
    cfg = config_mod.load(args.config)
    if getattr(args, "data_dir", None):
        cfg = cfg.replace("node", data_dir=args.data_dir)
    if role is not None:
        cfg = cfg.replace("node", role=role)
    api: dict[str, Any] = {}
    if getattr(args, "host", None):
        api["host"] = args.host
    if getattr(args, "port", None) is not None:
        if not 0 <= args.port <= 65535:
            raise ConfigError(f"--port: must be between 0 and 65535, got {args.port}")
        api["port"] = args.port
    if getattr(args, "insecure", False):
        api["insecure"] = True
    if api:
        cfg = cfg.replace("api", **api)
    if getattr(args, "slots", None) is not None:
        if not 0 <= args.slots <= 256:
            raise ConfigError(f"--slots: must be between 0 and 256, got {args.slots}")
        cfg = cfg.replace("compute", slots=args.slots)
    if getattr(args, "swarm", None):
        cfg = cfg.replace("swarm", name=args.swarm)
    if getattr(args, "bootstrap", None):
        cfg = cfg.replace("dht", bootstrap_peers=tuple(args.bootstrap))
    config_mod.check_swarm(cfg)
    return cfg


async def _serve_until_signalled(cfg: Config) -> None:
    from p2pnn.node import run_node

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_node, cfg)
            async for signum in signals:
                log.info("node.shutdown", signal=signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def _run_command(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from p2pnn.demo import run_demo

        return trio.run(run_demo, args.epochs, args.model, args.device)
    role = args.command if args.command in ("principal", "an", "ki") else None
    cfg = _load_config(args, role=role)
    logs.configure(cfg.log.level, cfg.log.format)
    if args.command == "init":
        made = identity.init_data_dir(cfg.data_dir)
        ident = identity.load_identity(cfg.data_dir)
        print(f"data dir {cfg.data_dir}: node id {ident.node_id}; created: {', '.join(made) or 'nothing (all present)'}")
        if args.swarm_secret:
            path = Path(args.swarm_secret).expanduser()
            wrote = identity.make_swarm_secret(path)
            print(f"swarm secret {path}: {'created; copy it to every member' if wrote else 'kept (already there)'}; "
                  f"set swarm.secret_file = \"{path}\"")
        return 0
    if args.command == "token":
        from p2pnn.api.auth import Authenticator

        auth = Authenticator.from_config(cfg)
        ttl = args.ttl if args.ttl is not None else cfg.auth.token_ttl_seconds
        if ttl <= 0:
            raise ConfigError(f"--ttl: must be positive, got {ttl}")
        print(auth.mint(args.sub, args.role, ttl))
        return 0
    if args.command == "revoke":
        return trio.run(_revoke, cfg, args.token)
    trio.run(_serve_until_signalled, cfg)
    return 0


async def _revoke(cfg: Config, token: str) -> int:
    """Put a token's jti on the store's deny list until it would expire; the token's signature is not checked
    (a revoked token need not be valid here, and only its id is recorded)."""
    import time

    import jwt

    from p2pnn.node import store_of

    if not cfg.swarm_mode:
        raise ConfigError("swarm.name: revoke needs the swarm's configuration (a lone node's tokens are revoked by "
                          "replacing its API key)")
    try:
        claims = jwt.decode(token.strip(), options={"verify_signature": False})
        jti, exp = str(claims["jti"]), float(claims["exp"])
    except (jwt.InvalidTokenError, KeyError, TypeError, ValueError):
        raise ConfigError("TOKEN: not a token with jti and exp claims") from None
    store = store_of(cfg)
    await store.open()
    try:
        await store.revoke_token(jti, expires_at=exp, now=time.time())
    finally:
        await store.close()
    print(f"revoked {jti} (until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(exp))})")
    return 0


def _single(exc: BaseException) -> BaseException:
    """The one real error inside (nested) exception groups, or the group itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run_command(args)
    except BaseException as raised:  # noqa: BLE001 - re-raised below unless it is one we explain
        exc = _single(raised)
        if isinstance(exc, ConfigError):
            print(f"p2pnn-node: configuration error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        if isinstance(exc, StoreUnreachable):  # checked first: it is also a StoreError
            print(f"p2pnn-node: {exc}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        if isinstance(exc, (identity.IdentityError, StoreError)):
            print(f"p2pnn-node: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        if isinstance(exc, OSError):  # e.g. the API port is taken
            print(f"p2pnn-node: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, KeyboardInterrupt):
            return 130
        raise


if __name__ == "__main__":
    sys.exit(main())
