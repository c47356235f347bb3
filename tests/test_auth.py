"""API tokens: pinned algorithm, required claims, roles."""

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest

from p2pnn import config, identity
from p2pnn.api.auth import Authenticator, AuthError, Caller, require


@pytest.fixture
def hs256(tmp_path):
    identity.init_data_dir(tmp_path)
    return Authenticator.from_config(config.load(env={}).replace("node", data_dir=str(tmp_path)))


@pytest.fixture
def eddsa(tmp_path):
    identity.init_data_dir(tmp_path)
    cfg = config.load(env={}).replace("node", data_dir=str(tmp_path)).replace("auth", algorithm="EdDSA")
    return Authenticator.from_config(cfg)


def _claims(**over):
    now = int(time.time())
    return {"sub": "mallory", "role": "admin", "iss": "p2pnn", "aud": "p2pnn-api", "exp": now + 60, **over}


@pytest.mark.parametrize("auth_name", ["hs256", "eddsa"])
def test_minted_token_verifies_with_its_role(request, auth_name):
    auth = request.getfixturevalue(auth_name)
    token = auth.mint("alice", "operator", 60)
    assert auth.verify(f"Bearer {token}") == Caller("alice", "operator")


def test_alg_none_is_refused(hs256):
    token = jwt.encode(_claims(), None, algorithm="none")
    with pytest.raises(AuthError) as err:
        hs256.verify(f"Bearer {token}")
    assert err.value.status == 401


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_hs256_token_signed_with_the_eddsa_public_key_is_refused(eddsa, tmp_path):
    # Algorithm confusion: an attacker HMACs the token with the (public) verify key as the secret.
    public_pem = (tmp_path / identity.API_PUBLIC_KEY).read_bytes()
    signing_input = f"{_b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{_b64(json.dumps(_claims()).encode())}"
    sig = _b64(hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest())
    with pytest.raises(AuthError, match="algorithm refused"):
        eddsa.verify(f"Bearer {signing_input}.{sig}")


def test_token_of_another_secret_is_refused(hs256):
    token = jwt.encode(_claims(), "another-secret-that-is-long-enough-32b", algorithm="HS256")
    with pytest.raises(AuthError, match="invalid token"):
        hs256.verify(f"Bearer {token}")


@pytest.mark.parametrize(
    "over, message",
    [
        ({"exp": int(time.time()) - 3600}, "expired"),
        ({"aud": "someone-else"}, "audience"),
        ({"iss": "someone-else"}, "issuer"),
        ({"role": "root"}, "role"),
    ],
)
def test_bad_claims_are_refused(hs256, tmp_path, over, message):
    secret = (tmp_path / identity.API_SECRET).read_bytes().strip()
    token = jwt.encode(_claims(**over), secret, algorithm="HS256")
    with pytest.raises(AuthError, match=message):
        hs256.verify(f"Bearer {token}")


def test_missing_exp_is_refused(hs256, tmp_path):
    secret = (tmp_path / identity.API_SECRET).read_bytes().strip()
    claims = _claims()
    del claims["exp"]
    with pytest.raises(AuthError, match="exp"):
        hs256.verify("Bearer " + jwt.encode(claims, secret, algorithm="HS256"))


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer ", "Bearer not.a.jwt"])
def test_malformed_headers_are_401(hs256, header):
    with pytest.raises(AuthError) as err:
        hs256.verify(header)
    assert err.value.status == 401


def test_roles_are_ordered():
    require(Caller("a", "admin"), "operator")
    require(Caller("a", "operator"), "viewer")
    with pytest.raises(AuthError) as err:
        require(Caller("a", "viewer"), "operator")
    assert err.value.status == 403


def test_node_key_gives_a_160_bit_node_id(tmp_path):
    identity.init_data_dir(tmp_path)
    ident = identity.load_identity(tmp_path)
    assert len(ident.node_id) == 40
    assert ident.node_id == identity.node_id_of(ident.public_key)
    assert (tmp_path / identity.NODE_KEY).stat().st_mode & 0o077 == 0
    # init again keeps the same identity
    assert identity.init_data_dir(tmp_path) == []
    assert identity.load_identity(tmp_path).node_id == ident.node_id


# --- swarm tokens: one key for every member, rotation, deny list ---


