"""CID and IPFS path syntax: parsing and checking, no I/O.

Kept apart from `store` so that front ends can refuse a malformed CID or path (before any
daemon contact) without importing the HTTP client.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import NamedTuple

from .errors import InvalidPathError, UsageError

# Well-known CIDs under the import settings the store sends (CIDv1, raw leaves, sha2-256):
# they need no round trip to the daemon.
EMPTY_FILE_CID = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"  # raw, 0 bytes
EMPTY_DIRECTORY_CID = "bafybeiczsscdsbs7ffqz55asqdf3smv6klcw3gofszvwlyarci47bgf354"

_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_CIDV0 = re.compile(rf"^Qm[{_BASE58}]{{44}}$")
_CIDV1_BASE32 = re.compile(r"^b[a-z2-7]{20,}$")
_CIDV1_OTHER = re.compile(rf"^(z[{_BASE58}]{{20,}}|k[0-9a-z]{{20,}}|f[0-9a-f]{{20,}})$")
_IPNS_NAME = re.compile(r"^[A-Za-z0-9.\-_]+$")


def raw_leaf_cid(data: bytes) -> str:
    """The CID `add` gives `data` when it fits in one chunk: a raw block, no round trip needed.

    With the import settings above (CIDv1, raw leaves, 1 MiB chunks, sha2-256) a file of one
    chunk is a single raw block whose CID is its multihash in base32.
    """
    if len(data) > 1024 * 1024:
        raise ValueError("only a single-chunk file has a raw-leaf CID")
    digest = hashlib.sha256(data).digest()
    binary = bytes([0x01, 0x55, 0x12, 0x20]) + digest  # CIDv1, raw codec, sha2-256, 32 bytes
    return "b" + base64.b32encode(binary).decode().lower().rstrip("=")


def is_cid(text: str) -> bool:
    """Syntax check of a CID (v0 base58, or v1 in base32/base58/base36/base16)."""
    if _CIDV0.match(text):
        return True
    if _CIDV1_BASE32.match(text):
        padded = text[1:].upper() + "=" * (-len(text[1:]) % 8)
        try:
            raw = base64.b32decode(padded)
        except ValueError:
            return False
        return len(raw) > 4 and raw[0] == 0x01  # CID version 1
    return bool(_CIDV1_OTHER.match(text))


# Multicodec codes (github.com/multiformats/multicodec, table.csv) a user is likely to meet.
_CODEC_NAMES = {
    0x55: "raw",
    0x70: "dag-pb",
    0x71: "dag-cbor",
    0x72: "libp2p-key",
    0x0129: "dag-json",
    0x0200: "json",
    0x51: "cbor",
}


def _varint(data: bytes, start: int) -> tuple[int, int]:
    """An unsigned LEB128 varint at `start`: (value, index after it)."""
    value = shift = 0
    for index in range(start, min(len(data), start + 9)):
        value |= (data[index] & 0x7F) << shift
        if not data[index] & 0x80:
            return value, index + 1
        shift += 7
    raise ValueError("truncated varint")


def _base_decode(text: str, alphabet: str) -> bytes:
    number = 0
    for char in text:
        number = number * len(alphabet) + alphabet.index(char)
    return number.to_bytes((number.bit_length() + 7) // 8, "big")


def cid_codec(cid: str) -> str | None:
    """The codec of a CID: "dag-pb" (UnixFS files and directories), "raw" (a file of one block),
    "dag-cbor", "dag-json", ... or "codec 0x..." for others; None if `cid` is not a CID."""
    if not is_cid(cid):
        return None
    if _CIDV0.match(cid):
        return "dag-pb"
    try:
        body = cid[1:]
        if cid[0] == "b":
            binary = base64.b32decode(body.upper() + "=" * (-len(body) % 8))
        elif cid[0] == "f":
            binary = bytes.fromhex(body)
        elif cid[0] == "z":
            binary = _base_decode(body, _BASE58)
        else:  # "k": base36
            binary = _base_decode(body, "0123456789abcdefghijklmnopqrstuvwxyz")
        version, after = _varint(binary, 0)
        code, _ = _varint(binary, after)
    except ValueError:
        return None
    if version != 1:
        return None
    return _CODEC_NAMES.get(code, f"codec {code:#x}")


def check_codecs(rootfs_cid: str, input_cid: str) -> None:
    """Refuse, from the CIDs alone, a rootfs or input that cannot be UnixFS of the right kind.

    Only dag-pb nodes are UnixFS files and directories; a raw block is always a file. Checked
    before anything is fetched, composed or staged.
    """
    made_with = "add it with `ipfs-execute add` or `ipfs add`, not `ipfs dag put`"
    rootfs_codec = cid_codec(rootfs_cid)
    if rootfs_codec not in ("dag-pb", "raw", None):
        raise UsageError(
            f"rootfs {rootfs_cid} is a {rootfs_codec} node, not a file or directory "
            f"(UnixFS): give a .tar.gz/.tar.zst/.tar file or a directory; {made_with}"
        )
    input_codec = cid_codec(input_cid)
    if input_codec == "raw":
        raise UsageError(
            f"input {input_cid} is a raw block, i.e. a file, not a directory: put it in one, "
            f"e.g. `ipfs-mkdir data.bin {input_cid}`"
        )
    if input_codec not in ("dag-pb", None):
        raise UsageError(
            f"input {input_cid} is a {input_codec} node, not a directory (UnixFS): give a "
            f"directory; {made_with}"
        )


def cid_base32(cid: str) -> str:
    """The same CID as CIDv1 in base32 (`bafy...`): the form a subdomain gateway needs (a
    host name is case-insensitive, so base58 and CIDv0 cannot be one). `cid` if not a CID."""
    if not is_cid(cid) or cid[0] == "b":
        return cid
    try:
        if _CIDV0.match(cid):
            binary = bytes([0x01, 0x70]) + _base_decode(cid, _BASE58)  # v0 is dag-pb
        elif cid[0] == "f":
            binary = bytes.fromhex(cid[1:])
        elif cid[0] == "z":
            binary = _base_decode(cid[1:], _BASE58)
        else:  # "k": base36
            binary = _base_decode(cid[1:], "0123456789abcdefghijklmnopqrstuvwxyz")
    except ValueError:
        return cid
    return "b" + base64.b32encode(binary).decode("ascii").lower().rstrip("=")


class IpfsPath(NamedTuple):
    """A parsed user path: `CID`, `CID/sub`, `/ipfs/CID/sub` or `/ipns/NAME/sub`."""

    namespace: str  # "ipfs" or "ipns"
    root: str  # CID or IPNS name
    sub: str  # "" or "a/b"

    @classmethod
    def parse(cls, text: str) -> IpfsPath:
        original = text
        text = text.strip()
        if text.startswith("ipfs://"):
            text = "/ipfs/" + text[len("ipfs://") :]
        elif text.startswith("ipns://"):
            text = "/ipns/" + text[len("ipns://") :]
        namespace = "ipfs"
        if text.startswith("/ipfs/"):
            text = text[len("/ipfs/") :]
        elif text.startswith("/ipns/"):
            namespace, text = "ipns", text[len("/ipns/") :]
        root, _, sub = text.partition("/")
        sub = sub.strip("/")
        parts = [p for p in sub.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise InvalidPathError(f"{original!r}: '.' and '..' are not allowed in an IPFS path")
        if namespace == "ipfs" and not is_cid(root):
            raise InvalidPathError(
                f"{original!r} is not a CID or IPFS path (expected CID, "
                "CID/sub/path, /ipfs/CID/sub/path or /ipns/NAME)"
            )
        if namespace == "ipns" and not _IPNS_NAME.match(root):
            raise InvalidPathError(f"{original!r}: {root!r} is not an IPNS name")
        return cls(namespace, root, "/".join(parts))

    @property
    def is_plain_cid(self) -> bool:
        return self.namespace == "ipfs" and not self.sub

    def __str__(self) -> str:
        return f"/{self.namespace}/{self.root}" + (f"/{self.sub}" if self.sub else "")


__all__ = [
    "EMPTY_DIRECTORY_CID",
    "EMPTY_FILE_CID",
    "IpfsPath",
    "cid_codec",
    "is_cid",
    "raw_leaf_cid",
]


def cid_text(binary: bytes) -> str:
    """A binary CID as Kubo writes it: CIDv0 in base58 (`Qm...`), CIDv1 in base32 (`baf...`)."""
    if len(binary) == 34 and binary[:2] == b"\x12\x20":  # a bare sha2-256 multihash: CIDv0
        number = int.from_bytes(binary, "big")
        digits = ""
        while number:
            number, digit = divmod(number, 58)
            digits = _BASE58[digit] + digits
        return digits
    return "b" + base64.b32encode(binary).decode("ascii").lower().rstrip("=")


def dag_pb_fields(block: bytes) -> tuple[bytes, list[bytes]]:
    """A dag-pb block's Data and its links, each link still encoded (PBLink bytes).

    dag-pb is two protobuf messages (PBNode: Links = 2, Data = 1; PBLink: Hash = 1, Name = 2,
    Tsize = 3). Two versions of a directory share most links byte for byte, so comparing the
    encoded links and decoding only those that differ (`dag_pb_link`) reads a directory of a
    thousand entries in about a millisecond, where the node's JSON rendering of it takes a
    hundred times as long.
    """
    data = b""
    links: list[bytes] = []
    index, end = 0, len(block)
    while index < end:
        key, index = _varint(block, index)
        if key & 7 != 2:
            raise ValueError("not a dag-pb block: a field that is not length-delimited")
        length, index = _varint(block, index)
        if index + length > end:
            raise ValueError("not a dag-pb block: a field runs past its end")
        if key >> 3 == 2:
            links.append(block[index : index + length])
        elif key >> 3 == 1:
            data = block[index : index + length]
        index += length
    return data, links


def _link_fields(link: bytes) -> tuple[bytes, bytes, int]:
    """An encoded PBLink's (Name, Hash, Tsize), name and CID still binary."""
    name, cid, tsize = b"", b"", 0
    index, end = 0, len(link)
    while index < end:
        key, index = _varint(link, index)
        if key & 7 == 0:  # a varint: Tsize
            value, index = _varint(link, index)
            if key >> 3 == 3:
                tsize = value
            continue
        if key & 7 != 2:
            raise ValueError("not a dag-pb link: unexpected field type")
        length, index = _varint(link, index)
        if key >> 3 == 1:
            cid = link[index : index + length]
        elif key >> 3 == 2:
            name = link[index : index + length]
        index += length
    return name, cid, tsize


