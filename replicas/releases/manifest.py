"""MANIFEST.json: what a model version consists of (DESIGN.md, Model store layout).

``models/{name}/{version}/MANIFEST.json`` lists every file of the version with its size and
sha256, who pushed it and when. It is written LAST on push: a version without a manifest is
incomplete (an interrupted push) and is never used. The sync agent verifies every file's size
and sha256 against it before installing.

Signatures (optional): a push signed with an Ed25519 private key adds
``"signature": {"alg": "ed25519", "key_id": ..., "value": <base64>}`` to the manifest. The
signed bytes are the manifest document without its "signature" member, as canonical JSON
(sorted keys, no spaces), so every field (files and their sha256, name, version, who, when)
is covered and the files are covered through their checksums. A site configured with the
public key (``[signing] public_key_file``) installs only versions whose manifest verifies:
unsigned, signed by another key, or altered after signing are refused, with that reason in the
site status. Keys are PEM (``openssl genpkey -algorithm ed25519``, ``openssl pkey -pubout``) or
``python -m replicas.releases.manifest keygen PREFIX``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from core.names import model_name_problem, version_problem
from replicas.store.base import NotFound, ObjectStore

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = 1
HASH_CHUNK_BYTES = 1024 * 1024
MODELS_PREFIX = "models/"

class ManifestError(ValueError):
    """A manifest that cannot be read or does not match the files."""


def check_model_name(name: str) -> str:
    """`name` when it is safe as a path component and store key (core.names: one rule
    set for the gateway, the store and the sync agent); ValueError naming the problem otherwise.
    (The regex used here before ended in '$', which also matched before a trailing newline.)"""
    problem = model_name_problem(name)
    if problem:
        raise ValueError(problem)
    return name


def check_version(version: str | int) -> str:
    v = str(version) if isinstance(version, int) and not isinstance(version, bool) else version
    problem = version_problem(v)
    if problem:
        raise ValueError(f"{problem} (a Triton version directory)")
    return v  # type: ignore[return-value]


def version_prefix(name: str, version: str) -> str:
    return f"{MODELS_PREFIX}{name}/{version}/"


def manifest_key(name: str, version: str) -> str:
    return version_prefix(name, version) + MANIFEST_NAME


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the version directory, '/'-separated
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    files: list[FileEntry]
    who: str
    when: str  # ISO 8601 UTC
    time_s: float = field(default_factory=time.time)
    signature: dict | None = None  # {"alg": "ed25519", "key_id": ..., "value": base64}; None: unsigned
    # What the signature covers, as read (empty for a manifest built here: computed from the fields)
    signed_bytes: bytes = field(default=b"", repr=False, compare=False)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry | None:
        return next((f for f in self.files if f.path == path), None)

    def _doc(self) -> dict:
        return {"format": MANIFEST_FORMAT, "name": self.name, "version": self.version,
                "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
                "total_bytes": self.total_bytes, "who": self.who, "when": self.when, "time_s": self.time_s}

    def payload(self) -> bytes:
        """The bytes a signature covers."""
        return self.signed_bytes or canonical_json(self._doc())

    def to_bytes(self) -> bytes:
        doc = self._doc()
        if self.signature is not None:
            doc["signature"] = self.signature
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2)

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = "MANIFEST.json") -> Manifest:
        try:
            doc = orjson.loads(data)
            files = []
            for f in doc["files"]:
                path = str(f["path"])
                parts = path.split("/")
                if path.startswith("/") or any(p in ("", ".", "..") for p in parts) or path == MANIFEST_NAME:
                    raise ManifestError(f"{where}: unsafe file path {path!r}")
                files.append(FileEntry(path, int(f["size"]), str(f["sha256"])))
            signature = doc.pop("signature", None)
            if signature is not None and not isinstance(signature, dict):
                raise ManifestError(f"{where}: 'signature' must be an object")
            return cls(name=str(doc["name"]), version=str(doc["version"]), files=files,
                       who=str(doc.get("who", "")), when=str(doc.get("when", "")),
                       time_s=float(doc.get("time_s", 0.0)), signature=signature,
                       signed_bytes=canonical_json(doc))  # every member as read, unknown ones too
        except ManifestError:
            raise
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(f"{where}: not a valid manifest: {exc}") from None


def canonical_json(doc: dict) -> bytes:
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)


# ---------------------------------------------------------------- signatures (Ed25519)

SIGNATURE_ALG = "ed25519"


class SigningKeyError(ValueError):
    """A signing or verification key file that cannot be used; the message names the file."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short fingerprint of a public key (sha256 of its raw 32 bytes, 16 hex characters)."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()[:16]


def _read_key_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise SigningKeyError(f"cannot read {what} {path!r}: {exc.strerror}") from None


