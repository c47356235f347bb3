"""Configuration: TOML + environment, and errors that name the key."""

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from p2pnn import config
from p2pnn.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "bootstrap" / "default.example.toml"


def test_defaults_need_no_file_and_no_environment():
    cfg = config.load(env={})
    assert cfg.store.backend == "sqlite"
    assert cfg.api.port == 3030
    assert cfg.bus.backend == "local"


def test_example_file_documents_every_key_with_its_default():
    documented = tomllib.loads(EXAMPLE.read_text())
    for section, key, default, _doc in config.describe():
        assert key in documented.get(section, {}), f"{section}.{key} missing from {EXAMPLE.name}"
        if (section, key) != ("node", "data_dir"):  # machine-dependent default
            expected = list(default) if isinstance(default, tuple) else default
            assert documented[section][key] == expected, f"{section}.{key}: example says {documented[section][key]!r}"
    for section, keys in documented.items():
        for key in keys:
            assert (section, key) in {(s, k) for s, k, _, _ in config.describe()}, f"{section}.{key} is not a real key"
    assert config.load(EXAMPLE, env={}).compute == config.load(env={}).compute


def test_environment_overrides_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[api]\nport = 4000\n[compute]\nslots = 3\n')
    cfg = config.load(path, env={"P2PNN_API__PORT": "5000", "P2PNN_COMPUTE__LEASE_SECONDS": "7"})
    assert cfg.api.port == 5000
    assert cfg.compute.slots == 3
    assert cfg.compute.lease_seconds == 7.0


def test_config_file_named_by_environment_is_read(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[log]\nlevel = "debug"\n')
    assert config.load(env={"P2PNN_CONFIG": str(path)}).log.level == "debug"


@pytest.mark.parametrize(
    "toml, env, names",
    [
        ("[api]\nprot = 1\n", {}, "api.prot"),
        ("[nope]\nx = 1\n", {}, "nope"),
        ('[api]\nport = "80"\n', {}, "api.port"),
        ("[api]\nport = 70000\n", {}, "api.port"),
        ('[store]\nbackend = "mysql"\n', {}, "store.backend"),
        ('[store]\nbackend = "postgres"\n', {}, "store.url"),
        ("", {"P2PNN_COMPUTE__SLOTS": "many"}, "compute.slots"),
        ("", {"P2PNN_COMPUTE__NOPE": "1"}, "compute.nope"),
        ("", {"P2PNN_API__INSECURE": "maybe"}, "api.insecure"),
        ("[api\n", {}, "not valid TOML"),
    ],
)
def test_invalid_configuration_names_the_key(tmp_path, toml, env, names):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        config.load(path, env=env)


def test_node_refuses_to_start_on_invalid_configuration(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[compute]\nslots = -4\n')
    proc = subprocess.run(
        [sys.executable, "-m", "p2pnn.cli", "run", "--config", str(path), "--data-dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "p2pnn-node: configuration error: compute.slots: must be between 0 and 256, got -4"
    )


def test_config_records_are_frozen():
    cfg = config.load(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.api.port = 1  # type: ignore[misc]


def test_amqp_url_is_built_from_its_parts_and_a_missing_password_file_names_the_key(tmp_path):
    from p2pnn.metrics import Metrics
    from p2pnn.node import bus_of

    secret = tmp_path / "mq-password"
    secret.write_text("s3cr/t\n")
    cfg = config.load(env={
        "P2PNN_BUS__BACKEND": "amqp", "P2PNN_BUS__VHOST": "swarm/1", "P2PNN_BUS__USER": "p2pnn",
        "P2PNN_BUS__PASSWORD_FILE": str(secret), "P2PNN_BUS__PORT": "5673",
    })
    assert bus_of(cfg, Metrics(), "n").settings.url == "amqp://p2pnn:s3cr%2Ft@127.0.0.1:5673/swarm%2F1"
    missing = cfg.replace("bus", password_file=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="^bus.password_file"):
        bus_of(missing, Metrics(), "n")
