"""Each datasite's long-term keys, in OpenMined syft-crypto's format, and the pins of other datasites' keys.

One key per datasite, shared with every SyftBox app that uses syft-crypto (0.1.2): an Ed25519 identity key and an
X25519 key-agreement key (the "signed prekey", signed by the identity key), published as a did:web document in
``datasites/<email>/public/did.json`` and kept privately as JWKs in ``<data_dir>/../.syftbox/<8 hex of
sha256("<server_url>::<email>")>/pvt.jwks.json`` (mode 0600 in a 0700 folder, never under ``datasites/``). The layout,
key encodings and signature are syft-crypto's (``syft_crypto/did_utils.py``, ``key_storage.py``,
``x3dh_bootstrap.py``), written here with ``cryptography`` alone: when syft-crypto is installed it uses our keys and
we use its. A did.json whose private keys cannot be found is never overwritten: the datasite stays out of secure
rounds and says so once (its owner decides).

did.json is world-readable by SyftBox's convention. It says that the datasite has an identity key, nothing about
cpu_tracker; every client mirrors every readable file, so a fleet of k datasites puts k did.json files (about 1 KB
each) in every client's mirror, once.

Pinning (trust on first use): the first identity key seen for an email is pinned in the reader's private
``pins.json``; a did.json with another identity key later is refused and said once, never silently accepted (the
owner removes the pin to accept a new key). A prekey is accepted only with a valid signature by the pinned identity
key. The first read of a did.json can be substituted by the relay operator: that is the one point where trust is
assumed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable
from urllib.parse import quote, urlparse

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from shared.atomic import PRIVATE, atomic_write_json, ensure_private_dir, read_capped
from shared.logs import Problems
from shared.paths import SYFT_PUB_FILE, SYFTPERM_FILE, Paths
from shared.permissions import ensure_permissions

DEFAULT_DOMAIN = "syftbox.net"  # syft-crypto's default did:web domain
MAX_DID_BYTES = 1 << 16
IDENTITY_KEY = "identity-key"
PREKEY = "signed-prekey"
DID_CONTEXT = [
    "https://www.w3.org/ns/did/v1",
    "https://w3id.org/security/suites/ed25519-2020/v1",
    "https://w3id.org/security/suites/x25519-2020/v1",
]


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64url(text: str, size: int, what: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{what} is not text")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise ValueError(f"{what} is not base64url") from None
    if len(raw) != size:
        raise ValueError(f"{what} must hold {size} bytes, got {len(raw)}")
    return raw


def did_web_id(email: str, domain: str = DEFAULT_DOMAIN) -> str:
    """syft-crypto's did:web identifier of a datasite: ``did:web:<domain>:<url-quoted email>``."""
    return f"did:web:{domain}:{quote(email, safe='')}"


def domain_of(server_url: str) -> str:
    """The did:web domain syft-crypto uses: the server URL's host (syftbox.net when no server is known)."""
    return (urlparse(server_url).hostname if server_url else None) or DEFAULT_DOMAIN