def _member(tmp_path, name: str, secret_file, *, algorithm: str = "HS256", generation: int = 0) -> Authenticator:
    data = tmp_path / name
    identity.init_data_dir(data)
    cfg = (config.load(env={}).replace("node", data_dir=str(data)).replace("swarm", name="s", secret_file=str(secret_file))
           .replace("auth", algorithm=algorithm, key_generation=generation))
    return Authenticator.from_config(cfg)


@pytest.mark.parametrize("algorithm", ["HS256", "EdDSA"])
def test_a_swarm_token_minted_by_one_member_is_accepted_by_every_other(tmp_path, algorithm):
    secret = tmp_path / "swarm-secret"
    secret.write_text("s" * 64)
    a, b = _member(tmp_path, "a", secret, algorithm=algorithm), _member(tmp_path, "b", secret, algorithm=algorithm)
    token = a.mint("alice", "operator", 60)
    assert jwt.get_unverified_header(token)["kid"] == "s/0"
    assert b.verify(f"Bearer {token}") == Caller("alice", "operator")
    # Another swarm's secret, or the same swarm after a key rotation, does not accept it.
    other = tmp_path / "other-secret"
    other.write_text("o" * 64)
    with pytest.raises(AuthError, match="invalid token"):
        _member(tmp_path, "c", other, algorithm=algorithm).verify(f"Bearer {token}")
    with pytest.raises(AuthError, match="rotated"):
        _member(tmp_path, "d", secret, algorithm=algorithm, generation=1).verify(f"Bearer {token}")


def test_a_revoked_swarm_token_is_refused_and_a_node_local_token_works_on_its_node_only(tmp_path):
    secret = tmp_path / "swarm-secret"
    secret.write_text("s" * 64)
    a, b = _member(tmp_path, "a", secret), _member(tmp_path, "b", secret)
    token = a.mint("alice", "viewer", 60)
    b.revoke([jwt.decode(token, options={"verify_signature": False})["jti"]])
    with pytest.raises(AuthError, match="revoked"):
        b.verify(f"Bearer {token}")
    assert a.verify(f"Bearer {token}").sub == "alice"  # a has not read the deny list yet
    # A token minted from a node's own data directory (no swarm configuration) is today's: that node only.
    lone = Authenticator.from_config(config.load(env={}).replace("node", data_dir=str(tmp_path / "a")))
    local = lone.mint("bob", "viewer", 60)
    assert "kid" not in jwt.get_unverified_header(local)
    assert a.verify(f"Bearer {local}").sub == "bob"
    with pytest.raises(AuthError, match="invalid token"):
        b.verify(f"Bearer {local}")


def test_a_verified_token_kept_for_reuse_is_still_refused_once_revoked_or_expired(hs256, monkeypatch):
    token = hs256.mint("alice", "operator", 60)
    assert hs256.verify(f"Bearer {token}") == Caller("alice", "operator")
    assert hs256.verify(f"Bearer  {token} ") == Caller("alice", "operator")  # the kept verification
    hs256.revoke([jwt.decode(token, options={"verify_signature": False})["jti"]])
    with pytest.raises(AuthError, match="revoked"):
        hs256.verify(f"Bearer {token}")
    hs256.revoke([])
    assert hs256.verify(f"Bearer {token}").sub == "alice"
    monkeypatch.setattr(hs256, "_leeway", 0)
    short = hs256.mint("bob", "viewer", 1)
    assert hs256.verify(f"Bearer {short}").sub == "bob"
    exp = jwt.decode(short, options={"verify_signature": False})["exp"]
    time.sleep(max(0.0, exp - time.time()) + 0.05)
    with pytest.raises(AuthError, match="expired"):
        hs256.verify(f"Bearer {short}")


def test_the_kept_verifications_are_bounded(hs256, monkeypatch):
    monkeypatch.setattr("p2pnn.api.auth.VERIFIED_CACHE_SIZE", 3)
    tokens = [hs256.mint(f"user{i}", "viewer", 60) for i in range(5)]
    for t in tokens:
        hs256.verify(f"Bearer {t}")
    assert len(hs256._verified) == 3 and tokens[-1] in hs256._verified and tokens[0] not in hs256._verified
