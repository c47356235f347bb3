"""Swarm building blocks without processes: envelopes, records, peer-message checks, election, role policy, config."""

from __future__ import annotations

import json

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pnn import config
from p2pnn.config import ConfigError, SwarmConfig
from p2pnn.control.election import Election, rank
from p2pnn.control.links import PeerLinks, Refused
from p2pnn.control.policy import Candidate, assign_roles
from p2pnn.credential import EnvelopeError, SwarmCredential, canonical, open_envelope, seal
from p2pnn.identity import Identity, node_id_of
from p2pnn.membership.dht import resolve
from p2pnn.membership.records import NodeRecord, RecordError, dht_digest, read_record, record_key, sign_record
from p2pnn.store import Assignment, open_store

CRED = SwarmCredential("s", b"k" * 32)
NOW = 1_700_000_000.0


def ident() -> Identity:
    key = Ed25519PrivateKey.generate()
    return Identity(node_id_of(key.public_key()), key)


def record(who: Identity, *, ts: float = NOW, ttl: float = 15.0, **changes) -> NodeRecord:
    fields = dict(
        node_id=who.node_id, dht=("127.0.0.1", 8468), peer="ws://127.0.0.1:8469", api="http://127.0.0.1:3030",
        capabilities={"cpu_cores": 2, "gpus": []}, prefers="auto", priority=0, roles=("ki",), an_id=None,
        load={"slots": 2, "free_slots": 2}, term=3, timestamp=ts, expires_at=ts + ttl,
    )
    fields.update(changes)
    return NodeRecord(**fields)


# --- envelopes and records ---


def test_envelope_round_trip_and_every_kind_of_forgery():
    me = ident()
    text = seal({"x": 1}, me, CRED)
    assert open_envelope(text, CRED)["x"] == 1
    with pytest.raises(EnvelopeError, match="HMAC"):
        open_envelope(text, SwarmCredential("s", b"o" * 32))
    with pytest.raises(EnvelopeError, match="another swarm"):
        open_envelope(seal({"x": 1}, me, SwarmCredential("t", CRED.secret)), CRED)
    tampered = json.loads(text)
    tampered["body"]["x"] = 2
    tampered["mac"] = CRED.mac(canonical(tampered["body"]))
    with pytest.raises(EnvelopeError, match="bad signature"):
        open_envelope(json.dumps(tampered), CRED)
    tampered["body"]["id"] = ident().node_id
    tampered["mac"] = CRED.mac(canonical(tampered["body"]))
    with pytest.raises(EnvelopeError, match="hash of its public key"):
        open_envelope(json.dumps(tampered), CRED)
    for junk in ("", "{}", "[1]", '{"body": 1, "sig": "", "mac": ""}'):
        with pytest.raises(EnvelopeError, match="not a signed envelope"):
            open_envelope(junk, CRED)


def test_a_record_is_read_back_only_while_fresh_and_under_its_own_key():
    me = ident()
    text = sign_record(record(me), me, CRED)
    key = dht_digest(record_key("s", me.node_id))
    got = read_record(text, CRED, now=NOW + 1, key_digest=key)
    assert got == record(me) and got.public_key
    with pytest.raises(RecordError, match="expired"):
        read_record(text, CRED, now=NOW + 16)
    with pytest.raises(RecordError, match="future"):
        read_record(sign_record(record(me, ts=NOW + 3600), me, CRED), CRED, now=NOW)
    with pytest.raises(RecordError, match="another node's key"):
        read_record(text, CRED, now=NOW, key_digest=dht_digest(record_key("s", ident().node_id)))
    with pytest.raises(RecordError, match="too long"):
        read_record(sign_record(record(me, ttl=10 * 86400), me, CRED), CRED, now=NOW)
    assert len(text) < 7000  # fits a kademlia RPC


def test_bootstrap_names_become_ip_addresses():
    assert resolve(["localhost:8468", "127.0.0.1:9"]) == [("127.0.0.1", 8468), ("127.0.0.1", 9)]


# --- peer messages ---


def links_for(me: Identity, members: dict[str, NodeRecord], clock) -> PeerLinks:
    async def handler(body):
        return None

    return PeerLinks(ident=me, cred=CRED, member=members.get, handler=handler, term=lambda: 5,
                     replay_window=10.0, connect_timeout=1.0, clock=clock)