def verify(identity_public: bytes, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the Ed25519 signature of ``message`` under the raw public key ``identity_public``."""
    try:
        Ed25519PublicKey.from_public_bytes(identity_public).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


@dataclass(frozen=True)
class PublicKeys:
    """A datasite's public keys: the Ed25519 identity key and the X25519 prekey (raw, 32 bytes each)."""

    email: str
    identity: bytes
    prekey: bytes

    @property
    def fingerprint(self) -> str:
        """The identity key's SHA-256, 16 hex digits: what logs and status show."""
        return hashlib.sha256(self.identity).hexdigest()[:16]


@dataclass(frozen=True)
class Identity:
    """This datasite's private keys (raw 32 bytes each). ``repr`` shows the fingerprint only."""

    email: str
    identity_private: bytes = field(repr=False)
    prekey_private: bytes = field(repr=False)

    @cached_property
    def public(self) -> PublicKeys:
        ed = Ed25519PrivateKey.from_private_bytes(self.identity_private).public_key()
        x = X25519PrivateKey.from_private_bytes(self.prekey_private).public_key()
        return PublicKeys(self.email, ed.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw),
                          x.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw))

    def sign(self, message: bytes) -> bytes:
        return Ed25519PrivateKey.from_private_bytes(self.identity_private).sign(message)

    @classmethod
    def generate(cls, email: str) -> "Identity":
        ed, x = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
        return cls(email, ed.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption()),
                   x.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption()))

    def did_document(self, domain: str = DEFAULT_DOMAIN) -> dict:
        """The did:web document exactly as syft-crypto's ``create_x3dh_did_document`` writes it."""
        pub = self.public
        did = did_web_id(self.email, domain)
        spk = {"kty": "OKP", "crv": "X25519", "x": _b64url(pub.prekey), "kid": PREKEY, "use": "enc",
               "signature": _b64url(self.sign(pub.prekey))}
        return {
            "@context": list(DID_CONTEXT),
            "id": did,
            "verificationMethod": [{
                "id": f"{did}#{IDENTITY_KEY}", "type": "Ed25519VerificationKey2020", "controller": did,
                "publicKeyJwk": {"kty": "OKP", "crv": "Ed25519", "x": _b64url(pub.identity), "kid": IDENTITY_KEY,
                                 "use": "sig"},
            }],
            "keyAgreement": [{
                "id": f"{did}#{PREKEY}", "type": "X25519KeyAgreementKey2020", "controller": did, "publicKeyJwk": spk,
            }],
        }

    def private_jwks(self) -> dict:
        """The private keys as syft-crypto stores them (jwcrypto's ``export(as_dict=True)`` of each key)."""
        pub = self.public
        return {
            "identity_key": {"kty": "OKP", "crv": "Ed25519", "x": _b64url(pub.identity),
                             "d": _b64url(self.identity_private)},
            "signed_prekey": {"kty": "OKP", "crv": "X25519", "x": _b64url(pub.prekey),
                              "d": _b64url(self.prekey_private)},
        }

    @classmethod
    def from_private_jwks(cls, email: str, doc) -> "Identity":
        """The keys of a ``pvt.jwks.json``; ValueError naming what is wrong."""
        if not isinstance(doc, dict):
            raise ValueError("it is not a JSON object")
        keys = []
        for name, curve in (("identity_key", "Ed25519"), ("signed_prekey", "X25519")):
            jwk = doc.get(name)
            if not isinstance(jwk, dict) or jwk.get("kty") != "OKP" or jwk.get("crv") != curve:
                raise ValueError(f"{name} is not an OKP {curve} JWK")
            keys.append(_unb64url(jwk.get("d"), 32, f"{name}.d"))
        me = cls(email, *keys)
        pub = me.public
        for name, raw in (("identity_key", pub.identity), ("signed_prekey", pub.prekey)):
            if doc[name].get("x") is not None and _unb64url(doc[name]["x"], 32, f"{name}.x") != raw:
                raise ValueError(f"{name}.x is not the public half of {name}.d")
        return me


