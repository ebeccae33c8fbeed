"""Signing keys, attestations and which keys this node trusts.

An attestation is one key's signed statement "I ran the computation with this cache key and
got this output": Ed25519 over canonical JSON of (format, key, output). A record carries the
attestation of the node that wrote it; more attestations of the same computation (a verifying
re-run, a colleague's node) are kept beside the result cache. What a signature proves, and what
it does not, is in docs/trust.md.

Keys are named `ed25519:` + the 32-byte public key in unpadded base64url: short enough to paste
into a chat, and self-describing. Each data directory has one private key (`keys/signing.key`,
0600, created on first use, never put in IPFS). Signing uses `cryptography`, imported only when
a key is loaded or a signature checked, so that a cache hit from the command line does not pay
for it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from .errors import UsageError
from .files import replace_file

ATTESTATION_FORMAT = "ipfs-execute/attestation/1"
KEY_PREFIX = "ed25519:"
_KEY_ID = re.compile(r"^ed25519:[A-Za-z0-9_-]{43}$")
_SIGNATURE = re.compile(r"^[A-Za-z0-9_-]{86}$")
_CACHE_KEY = re.compile(r"^[0-9a-f]{64}$")
_PRIVATE_PREFIX = "ed25519-private:"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def statement(key: str, output: str) -> bytes:
    """The bytes an attestation signs."""
    material = {"format": ATTESTATION_FORMAT, "key": key, "output": output}
    return json.dumps(material, sort_keys=True, separators=(",", ":")).encode()


def parse_key_id(text: str) -> str:
    """A public key as given by a user (`ed25519:...`), checked."""
    text = text.strip()
    if not _KEY_ID.match(text):
        raise UsageError(
            f"{text!r} is not a public key of this tool: it looks like ed25519: followed by 43 "
            "characters (`ipfs-execute trust list` on the other node shows its key)"
        )
    return text


class Attestation(NamedTuple):
    """`signer` says: the computation with cache key `key` gave `output`."""

    signer: str
    key: str
    output: str
    signature: str

    def valid(self) -> bool:
        """Whether the signature is the signer's over (key, output)."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        if not (_KEY_ID.match(self.signer) and _SIGNATURE.match(self.signature)):
            return False
        try:
            public = Ed25519PublicKey.from_public_bytes(_unb64(self.signer[len(KEY_PREFIX) :]))
            public.verify(_unb64(self.signature), statement(self.key, self.output))
        except (InvalidSignature, ValueError, binascii.Error):
            return False
        return True

    def to_dict(self) -> dict[str, str]:
        return {
            "format": ATTESTATION_FORMAT,
            "signer": self.signer,
            "key": self.key,
            "output": self.output,
            "signature": self.signature,
        }

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, indent=1).encode()

    @classmethod
    def from_dict(cls, data: Any) -> Attestation:
        """Parsed, not yet checked (`valid`); ValueError when it is not an attestation."""
        if not isinstance(data, dict) or data.get("format") != ATTESTATION_FORMAT:
            raise ValueError("not an ipfs-execute attestation")
        fields = {name: data.get(name) for name in ("signer", "key", "output", "signature")}
        if not all(isinstance(value, str) for value in fields.values()):
            raise ValueError("an attestation field is missing or not text")
        if not _CACHE_KEY.match(str(fields["key"])):
            raise ValueError("an attestation names no cache key")
        return cls(**{name: str(value) for name, value in fields.items()})

    @classmethod
    def from_json(cls, data: bytes) -> Attestation:
        try:
            return cls.from_dict(json.loads(data))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"not JSON: {error}") from None

    @property
    def entry_name(self) -> str:
        """Its file name among the attestations of its key: one per signer and output."""
        return hashlib.sha256(f"{self.signer} {self.output}".encode()).hexdigest()[:32]