def test_peer_messages_are_refused_when_stale_replayed_or_from_a_non_member():
    a, b, stranger = ident(), ident(), ident()
    now = [NOW]
    members = {a.node_id: read_record(sign_record(record(a), a, CRED), CRED, now=NOW),
               b.node_id: read_record(sign_record(record(b), b, CRED), CRED, now=NOW)}
    sender, receiver = links_for(a, members, lambda: now[0]), links_for(b, members, lambda: now[0])
    msg = sender.seal("ping")
    assert receiver.verify(msg)["type"] == "ping" and receiver.verify(sender.seal("ping"))["term"] == 5
    with pytest.raises(Refused, match="replayed"):
        receiver.verify(msg)
    old = sender.seal("ping")
    now[0] += 11
    with pytest.raises(Refused, match="stale"):
        receiver.verify(old)
    with pytest.raises(Refused, match="not a member"):
        receiver.verify(links_for(stranger, members, lambda: now[0]).seal("ping"))
    # A member record under a's id that carries another key: a's messages no longer match it.
    members[a.node_id] = read_record(sign_record(record(stranger), stranger, CRED), CRED, now=NOW)
    with pytest.raises(Refused, match="not a member"):
        receiver.verify(sender.seal("ping"))


# --- election ---


class _NoLinks:
    async def request(self, *args, **kwargs):
        return None


async def test_terms_only_grow_and_older_terms_are_ignored(tmp_path):
    store = open_store("sqlite", sqlite_path=tmp_path / "s.sqlite3")
    await store.open()
    me, low, high = ident(), ident(), ident()
    ids = sorted([me.node_id, low.node_id, high.node_id])
    me, low, high = (next(i for i in (me, low, high) if i.node_id == x) for x in ids[1:2] + ids[:1] + ids[2:])
    followed = []
    election = Election(
        me=me.node_id, my_rank=rank(0, "auto", me.node_id), swarm="s", store=store,
        config=SwarmConfig(), links=_NoLinks(), peers=lambda: [], lead=None, follow=followed.append,  # type: ignore[arg-type]
        stepped_down=lambda: None,
    )
    rec_low, rec_high = record(low), record(high)
    assert await election.on_message({"type": "coordinator", "term": 4, "id": high.node_id}, rec_high) is None
    assert (election.principal, election.term) == (high.node_id, 4) and len(followed) == 1
    assert await election.on_message({"type": "coordinator", "term": 3, "id": low.node_id}, rec_low) == {"type": "stale"}
    assert election.principal == high.node_id and len(followed) == 1
    # A lower-ranked node asking for an election gets ALIVE; a higher-ranked one gets nothing.
    assert await election.on_message({"type": "election", "term": 4, "id": low.node_id}, rec_low) == {"type": "alive"}
    assert await election.on_message({"type": "election", "term": 4, "id": high.node_id}, rec_high) is None
    # Once the principal falls silent, with no answer from anyone, it takes the lease: the store grants
    # term 1 (terms come from the store).
    election.last_heard -= election.config.election_timeout_seconds
    await election._elect()
    assert election.fence is not None and election.leading and election.term == 1
    await store.close()


def test_rank_orders_priority_then_preference_then_id():
    assert rank(1, "auto", "00") > rank(0, "principal", "ff") > rank(0, "auto", "ff") > rank(0, "auto", "00")
    # A node started as ki or an leads only when no node on auto (or started as principal) is alive.
    assert rank(0, "auto", "00") > rank(0, "ki", "ff") and rank(0, "auto", "00") > rank(0, "an", "ff")


# --- role policy ---


def c(node_id: str, prefers: str = "auto", gpu: bool = False) -> Candidate:
    return Candidate(node_id, prefers, gpu)


def test_alone_the_principal_holds_every_role_and_with_one_other_that_one_dispatches_to_itself():
    assert assign_roles("p", [c("p")], ki_per_an=4)["p"].roles == ("an", "ki", "principal")
    two = assign_roles("p", [c("p"), c("a")], ki_per_an=4)
    assert two == {"p": Assignment(("principal",), None), "a": Assignment(("an", "ki"), "a")}


def test_about_one_an_per_n_ki_gpu_nodes_stay_ki_preferences_hold():
    members = [c("p")] + [c(f"n{i}") for i in range(9)] + [c("g", gpu=True), c("w", prefers="an"), c("k", prefers="ki")]
    roles = assign_roles("p", members, ki_per_an=4)
    ans = sorted(n for n, a in roles.items() if a.roles == ("an",))
    kis = [n for n, a in roles.items() if a.roles == ("ki",)]
    assert len(ans) == 3 and len(kis) == 9  # 12 others, one An per 4 Ki
    assert "w" in ans and "g" in kis and "k" in kis
    per_an = {an: sum(1 for k in kis if roles[k].an_id == an) for an in ans}
    assert set(per_an.values()) == {3}