def parse_did(raw: bytes, email: str) -> PublicKeys:
    """The keys of ``email``'s did.json, checked as syft-crypto reads them plus: the document names ``email``, the
    keys are 32 bytes, and the prekey carries a valid signature by the identity key. ValueError naming the fault."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("it is not JSON") from None
    if not isinstance(doc, dict):
        raise ValueError("it is not a JSON object")
    did = doc.get("id")
    if not (isinstance(did, str) and did.startswith("did:web:") and did.endswith(":" + quote(email, safe=""))):
        raise ValueError(f"its id {str(did)[:80]!r} is not the did:web of {email}")

    def jwk(section: str, suffix: str, curve: str) -> dict:
        entries = doc.get(section)
        found = None
        if isinstance(entries, list):
            found = next((e for e in entries if isinstance(e, dict) and str(e.get("id", "")).endswith("#" + suffix)),
                         None)
        key = found.get("publicKeyJwk") if found else None
        if not isinstance(key, dict) or key.get("kty") != "OKP" or key.get("crv") != curve:
            raise ValueError(f"it has no {curve} #{suffix} in {section}")
        return key

    ed = jwk("verificationMethod", IDENTITY_KEY, "Ed25519")
    x = jwk("keyAgreement", PREKEY, "X25519")
    identity = _unb64url(ed.get("x"), 32, "the identity key")
    prekey = _unb64url(x.get("x"), 32, "the prekey")
    signature = _unb64url(x.get("signature"), 64, "the prekey's signature")
    if not verify(identity, prekey, signature):
        raise ValueError("its prekey's signature does not verify under its identity key")
    return PublicKeys(email, identity, prekey)


class IdentityUnavailable(RuntimeError):
    """This datasite has no usable keys; the message says why and what the owner can do."""


_LOCK = threading.Lock()  # the member and aggregator roles of one datasite may start at once, in two threads


def load_or_create(paths: Paths) -> Identity:
    """This datasite's keys, made once: load them from syft-crypto's place, create them (and the did.json) when there
    are none, or (re)write the did.json from the keys when it is missing, as syft-crypto does. IdentityUnavailable
    when a did.json exists whose private keys are missing or do not match it (never overwritten: the owner decides),
    or the key file is unreadable."""
    with _LOCK:
        key_path, did_path = paths.private_keys_file, paths.did_file()
        did_raw = read_capped(did_path, MAX_DID_BYTES)
        try:
            text = key_path.read_text("utf-8")
        except FileNotFoundError:
            text = None
        except (OSError, UnicodeDecodeError) as e:
            raise IdentityUnavailable(f"the private keys in {key_path} cannot be read ({e})") from None
        if text is None:
            if did_raw is not None:
                raise IdentityUnavailable(
                    f"{did_path} exists but its private keys are not in {key_path} (another device, or a lost key): "
                    "this datasite stays out of secure rounds. Restore the keys there, or remove did.json to make new "
                    "ones (other datasites that pinned the old key must then remove its pin)")
            me = Identity.generate(paths.email)
            ensure_private_dir(key_path.parent)
            atomic_write_json(key_path, me.private_jwks(), mode=PRIVATE)
        else:
            try:
                me = Identity.from_private_jwks(paths.email, json.loads(text))
            except ValueError as e:
                raise IdentityUnavailable(f"the private keys in {key_path} are not usable ({e})") from None
            if (key_path.stat().st_mode & 0o077) and key_path.stat().st_uid == os.getuid():
                os.chmod(key_path, PRIVATE)
        if did_raw is not None:
            try:
                published = parse_did(did_raw, paths.email)
            except ValueError as e:
                raise IdentityUnavailable(f"{did_path} is not a valid identity document ({e}); remove it to have it "
                                          "written again from the private keys") from None
            if (published.identity, published.prekey) != (me.public.identity, me.public.prekey):
                raise IdentityUnavailable(f"{did_path} does not match the private keys in {key_path}: this datasite "
                                          "stays out of secure rounds until the owner restores the matching keys or "
                                          "removes did.json")
        else:
            folder = did_path.parent
            folder.mkdir(parents=True, exist_ok=True)
            if not (folder / SYFTPERM_FILE).exists() and not (folder / SYFT_PUB_FILE).exists():
                ensure_permissions(folder, paths.email, ["*"])  # the client made none: public, as SyftBox's own
            atomic_write_json(did_path, me.did_document(domain_of(paths.server_url)))
        return me


# ---------------------------------------------------------------------------------------------------
# Other datasites' keys: pinned on first use
# ---------------------------------------------------------------------------------------------------
class PinsBroken(RuntimeError):
    pass


@dataclass
class Pins:
    """The first identity key seen for each email (and its latest prekey signed by it), kept privately (0600)."""

    path: Path
    entries: dict[str, dict[str, str]] = field(default_factory=dict)
    dirty: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, path: Path) -> "Pins":
        try:
            entries = json.loads(Path(path).read_text("utf-8"))
            if not isinstance(entries, dict):
                raise ValueError("not a JSON object")
            return cls(Path(path), entries)
        except FileNotFoundError:
            return cls(Path(path))
        except (OSError, ValueError) as e:  # refuse to guess: trusting anew would accept a substituted key
            raise PinsBroken(f"{path} is unreadable ({e}): secure mode pauses until it is restored or removed (then "
                             "every key is trusted anew on first use)") from e

    def get(self, email: str) -> PublicKeys | None:
        e = self.entries.get(email)
        if not e:
            return None
        return PublicKeys(email, base64.b64decode(e["identity"]), base64.b64decode(e["prekey"]))

    def accept(self, seen: PublicKeys) -> tuple[PublicKeys, str | None]:
        """The keys to use for ``seen.email`` and, when ``seen`` was refused, why. A first key is pinned; the pinned
        identity key with a new prekey (signed by it: ``parse_did`` checked) updates the prekey; another identity
        key is refused and the pinned keys stay in use."""
        with self.lock:
            pinned = self.get(seen.email)
            if pinned is not None and pinned.identity != seen.identity:
                return pinned, (f"the identity key of {seen.email} changed from {pinned.fingerprint} to "
                                f"{seen.fingerprint}: refused, the pinned key stays in use (remove its entry from "
                                f"{self.path} to accept the new key)")
            if pinned != seen:
                self.entries[seen.email] = {"identity": base64.b64encode(seen.identity).decode(),
                                            "prekey": base64.b64encode(seen.prekey).decode()}
                self.dirty = True
            return seen, None

    def save(self) -> None:
        """Write the pins when they changed (durably: a pin is recorded before anything is built on it)."""
        with self.lock:
            if self.dirty:
                atomic_write_json(self.path, self.entries, indent=None, mode=PRIVATE)
                self.dirty = False


_PINS: dict[Path, Pins] = {}


def pins_at(path: Path) -> Pins:
    """One ``Pins`` per file and process (the member and aggregator roles of a datasite share it)."""
    with _LOCK:
        if path not in _PINS:
            _PINS[path] = Pins.load(path)
        return _PINS[path]


@dataclass
class KeyBook:
    """Other datasites' keys as their did.json says and the pins allow. A did.json is parsed again only when its stat
    signature changes; a refused or unreadable one is said once (``problems``) and the pinned keys, if any, stay in
    use. ``read`` opens another datasite's file (the caller's safe reader)."""

    paths: Paths
    pins: Pins
    problems: Problems
    read: Callable[[Path], bytes | None] = lambda p: read_capped(p, MAX_DID_BYTES)
    _seen: dict[str, tuple[tuple[int, int, int] | None, PublicKeys | None]] = field(default_factory=dict)

    def keys_of(self, email: str) -> PublicKeys | None:
        """``email``'s keys to use (pinned on first sight), or None when none was ever seen and accepted."""
        path = self.paths.did_file(email)
        try:
            st = os.stat(path)
            sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            sig = None
        hit = self._seen.get(email)
        if hit is not None and hit[0] == sig:
            return hit[1]
        found = self.pins.get(email)
        raw = self.read(path) if sig is not None else None
        if raw is None:
            if found is None:
                self.problems.report(f"did-{email}", f"no identity document from {email} yet ({path}): waiting",
                                     logging.INFO)
        else:
            try:
                found, problem = self.pins.accept(parse_did(raw, email))
            except ValueError as e:
                problem = f"the identity document of {email} ({path}) is refused: {e}"
            if problem:
                self.problems.report(f"did-{email}", f"secure mode: {problem}")
            else:
                self.problems.clear(f"did-{email}")
        self._seen[email] = (sig, found)
        return found