def load_private_key(path: str) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file (PKCS#8, unencrypted)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data = _read_key_file(path, "signing key")
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"signing key {path!r} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"signing key {path!r} is a {type(key).__name__}, not an Ed25519 key")
    return key


def load_public_key(path: str) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (SubjectPublicKeyInfo)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    data = _read_key_file(path, "manifest public key")
    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"manifest public key {path!r} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"manifest public key {path!r} is a {type(key).__name__}, not an Ed25519 key")
    return key


def sign_manifest(manifest: Manifest, private_key: Ed25519PrivateKey) -> Manifest:
    """The manifest with an Ed25519 signature over its payload."""
    from dataclasses import replace

    unsigned = replace(manifest, signature=None, signed_bytes=b"")
    value = private_key.sign(unsigned.payload())
    return replace(unsigned, signature={"alg": SIGNATURE_ALG, "key_id": key_id(private_key.public_key()),
                                        "value": base64.b64encode(value).decode()})


def signature_problem(manifest: Manifest, public_key: Ed25519PublicKey) -> str:
    """Why the manifest is not signed by `public_key` ("" when it is): operator-readable."""
    from cryptography.exceptions import InvalidSignature

    want = key_id(public_key)
    sig = manifest.signature
    if sig is None:
        return f"unsigned manifest: this site installs only versions signed by key {want}"
    if sig.get("alg") != SIGNATURE_ALG:
        return f"manifest signature algorithm {sig.get('alg')!r} is not {SIGNATURE_ALG!r}"
    try:
        value = base64.b64decode(str(sig.get("value", "")), validate=True)
    except (binascii.Error, ValueError):
        return "manifest signature is not valid base64"
    try:
        public_key.verify(value, manifest.payload())
    except InvalidSignature:
        got = sig.get("key_id")
        if got and got != want:
            return f"manifest signed by key {got}, not by the trusted key {want}"
        return f"bad manifest signature for key {want}: the manifest was altered after signing"
    return ""


def generate_key_pair(prefix: str) -> tuple[str, str]:
    """Write PREFIX.key (private, mode 0600) and PREFIX.pub (public), PEM; returns both paths."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    key = Ed25519PrivateKey.generate()
    priv, pub = f"{prefix}.key", f"{prefix}.pub"
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    with open(pub, "wb") as f:
        f.write(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _describe(files: dict[str, Path]) -> list[FileEntry]:
    return [FileEntry(rel, p.stat().st_size, sha256_file(p)) for rel, p in sorted(files.items())]


async def build_manifest(name: str, version: str, files: dict[str, Path], *, who: str) -> Manifest:
    """The manifest of local files (relative path -> local file); hashing runs in a thread."""
    entries = await asyncio.to_thread(_describe, files)
    return Manifest(name=name, version=version, files=entries, who=who, when=now_iso())


def verify_file(path: str | Path, entry: FileEntry) -> str | None:
    """None when the file matches its manifest entry; otherwise the reason it does not."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        return f"{entry.path}: missing"
    if size != entry.size:
        return f"{entry.path}: size {size} bytes, manifest says {entry.size}"
    digest = sha256_file(p)
    if digest != entry.sha256:
        return f"{entry.path}: sha256 {digest[:16]}... does not match manifest {entry.sha256[:16]}..."
    return None


def verify_dir(directory: str | Path, manifest: Manifest) -> list[str]:
    """Every problem found checking ``directory`` against ``manifest`` (empty: all good)."""
    problems = [p for f in manifest.files if (p := verify_file(Path(directory) / f.path, f))]
    return problems


async def verify_in_store(store: ObjectStore, manifest: Manifest) -> list[str]:
    """Every problem found checking the version's files IN THE STORE against its manifest
    (size and sha256, each file streamed: nothing is downloaded to disk); empty: all good.
    What ``geogate models promote|canary`` and the admin API check before changing a release,
    so a corrupt version is refused where the operator is, not later by every site."""
    problems = []
    prefix = version_prefix(manifest.name, manifest.version)
    for entry in manifest.files:
        try:
            got = await store.digest(prefix + entry.path)
        except NotFound:
            problems.append(f"{entry.path}: missing in the store")
            continue
        if got.size != entry.size:
            problems.append(f"{entry.path}: size {got.size} bytes, manifest says {entry.size}")
        elif got.sha256 != entry.sha256:
            problems.append(f"{entry.path}: sha256 {got.sha256[:16]}... does not match manifest "
                            f"{entry.sha256[:16]}...")
    return problems


async def read_manifest(store: ObjectStore, name: str, version: str) -> Manifest | None:
    """The version's manifest, or None when the version is absent or incomplete."""
    try:
        got = await store.get(manifest_key(name, version))
    except NotFound:
        return None
    return Manifest.from_bytes(got.data, where=f"{store.url}/{manifest_key(name, version)}")


@dataclass
class StoredVersion:
    name: str
    version: str
    complete: bool  # has MANIFEST.json
    files: int
    total_bytes: int


async def list_stored_versions(store: ObjectStore, name: str | None = None) -> dict[str, list[StoredVersion]]:
    """Model name -> its versions in the store (numeric order), complete or not."""
    prefix = MODELS_PREFIX + (f"{name}/" if name else "")
    found: dict[tuple[str, str], StoredVersion] = {}
    for obj in await store.list(prefix):
        parts = obj.key[len(MODELS_PREFIX):].split("/", 2)
        if len(parts) < 3 or not parts[1].isdigit():
            continue
        sv = found.setdefault((parts[0], parts[1]), StoredVersion(parts[0], parts[1], False, 0, 0))
        if parts[2] == MANIFEST_NAME:
            sv.complete = True
        else:
            sv.files += 1
            sv.total_bytes += obj.size
    out: dict[str, list[StoredVersion]] = {}
    for (model, _), sv in sorted(found.items(), key=lambda kv: (kv[0][0], int(kv[0][1]))):
        out.setdefault(model, []).append(sv)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replicas.releases.manifest", description="manifest signing keys")
    sub = parser.add_subparsers(dest="command", required=True)
    kg = sub.add_parser("keygen", help="write PREFIX.key (keep it secret) and PREFIX.pub (give it to sites)")
    kg.add_argument("prefix")
    args = parser.parse_args(argv)
    try:
        priv, pub = generate_key_pair(args.prefix)
    except FileExistsError:
        print(f"{args.prefix}.key exists: not overwritten", file=sys.stderr)
        return 1
    print(f"private key {priv} (for `geogate models push --sign-key`), public key {pub} "
          f"([signing] public_key_file), key id {key_id(load_public_key(pub))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