def dag_pb_link(link: bytes) -> tuple[str, str]:
    """An encoded PBLink (from `dag_pb_fields`) as (name, CID)."""
    name, cid, _ = _link_fields(link)
    return name.decode("utf-8", "surrogateescape"), cid_text(cid)


def dag_pb_link_name_size(link: bytes) -> tuple[str, int]:
    """An encoded PBLink's name and Tsize (the cumulative size of what it names), without
    the cost of writing its CID as text."""
    name, _, tsize = _link_fields(link)
    return name.decode("utf-8", "surrogateescape"), tsize


def dag_pb_link_bytes(name: str, cid: str, tsize: int) -> bytes:
    """One PBLink, encoded as `dag_pb_fields` returns it (the CID as text, made binary)."""
    binary = cid_binary(cid)
    encoded_name = name.encode("utf-8", "surrogateescape")
    return (
        b"\x0a"
        + _varint_bytes(len(binary))
        + binary
        + b"\x12"
        + _varint_bytes(len(encoded_name))
        + encoded_name
        + b"\x18"
        + _varint_bytes(tsize)
    )


def dag_pb_block(data: bytes, links: list[bytes]) -> bytes:
    """A dag-pb block in the canonical encoding (links first, each as `dag_pb_link_bytes`;
    the caller sorts them by name, as dag-pb requires)."""
    parts = [b"\x12" + _varint_bytes(len(link)) + link for link in links]
    return b"".join(parts) + b"\x0a" + _varint_bytes(len(data)) + data