def test_reassignment_keeps_what_still_fits():
    members = [c("p")] + [c(f"n{i}") for i in range(6)]
    first = assign_roles("p", members, ki_per_an=2)
    kis = sorted(n for n, a in first.items() if a.roles == ("ki",))
    second = assign_roles("p", [m for m in members if m.node_id != kis[0]], ki_per_an=2, previous=first)
    for n, a in second.items():
        if n in first and first[n].roles == a.roles == ("ki",) and first[n].an_id in second:
            assert a.an_id == first[n].an_id


# --- configuration ---


@pytest.mark.parametrize(
    "env, names",
    [
        ({"P2PNN_SWARM__NAME": "s"}, "swarm.name: swarm mode needs a shared store"),
        ({"P2PNN_SWARM__NAME": "s", "P2PNN_STORE__BACKEND": "postgres", "P2PNN_STORE__URL": "postgresql://x"},
         "swarm.secret_file"),
        ({"P2PNN_DHT__BOOTSTRAP_PEERS": "127.0.0.2:8468"}, "dht.bootstrap_peers: joining a swarm needs swarm.name"),
        ({"P2PNN_DHT__BOOTSTRAP_PEERS": "nohost"}, "dht.bootstrap_peers: expected HOST:PORT"),
        ({"P2PNN_SWARM__HEARTBEAT_SECONDS": "5"}, "swarm.heartbeat_seconds"),
        ({"P2PNN_SWARM__PREEMPT": "perhaps"}, "swarm.preempt"),
        ({"P2PNN_DHT__PORT": "-1"}, "dht.port"),
        ({"P2PNN_PEER__REPLAY_WINDOW_SECONDS": "0"}, "peer.replay_window_seconds"),
    ],
)
def test_invalid_swarm_configuration_names_the_key(env, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        config.load(env=env)


def test_bootstrap_peers_come_from_toml_arrays_and_comma_separated_environment(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[swarm]\nname = "s"\nsecret_file = "/x"\n[store]\nbackend = "postgres"\nurl = "postgresql://x"\n'
                    '[dht]\nbootstrap_peers = ["127.0.0.2:8468", "127.0.0.3:8468"]\n')
    assert config.load(path, env={}).dht.bootstrap_peers == ("127.0.0.2:8468", "127.0.0.3:8468")
    env = {"P2PNN_DHT__BOOTSTRAP_PEERS": "a:1, b:2"}
    assert config.load(path, env=env).dht.bootstrap_peers == ("a:1", "b:2")
    with pytest.raises(ConfigError, match="dht.bootstrap_peers: expected a list"):
        path.write_text('[dht]\nbootstrap_peers = "a:1"\n')
        config.load(path, env={})


def test_the_single_node_default_has_no_swarm():
    cfg = config.load(env={})
    assert not cfg.swarm_mode and cfg.dht.bootstrap_peers == ()


async def test_nothing_of_the_daemon_imports_torch():
    import subprocess
    import sys

    code = "import p2pnn.node, p2pnn.control.swarm, sys; print('torch' in sys.modules)"
    out = await trio.to_thread.run_sync(lambda: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True))
    assert out.stdout.strip() == "False"


def test_example_peer_file_is_a_valid_configuration(tmp_path):
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "bootstrap" / "peers.example.toml"
    cfg = config.load(example, env={})
    assert cfg.swarm_mode and len(cfg.dht.bootstrap_peers) == 3 and cfg.store.backend == "postgres"
    unit = (example.parent / "p2pnn-node.service").read_text()
    for line in ("Restart=on-failure", "User=p2pnn", "StateDirectory=p2pnn", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "PrivateTmp=yes", "EnvironmentFile=-/etc/p2pnn/p2pnn.env"):
        assert line in unit.splitlines()


def test_dht_storage_never_lets_an_older_signed_record_replace_a_newer_one(tmp_path):
    from p2pnn.config import DhtConfig
    from p2pnn.membership.view import MemberView

    me, other = ident(), ident()
    clock = [NOW]
    view = MemberView(ident=me, cred=CRED, config=DhtConfig(), bootstrap=[], make_record=None,  # type: ignore[arg-type]
                      clock=lambda: clock[0])
    storage, key = view.dht.server.storage, record_key(CRED.name, other.node_id)
    dkey = dht_digest(key)
    old = sign_record(record(other, ts=NOW - 10, ttl=3600, load={"slots": 1}), other, CRED)  # claims a longer life
    new = sign_record(record(other, ts=NOW - 5, ttl=15), other, CRED)
    storage[dkey] = new
    storage[dkey] = old
    assert view.dht.local(key) == new
    clock[0] = NOW + 20  # the newer copy has expired here; the older one, still "valid", must not come back
    storage[dkey] = old
    assert view.dht.local(key) != old
    newest = sign_record(record(other, ts=NOW + 19, ttl=15), other, CRED)
    storage[dkey] = newest
    assert view.dht.local(key) == newest
    assert view.dropped == 0
