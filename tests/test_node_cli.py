"""The `p2pnn-node` command's own surface: --version, a description per subcommand, the swarm secret."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.conftest import PG_URL

SUBCOMMANDS = ("run", "principal", "an", "ki", "init", "token", "revoke", "demo")


def node_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("P2PNN_")}
    return subprocess.run([sys.executable, "-m", "p2pnn.cli", *args], env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=120)


def test_version_and_a_description_for_every_subcommand():
    version = node_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("p2pnn-node 0.")
    for command in SUBCOMMANDS:
        helped = node_cli(command, "--help")
        assert helped.returncode == 0
        description = helped.stdout.split("\n\n")[1].strip()
        assert description and not description.startswith(("-", "options")), (command, helped.stdout)


def test_init_makes_a_swarm_secret_once(tmp_path: Path):
    secret = tmp_path / "etc" / "swarm.secret"
    made = node_cli("init", "--data-dir", str(tmp_path / "data"), "--swarm-secret", str(secret))
    assert made.returncode == 0, made.stderr
    assert "created" in made.stdout and f'swarm.secret_file = "{secret}"' in made.stdout
    first = secret.read_bytes()
    assert len(first.strip()) == 64 and stat.S_IMODE(secret.stat().st_mode) == 0o600
    again = node_cli("init", "--data-dir", str(tmp_path / "data"), "--swarm-secret", str(secret))
    assert again.returncode == 0 and "kept" in again.stdout and secret.read_bytes() == first


def test_a_missing_swarm_secret_names_the_key_and_how_to_make_one(tmp_path: Path):
    missing = tmp_path / "no-such-secret"
    run = node_cli("run", "--data-dir", str(tmp_path / "data"), "--port", "0", env={
        "P2PNN_SWARM__NAME": "lab", "P2PNN_SWARM__SECRET_FILE": str(missing),
        "P2PNN_STORE__BACKEND": "postgres", "P2PNN_STORE__URL": PG_URL, "P2PNN_API__HOST": "127.0.0.1",
    })
    assert run.returncode == 2
    line = run.stderr.strip().splitlines()[-1]  # after the node's own log lines (data directory made)
    assert line.startswith("p2pnn-node: swarm.secret_file: ")
    assert f"p2pnn-node init --swarm-secret {missing}" in line