class SigningKey:
    """This data directory's private key.

    Kept as one line of text, `ed25519-private:` and the 32-byte seed in base64url, rather
    than PEM: loading PEM pulls in the serialization layer of `cryptography` (about 7 ms more
    on every run that writes a record), for nothing another program needs to read.
    """

    def __init__(self, private: Any) -> None:
        self._private = private
        self.public_id = KEY_PREFIX + _b64(private.public_key().public_bytes_raw())

    @classmethod
    def load_or_create(cls, path: Path) -> SigningKey:
        """The key at `path`, made there first (0600, in a 0700 directory) if there is none."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        try:
            text = path.read_text()
        except FileNotFoundError:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            seed = Ed25519PrivateKey.generate().private_bytes_raw()
            # Threads of one process (concurrent runs in a new data directory) make theirs too.
            temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as file:
                file.write(f"{_PRIVATE_PREFIX}{_b64(seed)}\n")
            try:
                os.link(temporary, path)  # never replaces a key another process just made
            except FileExistsError:
                pass
            finally:
                temporary.unlink()
            text = path.read_text()
        if path.stat().st_mode & 0o077:
            raise UsageError(
                f"the signing key {path} can be read by other users: `chmod 600 {path}`, and "
                "make a new key (delete it) if anyone else may have copied it"
            )
        try:
            if not text.startswith(_PRIVATE_PREFIX):
                raise ValueError("no prefix")
            private = Ed25519PrivateKey.from_private_bytes(
                _unb64(text[len(_PRIVATE_PREFIX) :].strip())
            )
        except (ValueError, binascii.Error):
            raise UsageError(
                f"{path} is not a signing key of this tool: move it away to get a new one"
            ) from None
        return cls(private)

    @staticmethod
    def public_id_at(path: Path) -> str:
        """The public key of the key at `path` (made first if there is none), read from the
        `.pub` file beside it: deciding whether a cached result is trusted needs no
        cryptography loaded."""
        public = path.with_suffix(".pub")
        try:
            text = public.read_text().strip()
            if _KEY_ID.match(text):
                return text
        except FileNotFoundError:
            pass
        key_id = SigningKey.load_or_create(path).public_id
        replace_file(public, f"{key_id}\n".encode())
        return key_id

    def attest(self, key: str, output: str) -> Attestation:
        signature = self._private.sign(statement(key, output))
        return Attestation(self.public_id, key, output, _b64(signature))


class TrustedKeys:
    """The keys a data directory trusts besides its own: `trusted-keys.json`, {key: name}."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            raise UsageError(
                f"cannot read the trusted keys in {self.path} ({error}): fix or remove the file"
            ) from None
        if not isinstance(data, dict):
            raise UsageError(f"{self.path} is not a JSON object of key: name; fix or remove it")
        return {str(key): str(name) for key, name in data.items()}

    def add(self, key: str, name: str = "") -> None:
        keys = self.load()
        keys[parse_key_id(key)] = name
        self._save(keys)

    def remove(self, key_or_name: str) -> str:
        """Remove a key given by itself or by its name; returns the key removed."""
        keys = self.load()
        matches = [key for key, name in keys.items() if key_or_name in (key, name)]
        if len(matches) != 1:
            raise UsageError(
                f"{key_or_name!r} names {'no' if not matches else 'more than one'} trusted key: "
                "give the key itself (`ipfs-execute trust list` shows them)"
            )
        del keys[matches[0]]
        self._save(keys)
        return matches[0]

    def _save(self, keys: Mapping[str, str]) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        replace_file(self.path, (json.dumps(dict(sorted(keys.items())), indent=1) + "\n").encode())


class TrustSummary(NamedTuple):
    """What the attestations known for one computation say about one output."""

    output: str
    signers: tuple[str, ...]  # keys that attest this output
    trusted: tuple[str, ...]  # those of them this node trusts
    conflicts: tuple[Attestation, ...]  # valid attestations of the same key, other outputs

    def describe(self) -> str:
        """ "reproduced by 3 keys, 2 trusted" and any conflict, for headers and listings."""
        count = len(self.signers)
        text = (
            f"attested by {count} key{'s' if count != 1 else ''}, {len(self.trusted)} trusted"
            if count != 1
            else f"attested by 1 key ({'trusted' if self.trusted else 'not trusted'})"
        )
        if count > 1:
            text = text.replace("attested by", "reproduced by", 1)
        if self.conflicts:
            others = sorted({attestation.output for attestation in self.conflicts})
            text += f"; CONFLICT: other output{'s' if len(others) > 1 else ''} " + ", ".join(others)
        return text


class TrustPolicy:
    """Which signers count: this node's own key, the trusted ones, or any with `trust_any`."""

    def __init__(
        self, own: str | None, trusted: Iterable[str] = (), *, trust_any: bool = False
    ) -> None:
        self.own = own
        self.trusted = frozenset([*trusted, *([own] if own else [])])
        self.trust_any = trust_any

    def trusts(self, signer: str) -> bool:
        return signer in self.trusted

    def summarize(
        self, output: str, attestations: Iterable[Attestation], *, checked: bool = False
    ) -> TrustSummary:
        """Only valid attestations count; one per signer and output. `checked`: their
        signatures were verified already (records in this node's own index: signed here, or
        verified by `cache import`), so none is verified again."""
        signers: list[str] = []
        conflicts: dict[tuple[str, str], Attestation] = {}
        for attestation in attestations:
            if not checked and not attestation.valid():
                continue
            if attestation.output == output:
                if attestation.signer not in signers:
                    signers.append(attestation.signer)
            else:
                conflicts.setdefault((attestation.signer, attestation.output), attestation)
        return TrustSummary(
            output,
            tuple(signers),
            tuple(signer for signer in signers if self.trusts(signer)),
            tuple(conflicts.values()),
        )