def dag_pb_block_size(data: bytes, links: list[bytes]) -> int:
    """len(dag_pb_block(data, links)), without encoding it."""
    framing = sum(1 + len(_varint_bytes(len(link))) for link in links)
    return sum(map(len, links)) + framing + 1 + len(_varint_bytes(len(data))) + len(data)


def dag_pb_cid(block: bytes) -> str:
    """The CIDv1 (sha2-256) of a dag-pb block, in base32."""
    binary = bytes([0x01, 0x70, 0x12, 0x20]) + hashlib.sha256(block).digest()
    return "b" + base64.b32encode(binary).decode("ascii").lower().rstrip("=")


def cid_binary(cid: str) -> bytes:
    """A CID's binary form (CIDv0: its multihash), for dag-pb links."""
    if _CIDV0.match(cid):
        return _base_decode(cid, _BASE58)
    if cid.startswith("b") and is_cid(cid):
        body = cid[1:].upper()
        return base64.b32decode(body + "=" * (-len(body) % 8))
    raise ValueError(f"{cid} is not a CID in base58 (v0) or base32 (v1)")


def _varint_bytes(value: int) -> bytes:
    if value < 0x80:  # most: a link's length, a name's (a directory of 1,000 encodes 3,000)
        return _SMALL_VARINTS[value]
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_SMALL_VARINTS = [bytes([value]) for value in range(0x80)]
