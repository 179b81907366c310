"""Each datasite's identity keys (shared.secure.identity): syft-crypto's did.json and key file, made once, never
overwritten; other datasites' keys pinned on first use."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from shared.secure import identity
from shared.logs import Problems
from shared.paths import Paths

log = logging.getLogger("test.identity")


def _paths(tmp_path, email="m@example.org", server="https://syftbox.net/") -> Paths:
    return Paths(tmp_path / "SyftBox", email, server_url=server)


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_did_json_and_the_key_file_are_syft_cryptos(tmp_path):
    """The document and the private-key file as syft-crypto 0.1.2 writes them (did_utils.create_x3dh_did_document,
    key_storage.save_private_keys): did:web id, JWKs, the prekey's signature by the identity key over its raw bytes,
    the key file in <data_dir>/../.syftbox/<8 hex of sha256("<server_url>::<email>")>/pvt.jwks.json."""
    p = _paths(tmp_path, "a+b@example.org")
    me = identity.load_or_create(p)
    doc = json.loads(p.did_file().read_text())
    did = "did:web:syftbox.net:a%2Bb%40example.org"
    assert doc["id"] == did and doc["@context"][0] == "https://www.w3.org/ns/did/v1"
    vm, ka = doc["verificationMethod"][0], doc["keyAgreement"][0]
    assert vm["id"] == f"{did}#identity-key" and vm["type"] == "Ed25519VerificationKey2020" and vm["controller"] == did
    assert vm["publicKeyJwk"] == {"kty": "OKP", "crv": "Ed25519", "x": vm["publicKeyJwk"]["x"], "kid": "identity-key",
                                  "use": "sig"}
    assert ka["id"] == f"{did}#signed-prekey" and ka["type"] == "X25519KeyAgreementKey2020"
    jwk = ka["publicKeyJwk"]
    assert (jwk["kty"], jwk["crv"], jwk["kid"], jwk["use"]) == ("OKP", "X25519", "signed-prekey", "enc")
    Ed25519PublicKey.from_public_bytes(_unb64url(vm["publicKeyJwk"]["x"])).verify(_unb64url(jwk["signature"]),
                                                                                  _unb64url(jwk["x"]))
    assert "=" not in jwk["signature"] + jwk["x"]  # base64url without padding, as syft-crypto strips it
    partition = hashlib.sha256(b"https://syftbox.net/::a+b@example.org").hexdigest()[:8]
    key_file = tmp_path / ".syftbox" / partition / "pvt.jwks.json"
    assert p.private_keys_file == key_file and (key_file.stat().st_mode & 0o777) == 0o600
    keys = json.loads(key_file.read_text())
    assert set(keys) == {"identity_key", "signed_prekey"}
    assert keys["signed_prekey"]["crv"] == "X25519" and keys["identity_key"]["crv"] == "Ed25519"
    x = X25519PrivateKey.from_private_bytes(_unb64url(keys["signed_prekey"]["d"]))
    assert x.public_key().public_bytes_raw() == _unb64url(jwk["x"]) == me.public.prekey
    assert identity.load_or_create(p) == me  # made once


def test_keys_written_by_syft_crypto_are_used_as_they_are(tmp_path):
    """A datasite bootstrapped by syft-crypto: its key file and did.json (with jwcrypto's extra members) are read, not
    replaced."""
    p = _paths(tmp_path)
    theirs = identity.Identity.generate(p.email)
    p.private_keys_file.parent.mkdir(parents=True)
    keys = theirs.private_jwks()
    keys["identity_key"]["kid"] = "some-thumbprint"
    p.private_keys_file.write_text(json.dumps(keys, indent=2))
    os.chmod(p.private_keys_file, 0o644)
    p.did_file().parent.mkdir(parents=True)
    p.did_file().write_text(json.dumps(theirs.did_document("syftbox.net"), indent=2))
    before = p.did_file().read_bytes()
    assert identity.load_or_create(p) == theirs
    assert p.did_file().read_bytes() == before and (p.private_keys_file.stat().st_mode & 0o777) == 0o600


def test_a_did_json_without_its_private_keys_is_never_overwritten(tmp_path):
    p = _paths(tmp_path)
    other = identity.Identity.generate(p.email)
    p.did_file().parent.mkdir(parents=True)
    p.did_file().write_text(json.dumps(other.did_document()))
    before = p.did_file().read_bytes()
    with pytest.raises(identity.IdentityUnavailable, match="private keys are not in"):
        identity.load_or_create(p)
    assert p.did_file().read_bytes() == before and not p.private_keys_file.exists()
    mine = identity.Identity.generate(p.email)  # keys that do not match the document: refused too
    p.private_keys_file.parent.mkdir(parents=True)
    p.private_keys_file.write_text(json.dumps(mine.private_jwks()))
    with pytest.raises(identity.IdentityUnavailable, match="does not match"):
        identity.load_or_create(p)
    assert p.did_file().read_bytes() == before


def test_a_missing_did_json_is_written_again_from_the_keys(tmp_path):
    p = _paths(tmp_path)
    me = identity.load_or_create(p)
    p.did_file().unlink()
    assert identity.load_or_create(p) == me
    assert identity.parse_did(p.did_file().read_bytes(), p.email).identity == me.public.identity


@pytest.mark.parametrize("damage", ["signature", "prekey", "id", "curve", "not json"])
def test_a_bad_did_json_is_refused(tmp_path, damage):
    me = identity.Identity.generate("m@example.org")
    doc = me.did_document()
    jwk = doc["keyAgreement"][0]["publicKeyJwk"]
    if damage == "signature":
        jwk["signature"] = jwk["signature"][:-4] + "AAAA"
    elif damage == "prekey":
        jwk["x"] = base64.urlsafe_b64encode(identity.Identity.generate("x@y.z").public.prekey).decode().rstrip("=")
    elif damage == "id":
        doc["id"] = "did:web:syftbox.net:other%40example.org"
    elif damage == "curve":
        doc["verificationMethod"][0]["publicKeyJwk"]["crv"] = "X25519"
    raw = b"{" if damage == "not json" else json.dumps(doc).encode()
    with pytest.raises(ValueError):
        identity.parse_did(raw, "m@example.org")


def test_keys_are_pinned_on_first_use_and_a_changed_key_is_refused_once(tmp_path, caplog):
    me = _paths(tmp_path)
    other = Paths(me.data_dir, "o@example.org")
    first = identity.load_or_create(other)
    pins = identity.Pins.load(tmp_path / "pins.json")
    book = identity.KeyBook(me, pins, Problems(log))
    assert book.keys_of("o@example.org") == first.public
    pins.save()
    assert json.loads((tmp_path / "pins.json").read_text())["o@example.org"]["identity"]
    assert (tmp_path / "pins.json").stat().st_mode & 0o777 == 0o600
    swapped = identity.Identity.generate("o@example.org")
    other.did_file().write_text(json.dumps(swapped.did_document()))
    with caplog.at_level(logging.WARNING):
        assert book.keys_of("o@example.org") == first.public  # the pinned key stays in use
        book._seen.clear()
        assert book.keys_of("o@example.org") == first.public
    said = [r for r in caplog.records if "changed from" in r.getMessage()]
    assert len(said) == 1 and "remove its entry" in said[0].getMessage()
    restarted = identity.KeyBook(me, identity.Pins.load(tmp_path / "pins.json"), Problems(log))
    assert restarted.keys_of("o@example.org") == first.public  # the pin survives a restart
    rotated = identity.Identity(first.email, first.identity_private, identity.Identity.generate("x").prekey_private)
    other.did_file().write_text(json.dumps(rotated.did_document()))
    assert restarted.keys_of("o@example.org") == rotated.public  # a new prekey signed by the pinned identity key


def test_an_unreadable_pins_file_pauses_instead_of_trusting_anew(tmp_path):
    (tmp_path / "pins.json").write_text("{not json")
    with pytest.raises(identity.PinsBroken):
        identity.Pins.load(tmp_path / "pins.json")


def test_the_public_folder_gets_a_world_readable_permission_only_when_it_has_none(tmp_path):
    p = _paths(tmp_path)
    identity.load_or_create(p)
    folder = p.did_file().parent
    assert "'*'" in (folder / "syft.pub.yaml").read_text() or "- '*'" in (folder / "syft.pub.yaml").read_text()
    q = _paths(tmp_path, "q@example.org")
    q.did_file().parent.mkdir(parents=True)
    (q.did_file().parent / "syftperm.yaml").write_text("- {path: '**', user: '*', permissions: [read]}\n")
    identity.load_or_create(q)
    assert not (q.did_file().parent / "syft.pub.yaml").exists()
    assert Path(q.did_file().parent / "syftperm.yaml").read_text().startswith("- {path")
