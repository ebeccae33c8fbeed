"""All access to IPFS, in one place: resolve, add, fetch, list, compose, pin.

This is the only module that knows Kubo's RPC API: its commands, options and error answers.
The HTTP underneath is the standard library's (`rpc_http`), not an RPC client package: a CLI
run makes a handful of small calls, and importing requests (with ipfshttpclient) alone took
about 100 ms, most of a warm run's budget (docs/architecture.md, "Start-up").
- trees are added with a streamed multipart body of our own, sent while the daemon's per-file
  replies are read (`duplex_http`): sent whole before reading, both sides stop on many files;
  every import flag is sent explicitly and symlinks are kept as UnixFS symlinks;
- `get` is read as the raw tar stream and handed to `archive.extract` (its safety filter);
- the daemon's version is checked here (Kubo >= MIN_KUBO_VERSION).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import secrets
import socket
import stat as stat_module
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, TypeVar

from . import rpc_http
from .cid import (
    EMPTY_DIRECTORY_CID,
    EMPTY_FILE_CID,
    IpfsPath,
    cid_binary,
    cid_codec,
    dag_pb_block,
    dag_pb_block_size,
    dag_pb_cid,
    dag_pb_fields,
    dag_pb_link,
    dag_pb_link_bytes,
    dag_pb_link_name_size,
    is_cid,
    raw_leaf_cid,
)
from .errors import (
    DaemonAuthError,
    DaemonUnreachableError,
    DaemonVersionError,
    InvalidPathError,
    IpfsError,
    IpfsExecuteError,
    NotRetrievableError,
    UsageError,
)
from .node import EmbeddedNode, reachable_socket_path
from .settings import MIN_KUBO_VERSION, Settings

# The import settings of Kubo's `unixfs-v1-2025` profile, sent explicitly on every add so that a
# daemon with other defaults gives the same CIDs as the embedded node and the Kubo CLI.
IMPORT_OPTIONS: Mapping[str, str] = {
    "cid-version": "1",
    "raw-leaves": "true",
    "chunker": "size-1048576",
    "hash": "sha2-256",
    "trickle": "false",
    "inline": "false",
    "max-file-links": "1024",
    "max-directory-links": "0",
    "max-hamt-fanout": "256",
    "wrap-with-directory": "false",
    "empty-dirs": "true",
    "preserve-mode": "false",
    "preserve-mtime": "false",
}
UPLOAD_CHUNK = 256 * 1024
# compose builds a directory block itself only up to this size, far from where Kubo's MFS
# would shard it (256 KiB of names and CIDs: a HAMT, which is left to MFS).
_BUILT_DIRECTORY_MAX_BYTES = 128 * 1024
# Blocks kept by Store._remember_block: a few, and none big (a root of 100,000 links is MBs).
_RECENT_BLOCKS = 64
_RECENT_BLOCK_MAX_BYTES = 256 * 1024
_UNIXFS_DIRECTORY = b"\x08\x01"  # UnixFS Data of a plain directory: Type = Directory
_DAG_PB_V1_SHA256 = b"\x01\x70\x12\x20"  # how such a CID's binary form starts
# Tries of one MFS write: Kubo's MFS may lose what it just made under concurrent changes.
_MFS_WRITE_ATTEMPTS = 3
_T = TypeVar("_T")
# How Kubo says that a node is not UnixFS (files/stat, cat, get, ls, files/cp).
_NOT_UNIXFS = (
    "not unixfs node",
    "valid unixfs",
    "unknown node type",
    "proto: cannot parse",
    "proto: required field",
)
# An add is given up when no byte has gone to the daemon or come back for this long; a big add
# that keeps moving may take as long as it needs.
ADD_STALL_TIMEOUT_S = 120.0
# A tree whose multipart body is at most this is added in one plain request (no sender thread).
SMALL_ADD_BYTES = 1024 * 1024
SMALL_ADD_PIECES = 1000  # pieces of that body: every entry is at least two


class Entry(NamedTuple):
    name: str
    cid: str
    size: int
    kind: str  # "file", "directory" or "symlink"


class LeftOut(NamedTuple):
    """An entry of an added tree that UnixFS cannot hold (a FIFO, a socket, a device)."""

    path: str  # relative to the added directory
    kind: str

    def __str__(self) -> str:
        return f"{self.path}: {self.kind}, left out (IPFS has no form for it)"


class Added(NamedTuple):
    cid: str
    left_out: tuple[LeftOut, ...] = ()


class AddProgress(NamedTuple):
    """How far an add has got, counted from what has been sent to the daemon.

    The totals come from a walk of the tree before sending (only when progress is asked for).
    """

    path: str  # what is being added, as given
    files: int  # files and symlinks sent
    bytes: int  # file content sent
    files_total: int
    bytes_total: int
    seconds: float  # since the add started
    finished: bool = False  # the last call: the daemon has the whole tree

    @property
    def rate(self) -> float:
        """Bytes per second so far."""
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


AddProgressCallback = Callable[[AddProgress], None]
PROGRESS_INTERVAL_S = 0.15  # how often on_progress is called while adding


class Stat(NamedTuple):
    cid: str
    kind: str  # "file", "directory", "symlink"
    size: int  # file size, or cumulative size of a directory


def authorization_header(secret: str) -> str:
    """An HTTP Authorization value from a secret in Kubo's AuthSecret syntax: "bearer:TOKEN",
    "basic:USER:PASSWORD" or "basic:BASE64"; no known prefix means bearer, as in Kubo."""
    kind, _, value = secret.partition(":")
    if kind == "basic" and value:
        if ":" in value:  # user:password, sent base64-encoded
            value = base64.b64encode(value.encode()).decode("ascii")
        return f"Basic {value}"
    if kind == "bearer" and value:
        return f"Bearer {value}"
    if not secret or secret in ("basic:", "bearer:"):
        raise UsageError(
            "--api-auth / IPFS_EXECUTE_API_AUTH is empty: give bearer:TOKEN or basic:USER:PASSWORD"
        )
    return f"Bearer {secret}"


def _parse_version(text: str) -> tuple[int, ...]:
    numbers = re.findall(r"\d+", text.split("-")[0])
    return tuple(int(n) for n in numbers[:3])


def _decode_unixfs(block: bytes) -> tuple[str, list[bytes], bytes]:
    """(UnixFS kind, encoded links, Data) of a dag-pb block; "other" for what is not one."""
    try:
        data, links = dag_pb_fields(block)
    except ValueError:
        return "other", [], b""
    # UnixFS Data: field 1 (Type) as a varint, first; the types fit in one byte.
    unixfs_type = data[1] if len(data) >= 2 and data[0] == 0x08 else -1
    kind = {1: "directory", 2: "file", 0: "file", 4: "symlink", 5: "sharded-directory"}.get(
        unixfs_type, "other"
    )
    return kind, links, data


class _IteratorReader(io.RawIOBase):
    """A file-like view of an iterator of byte chunks (an HTTP response body)."""

    def __init__(self, chunks: Iterable[bytes], close: Any = None) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._pending = memoryview(b"")
        self._close = close

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                self._pending = memoryview(next(self._chunks))
            except StopIteration:
                return 0
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    def close(self) -> None:
        if self._close is not None:
            try:
                self._close()
            finally:
                self._close = None
        super().close()


class PendingWrite:
    """Blocks being stored and pinned on a thread of its own (Store.add_file_behind). Its
    owner calls `wait`, which raises what the writing raised, every time it is called."""

    def __init__(self, write: Callable[[], None] | None = None) -> None:
        self.error: Exception | None = None
        self.thread: threading.Thread | None = None
        if write is not None:
            # Not a daemon thread: the interpreter's exit waits for the blocks to be stored.
            self.thread = threading.Thread(
                target=self._write, args=(write,), name="ipfs-execute-write-behind"
            )
            self.thread.start()

    def _write(self, write: Callable[[], None]) -> None:
        _writer.active = True  # its calls never wait for other writes (they might wait for it)
        try:
            write()
        except Exception as error:  # whatever it is, the owner hears it: nothing is assumed stored
            self.error = error

    def join(self) -> None:
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()

    def wait(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error


_WRITTEN = PendingWrite()  # nothing left to write
_writer = threading.local()


class ComposedFile(NamedTuple):
    """A new directory with a file put into it (add_file_behind), and its writing."""

    directory: str
    file: str
    written: PendingWrite


class Store:
    """A connection to one Kubo daemon."""

    add_stall_timeout: float = ADD_STALL_TIMEOUT_S

    def __init__(self, api: str, *, fetch_timeout: float = 60.0, auth: str | None = None) -> None:
        """`auth`: the daemon's credentials in Kubo's `API.Authorizations` AuthSecret syntax
        ("bearer:TOKEN", "basic:USER:PASSWORD", "basic:BASE64"), sent with every request."""
        if api.startswith("/unix/") and not reachable_socket_path(api.removeprefix("/unix")):
            raise UsageError(
                f"cannot use the API socket {api.removeprefix('/unix')}: the HTTP client reaches "
                "only unix sockets whose path has lowercase letters, digits and / . _ - (at "
                "most 107 bytes); link it from such a path (`ln -s`) and give that"
            )
        try:
            self._endpoint = rpc_http.parse_multiaddr(api)
        except rpc_http.AddressError:
            raise UsageError(
                f"cannot use the API address {api!r}: give a multiaddr like "
                "/ip4/127.0.0.1/tcp/5001 (or /unix/PATH, /dns/HOST/tcp/PORT/https)"
            ) from None
        self.api = api
        self.fetch_timeout = fetch_timeout
        # Sent with every request, also by the /add of a tree (its own connection).
        self.request_headers = {"Authorization": authorization_header(auth)} if auth else {}
        self._rpc = rpc_http.Client(self._endpoint, "/api/v0", self.request_headers)
        self._version: str | None = None
        # Set once this node is known to hold the empty directory pinned (add_tree).
        self._empty_directory_pinned = False
        self.repo: Path | None = None  # set for the embedded node: Kubo writes facts there
        # Small dag-pb blocks this store made or read lately, decoded, by CID (a CID names its
        # bytes, so a kept block is never stale): a script edit reads its input's root block
        # and the block it made again, the same few blocks each time.
        self._recent_blocks: dict[str, tuple[str, list[bytes], bytes]] = {}
        self._recent_blocks_lock = threading.Lock()  # runs of map_entries share a store
        # Cumulative sizes of what add_bytes added lately: a compose of it needs no stat.
        self._added_sizes: dict[str, int] = {}
        # Compositions still being stored (add_file_behind): a call that could read them waits.
        self._writes_in_flight: list[PendingWrite] = []

    @classmethod
    def connect(cls, settings: Settings) -> Store:
        """The user's daemon when `settings.api` is set, else the embedded node (started if needed)."""
        if settings.api:
            store = cls(settings.api, fetch_timeout=settings.fetch_timeout, auth=settings.api_auth)
        else:
            api = EmbeddedNode(settings).ensure_running()
            store = cls(api, fetch_timeout=settings.fetch_timeout)
            store.repo = settings.repo_dir
        store.check_version()
        return store

    def close(self) -> None:
        try:
            self._rpc.close()
        except Exception:  # closing a dead connection must not mask the real error
            pass

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- low level -------------------------------------------------------------------------

    def _call(
        self,
        path: str,
        *args: str,
        opts: Mapping[str, str] | None = None,
        decoder: str = "json",
        stream: bool = False,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        what: str = "",
        after_writes: bool = True,
    ) -> Any:
        """One RPC call. `after_writes`: first wait for the compositions still being stored
        (add_file_behind), so that the call sees them; False only for a call that cannot
        involve them (a read of the result index in MFS)."""
        if self._writes_in_flight and after_writes:
            self._wait_for_writes()
        request_opts = dict(opts or {})
        if timeout is not None and not stream:
            request_opts.setdefault("timeout", f"{timeout:g}s")  # Kubo's own per-command timeout
        params = [("arg", arg) for arg in args] + list(request_opts.items())
        params.append(("stream-channels", "true"))
        label = what or " ".join(args)
        try:
            if stream:
                # Kubo's timeout would bound the whole transfer (and end a 10 GB `get` cut
                # short): a stream is bounded by how long no byte comes instead.
                status, chunks = self._rpc.stream(
                    path,
                    params,
                    headers=headers,
                    stall_timeout=timeout,
                    on_stall=lambda: self._stalled(timeout, label),
                    on_stream_error=lambda message: self._translate(message, label),
                )
                if status == 200:
                    return chunks
                body = chunks.read_all()
            else:
                content = b"".join(data) if data is not None else None
                status, body, trailers = self._rpc.request(
                    path, params, body=content, headers=headers
                )
                if status == 200 and trailers.get("x-stream-error"):
                    # The command failed after its answer had begun (a 200 with a trailer).
                    raise self._translate(trailers["x-stream-error"], what or " ".join(args))
        except TimeoutError:
            raise self._stalled(timeout, label) from None
        except OSError:
            raise DaemonUnreachableError(
                f"no IPFS daemon answers at {self.api}: start it (`ipfs daemon`), fix --api / "
                "IPFS_EXECUTE_API, or unset them to use the embedded node"
            ) from None
        except rpc_http.ProtocolError as error:
            raise IpfsError(
                f"IPFS {path} {' '.join(args)} failed: the daemon at {self.api} sent a broken "
                f"answer ({type(error).__name__}: {error})"
            ) from None
        if status in (401, 403):
            raise DaemonAuthError(
                f"the IPFS daemon at {self.api} refused {path} (HTTP {status}): give its "
                "credentials with --api-auth / IPFS_EXECUTE_API_AUTH (bearer:TOKEN or "
                "basic:USER:PASSWORD, as in its API.Authorizations), with access to /api/v0"
            )
        if status != 200:
            answer = _json_objects(body)
            if answer and isinstance(answer[0], dict) and "Message" in answer[0]:
                raise self._translate(str(answer[0]["Message"]), what or " ".join(args))
            text = body.decode("utf-8", "replace").strip()[:200]
            raise IpfsError(f"IPFS {path} {' '.join(args)} failed: HTTP {status} {text}".strip())
        if decoder != "json":
            return body
        objects = _json_objects(body)
        if objects is None:
            raise IpfsError(f"IPFS {path} {' '.join(args)} failed: its answer is not JSON")
        for item in objects:
            # An error after part of the answer was sent comes as an object of its own.
            if isinstance(item, dict) and item.get("Type") == "error" and "Message" in item:
                raise self._translate(str(item["Message"]), what or " ".join(args))
        # The daemon streams one object per result; most commands have exactly one.
        return objects[0] if len(objects) == 1 else objects

    def _stalled(self, timeout: float | None, what: str) -> IpfsExecuteError:
        return NotRetrievableError(
            f"{what}: no data came for {timeout or 0:g} s: no peer provided it (is the CID "
            "right? is a node that has it online and connected? raise --fetch-timeout for "
            "slow networks)"
        )

    def _translate(self, error: Exception | str, what: str) -> IpfsExecuteError:
        message = str(error).strip()
        lowered = message.lower()
        if "deadline" in lowered or "context canceled" in lowered:
            return NotRetrievableError(
                f"{what}: not retrievable within {self.fetch_timeout:g} s: no peer provided it "
                "(is the CID right? is a node that has it online and connected? raise "
                "--fetch-timeout for slow networks)"
            )
        if "no link named" in lowered:
            return NotRetrievableError(f"{what}: that sub path does not exist ({message})")
        if "not found" in lowered or "offline" in lowered:
            return NotRetrievableError(
                f"{what}: not retrievable ({message}); the node is offline and does not have "
                "it: add or pin it first, or use an online daemon (--api)"
            )
        if any(sign in lowered for sign in _NOT_UNIXFS):
            # A dag-cbor/dag-json node, or a dag-pb node whose data is not UnixFS.
            return UsageError(
                f"{what} is not a UnixFS file or directory ({message}): give content added "
                "with `ipfs-execute add` or `ipfs add`, not a node made with `ipfs dag put`"
            )
        if "invalid" in lowered or "failed to decode" in lowered or "selected encoding" in lowered:
            return InvalidPathError(f"{what}: {message}")
        return IpfsError(f"{what}: {message}")

    # -- daemon ----------------------------------------------------------------------------

    def version(self) -> str:
        if self._version is None:
            self._version = str(self._call("/version", what="daemon version")["Version"])
        return self._version

    def check_version(self) -> None:
        version = self.version()
        if _parse_version(version) < MIN_KUBO_VERSION:
            minimum = ".".join(map(str, MIN_KUBO_VERSION))
            raise DaemonVersionError(
                f"the IPFS daemon at {self.api} is Kubo {version}; "
                f"ipfs-execute needs Kubo {minimum} or newer"
            )

    def gateway_url(self) -> str | None:
        """The daemon's HTTP gateway as a base URL, when it has one on an IP address."""
        if self.repo is not None:
            # The embedded node's config says port 0 (random); Kubo writes the bound address here.
            try:
                url = (self.repo / "gateway").read_text().strip()
                if url.startswith(("http://", "https://")):
                    return url
            except OSError:
                pass
        try:
            value = self._call("/config", "Addresses.Gateway", what="gateway address")["Value"]
        except IpfsError:
            return None
        addresses = value if isinstance(value, list) else [value]
        for address in addresses:
            parts = str(address).split("/")
            if (
                len(parts) >= 5
                and parts[1] in ("ip4", "ip6")
                and parts[3] == "tcp"
                and parts[4] != "0"
            ):
                host = "127.0.0.1" if parts[2] == "0.0.0.0" else parts[2]
                host = f"[{host}]" if ":" in host else host
                return f"http://{host}:{parts[4]}"
        return None

    def repo_size(self) -> int | None:
        """The daemon's repo size in bytes (`ipfs repo stat --size-only`), None if unknown."""
        try:
            answer = self._call("/repo/stat", opts={"size-only": "true"}, what="repo size")
        except IpfsError:
            return None
        size = answer.get("RepoSize") if isinstance(answer, dict) else None
        return size if isinstance(size, int) else None

    # -- reading ---------------------------------------------------------------------------

    def resolve(self, path: str | IpfsPath) -> str:
        """The CID a user path stands for. `/ipns/` names are resolved once, here."""
        parsed = path if isinstance(path, IpfsPath) else IpfsPath.parse(path)
        if parsed.is_plain_cid:
            return parsed.root
        answer = self._call(
            "/resolve",
            str(parsed),
            opts={"recursive": "true"},
            timeout=self.fetch_timeout,
            what=str(parsed),
        )
        resolved = str(answer["Path"])
        cid = resolved.removeprefix("/ipfs/").split("/")[0]
        if not is_cid(cid):
            raise IpfsError(f"{parsed} resolved to {resolved}, which is not an immutable path")
        return cid

    def stat(self, cid: str) -> Stat:
        answer = self._call("/files/stat", _as_path(cid), timeout=self.fetch_timeout, what=cid)
        kind = str(answer.get("Type", "file"))
        size = (
            int(answer.get("Size") or 0)
            if kind == "file"
            else int(answer.get("CumulativeSize") or 0)
        )
        return Stat(cid=str(answer.get("Hash", cid)), kind=kind, size=size)

    def cat_stream(self, cid: str) -> BinaryIO:
        """A file's bytes, streamed (never held in memory whole)."""
        chunks = self._call(
            "/cat", _as_path(cid), decoder="none", stream=True, timeout=self.fetch_timeout, what=cid
        )
        return io.BufferedReader(
            _IteratorReader(chunks, close=chunks.close), buffer_size=1024 * 1024
        )

    def cat(self, cid_or_path: str) -> bytes:
        if cid_or_path.removeprefix("/ipfs/") == EMPTY_FILE_CID:
            # Nothing to fetch; and peers do not reliably serve the empty block over bitswap.
            return b""
        with self.cat_stream(cid_or_path) as stream:
            return stream.read()

    def tar_stream(self, cid: str) -> BinaryIO:
        """The raw tar stream of `get` (top member named after the CID), for safe extraction."""
        chunks = self._call(
            "/get", _as_path(cid), decoder="none", stream=True, timeout=self.fetch_timeout, what=cid
        )
        return io.BufferedReader(
            _IteratorReader(chunks, close=chunks.close), buffer_size=1024 * 1024
        )

    def unixfs_kind(self, cid: str) -> str:
        """What one block says it is: "file", "directory", "symlink", "sharded-directory" or
        "other"; one block read, never its children (`stat` and `ls` read those too)."""
        return self._unixfs_block(cid)[0]

    def directory_links(self, cid: str) -> list[tuple[str, str]] | None:
        """(name, CID) of a plain directory's entries, from its one block; None for anything
        else (a sharded directory: `ls` lists it). Unlike `ls`, no child is read."""
        kind, links, _ = self._unixfs_block(cid)
        return [dag_pb_link(link) for link in links] if kind == "directory" else None

    def directory_changes(self, old: str, new: str) -> dict[str, tuple[str, str]] | None:
        """{name: (old CID, new CID)} of the entries two plain directories hold under the same
        names with other content; None when their names or their own metadata differ, or
        either is not a plain directory. Reads one block of each, and decodes only the links that differ."""
        old_kind, old_links, old_data = self._unixfs_block(old)
        new_kind, new_links, new_data = self._unixfs_block(new)
        if old_kind != "directory" or new_kind != "directory" or len(old_links) != len(new_links):
            return None
        if old_data != new_data:  # the directory's own mode or mtime (UnixFS metadata) changed
            return None
        unchanged = set(old_links) & set(new_links)
        gone = dict(dag_pb_link(link) for link in old_links if link not in unchanged)
        came = dict(dag_pb_link(link) for link in new_links if link not in unchanged)
        if gone.keys() != came.keys():
            return None
        return {name: (gone[name], came[name]) for name in sorted(came)}

    def _unixfs_block(self, cid: str) -> tuple[str, list[bytes], bytes]:
        """(UnixFS kind, encoded links, Data) of one block."""
        if cid_codec(cid) == "raw":
            return "file", [], b""
        decoded = self._recent_blocks.get(cid)
        if decoded is None:
            block = self._call(
                "/block/get", cid, decoder="none", timeout=self.fetch_timeout, what=cid
            )
            decoded = _decode_unixfs(block)
            self._remember_block(cid, block, decoded)
        return decoded

    def ls(self, cid: str) -> list[Entry]:
        answer = self._call(
            "/ls",
            _as_path(cid),
            opts={"resolve-type": "true", "size": "true"},
            timeout=self.fetch_timeout,
            what=cid,
        )
        objects = answer.get("Objects") or [{}]
        kinds = {0: "file", 1: "directory", 2: "file", 4: "symlink", 5: "symlink"}
        return [
            Entry(
                name=link["Name"],
                cid=link["Hash"],
                size=int(link.get("Size") or 0),
                kind=kinds.get(int(link.get("Type", 2)), "file"),
            )
            for link in objects[0].get("Links") or []
        ]

    def walk(self, cid: str, prefix: str = "") -> Iterator[tuple[str, Entry]]:
        """Every entry under a directory, depth first, as (relative path, entry)."""
        for entry in self.ls(cid):
            path = f"{prefix}{entry.name}"
            yield path, entry
            if entry.kind == "directory":
                yield from self.walk(entry.cid, path + "/")

    # -- writing ---------------------------------------------------------------------------

    def add_path(
        self, path: Path, *, pin: bool = True, on_progress: AddProgressCallback | None = None
    ) -> str:
        """Add a file or directory tree; returns the root CID (the Kubo CLI's `add -r --hidden`)."""
        return self.add_tree(path, pin=pin, on_progress=on_progress).cid

    def add_tree(
        self, path: Path, *, pin: bool = True, on_progress: AddProgressCallback | None = None
    ) -> Added:
        """`add_path`, also naming what had to be left out (FIFOs, sockets, devices).

        `on_progress` is called with an AddProgress about every PROGRESS_INTERVAL_S seconds
        in the calling thread, and once more, `finished`, when the daemon has the whole tree.
        """
        path = Path(path)
        try:
            st = path.lstat()
        except FileNotFoundError:
            raise InvalidPathError(f"{path}: no such file or directory") from None
        if not (stat_module.S_ISDIR(st.st_mode) or stat_module.S_ISREG(st.st_mode)):
            raise InvalidPathError(f"{path}: only a regular file or a directory can be added")
        if self._empty_directory_pinned and on_progress is None and _is_empty_directory(path):
            # Many runs leave /output empty: its CID is known, and the node has it pinned.
            return Added(EMPTY_DIRECTORY_CID, ())
        boundary = secrets.token_hex(16)
        left_out: list[LeftOut] = []
        counter = _AddCounter(str(path), on_progress) if on_progress is not None else None
        body = _multipart_tree(path, boundary, left_out, counter)
        try:
            cid = self._post_add(
                body,
                boundary,
                pin=pin,
                what=str(path),
                on_wait=counter.report if counter is not None else None,
            )
            if counter is not None:
                counter.finish()
        except _UnreadableEntry as error:
            raise IpfsError(
                f"cannot add {path}: reading {error.path} failed ({error.reason}); make it "
                "readable (or remove it) and add again"
            ) from None
        if cid == EMPTY_DIRECTORY_CID and pin:
            self._empty_directory_pinned = True
        return Added(cid, tuple(left_out))

    def _post_add(
        self,
        body: Iterable[bytes],
        boundary: str,
        *,
        pin: bool,
        what: str,
        on_wait: Callable[[], None] | None = None,
    ) -> str:
        """One /add request, its body sent while the daemon's per-file replies are read: sent
        first and read after, the two fill each other's buffers and both sides stop."""
        opts = dict(IMPORT_OPTIONS)
        opts.update({"pin": "true" if pin else "false", "quieter": "true", "progress": "false"})
        query = urllib.parse.urlencode({"stream-channels": "true", **opts})
        content_type = f"multipart/form-data; boundary={boundary}"
        # A small tree (an ordinary run's /output) goes as one plain request: its replies (a
        # line per entry at most) cannot fill a socket buffer before the body is sent.
        first: list[bytes] = []
        size = 0
        chunks = iter(body)
        for chunk in chunks:
            first.append(chunk)
            size += len(chunk)
            if size > SMALL_ADD_BYTES or len(first) > SMALL_ADD_PIECES:
                break
        else:
            return self._post_small_add(b"".join(first), query, content_type, what=what)
        from . import duplex_http  # h11 and a thread: only for a big tree

        rpc = self._endpoint
        endpoint = duplex_http.Endpoint(
            family=socket.AF_UNIX if rpc.unix_path is not None else socket.AF_INET,
            address=rpc.unix_path if rpc.unix_path is not None else (rpc.host, rpc.port),
            host_header=rpc.host_header,
            tls=rpc.tls,
        )
        headers = dict(self.request_headers)  # the credentials, if any
        headers["Content-Type"] = content_type
        try:
            reply = duplex_http.post(
                endpoint,
                f"/api/v0/add?{query}",
                _chained(first, chunks),
                headers=headers,
                stall_timeout=self.add_stall_timeout,
                on_wait=on_wait,
            )
        except duplex_http.StalledError:
            raise IpfsError(
                f"adding {what}: the IPFS daemon at {self.api} neither took nor sent a byte for "
                f"{self.add_stall_timeout:g} s; check that it is running and not out of disk, "
                "then add again"
            ) from None
        except ConnectionRefusedError:
            raise DaemonUnreachableError(
                f"no IPFS daemon answers at {self.api}: start it (`ipfs daemon`), fix --api / "
                "IPFS_EXECUTE_API, or unset them to use the embedded node"
            ) from None
        except OSError as error:
            raise IpfsError(
                f"adding {what}: the connection to the IPFS daemon at {self.api} broke "
                f"({error}); add again"
            ) from None
        return self._added_cid(
            reply.status, reply.last_line, reply.error_body, reply.trailers, what=what
        )

    def _post_small_add(self, body: bytes, query: str, content_type: str, *, what: str) -> str:
        try:
            status, answer, trailers = self._rpc.request(
                f"/add?{query}",
                (),
                body=body,
                headers={"Content-Type": content_type},
                stall_timeout=self.add_stall_timeout,
            )
        except TimeoutError:
            raise IpfsError(
                f"adding {what}: the IPFS daemon at {self.api} neither took nor sent a byte for "
                f"{self.add_stall_timeout:g} s; check that it is running and not out of disk, "
                "then add again"
            ) from None
        except (ConnectionRefusedError, FileNotFoundError):
            raise DaemonUnreachableError(
                f"no IPFS daemon answers at {self.api}: start it (`ipfs daemon`), fix --api / "
                "IPFS_EXECUTE_API, or unset them to use the embedded node"
            ) from None
        except (OSError, rpc_http.ProtocolError) as error:
            raise IpfsError(
                f"adding {what}: the connection to the IPFS daemon at {self.api} broke "
                f"({error}); add again"
            ) from None
        lines = [line for line in answer.splitlines() if line.strip()]
        last_line = lines[-1] if lines and status == 200 else b""
        return self._added_cid(status, last_line, answer, trailers, what=what)

    def _added_cid(
        self,
        status: int,
        last_line: bytes,
        error_body: bytes,
        trailers: Mapping[str, str],
        *,
        what: str,
    ) -> str:
        """The root CID from an /add answer, or the error it stands for."""
        if status in (401, 403):
            raise DaemonAuthError(
                f"the IPFS daemon at {self.api} refused /add (HTTP {status}): give its "
                "credentials with --api-auth / IPFS_EXECUTE_API_AUTH (bearer:TOKEN or "
                "basic:USER:PASSWORD, as in its API.Authorizations), with access to /api/v0"
            )
        refusal = (
            (_error_message(error_body) or f"HTTP {status}")
            if status != 200
            else trailers.get("x-stream-error")
        )
        if refusal:
            raise IpfsError(f"adding {what}: the IPFS daemon at {self.api} failed: {refusal}")
        try:
            last = json.loads(last_line)
            return str(last["Hash"])
        except (ValueError, KeyError, TypeError):
            raise IpfsError(
                f"adding {what} gave no CID (the daemon answered {last_line!r:.200})"
            ) from None

    def add_bytes(self, data: bytes, *, name: str = "file", pin: bool = True) -> str:
        boundary = secrets.token_hex(16)
        body = [
            _part_header(boundary, name, "application/octet-stream"),
            data,
            b"\r\n",
            f"--{boundary}--\r\n".encode(),
        ]
        opts = dict(IMPORT_OPTIONS)
        opts.update({"pin": "true" if pin else "false", "quieter": "true", "progress": "false"})
        answer = self._call(
            "/add",
            opts=opts,
            data=iter(body),
            what=f"add {name}",
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        results = answer if isinstance(answer, list) else [answer]
        cid = str(results[-1]["Hash"])
        with contextlib.suppress(KeyError, TypeError, ValueError), self._recent_blocks_lock:
            self._added_sizes[cid] = int(results[-1]["Size"])
            while len(self._added_sizes) > _RECENT_BLOCKS:
                del self._added_sizes[next(iter(self._added_sizes))]
        return cid

    def add_file_into(self, base: str, path: str, data: bytes) -> tuple[str, str]:
        """A new directory: `base` with a file of `data` at `path` (a/b/name). Returns
        (directory CID, file CID); pinned. What `compose` makes, in three round trips when
        the file is one block (a cell's script in its input)."""
        composed = self.add_file_behind(base, path, data)
        composed.written.wait()
        return composed.directory, composed.file

    def add_file_behind(self, base: str, path: str, data: bytes) -> ComposedFile:
        """What add_file_into makes, its CIDs worked out here and, when the file is one block
        (a cell's script), its blocks stored and pinned on a thread of their own: the caller
        goes on at once (a run stages and starts meanwhile) and waits for `.written` before
        it relies on the node having them. Until then every call of this store that could
        read them waits for them first."""
        if len(data) > int(IMPORT_OPTIONS["chunker"].removeprefix("size-")):
            file_cid = self.add_bytes(data, name=path.rsplit("/", 1)[-1])
            return ComposedFile(self.compose({path: file_cid}, base=base), file_cid, _WRITTEN)
        file_cid = raw_leaf_cid(data)
        edits = _edits({path: file_cid})
        if edits is None:  # MFS says why not
            return ComposedFile(self.compose_in_mfs({path: file_cid}, base), file_cid, _WRITTEN)
        with self._recent_blocks_lock:
            known = {**self._added_sizes, file_cid: len(data)}
        made: list[tuple[bytes, list[bytes]]] = []  # (block, its links)
        built = self._built_directory(base, edits, known, made)
        if built is None:
            self._put_blocks([data], codec="raw", expected=[file_cid])
            return ComposedFile(self.compose_in_mfs(_flat(edits), base), file_cid, _WRITTEN)
        root_cid = built[0]
        blocks = [block for block, _ in made]
        cids = [dag_pb_cid(block) for block in blocks]
        # Remembered now, as built: the stager reads the new root's links right away.
        for cid, (block, links) in zip(cids, made, strict=True):
            self._remember_block(cid, block, ("directory", links, _UNIXFS_DIRECTORY))

        def write() -> None:
            self._put_blocks([data], codec="raw", expected=[file_cid])
            self._put_blocks(blocks, codec="dag-pb", expected=cids, remember=False)
            self.pin(root_cid, based_on=base)

        pending = PendingWrite(write)
        with self._recent_blocks_lock:
            self._writes_in_flight.append(pending)
        return ComposedFile(root_cid, file_cid, pending)

    def _wait_for_writes(self) -> None:
        """Wait for the compositions still being stored (not on a writing thread), and raise
        the first one's error (their owners get it again from `wait`)."""
        if getattr(_writer, "active", False):
            return
        with self._recent_blocks_lock:
            waited = list(self._writes_in_flight)
        for pending in waited:
            pending.join()
        with self._recent_blocks_lock:
            self._writes_in_flight = [p for p in self._writes_in_flight if p not in waited]
        for pending in waited:
            if pending.error is not None:
                raise pending.error

    def _remember_block(
        self, cid: str, block: bytes, decoded: tuple[str, list[bytes], bytes] | None = None
    ) -> None:
        if len(block) > _RECENT_BLOCK_MAX_BYTES:
            return
        decoded = decoded or _decode_unixfs(block)
        with self._recent_blocks_lock:
            self._recent_blocks.pop(cid, None)
            self._recent_blocks[cid] = decoded  # newest last: the oldest goes first
            while len(self._recent_blocks) > _RECENT_BLOCKS:
                del self._recent_blocks[next(iter(self._recent_blocks))]

    def _put_blocks(
        self, blocks: list[bytes], *, codec: str, expected: list[str], remember: bool = True
    ) -> None:
        boundary = secrets.token_hex(16)
        body: list[bytes] = []
        for block in blocks:
            body += [_part_header(boundary, "block", "application/octet-stream"), block, b"\r\n"]
        body.append(f"--{boundary}--\r\n".encode())
        answer = self._call(
            "/block/put",
            opts={"cid-codec": codec, "mhtype": "sha2-256", "pin": "false"},
            data=iter(body),
            what="put blocks",
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        keys = [str(item["Key"]) for item in (answer if isinstance(answer, list) else [answer])]
        if keys != expected:
            raise IpfsError(
                f"the IPFS daemon at {self.api} stored blocks as {keys}, not {expected}: "
                "report this with `ipfs version --all`"
            )
        if codec == "dag-pb" and remember:
            for cid, block in zip(keys, blocks, strict=True):
                self._remember_block(cid, block)

    def empty_directory(self) -> str:
        """The CID of an empty UnixFS directory (with the import settings above)."""
        return self.compose({})

    def pin(self, cid: str, *, based_on: str | None = None) -> None:
        """Pin `cid` recursively. With `based_on` (a recursively pinned CID that `cid` shares
        most blocks with, such as the base of a composition) the node walks only what differs
        (`pin update --unpin=false`): pinning a script composed into a 1 GB input costs what
        the script costs, not a walk of every block of the input."""
        if based_on is not None and based_on != cid:
            try:
                self._call(
                    "/pin/update",
                    f"/ipfs/{based_on}",
                    f"/ipfs/{cid}",
                    opts={"unpin": "false"},
                    timeout=self.fetch_timeout,
                    what=f"pin {cid}",
                )
                return
            except IpfsError:
                pass  # `based_on` is not pinned recursively: pin the whole DAG
        self._call(
            "/pin/add",
            f"/ipfs/{cid}",
            opts={"recursive": "true"},
            timeout=self.fetch_timeout,
            what=f"pin {cid}",
        )

    def repo_gc(self) -> int:
        """Delete the blocks nothing pins and MFS does not reach; returns how many went.

        Everything the tool adds (outputs, records, scripts, composed inputs) is pinned and
        the result index lives in MFS, so only fetched copies of others' content go.
        """
        answer = self._call("/repo/gc", opts={"quiet": "false"}, what="repo gc")
        objects = answer if isinstance(answer, list) else [answer]
        for item in objects:
            if isinstance(item, dict) and item.get("Error"):
                raise IpfsError(
                    f"IPFS repo gc failed: {item['Error']}; nothing pinned was touched, run "
                    "gc again (`ipfs-execute gc`)"
                )
        return sum(1 for item in objects if isinstance(item, dict) and item.get("Key"))

    def compose(self, entries: Mapping[str, str], base: str | None = None) -> str:
        """A new directory: `base` (or empty) with each name (may be nested: a/b) set to a
        CID (an entry already there replaced); pinned.

        The directory is the one Kubo's MFS makes (`files cp` of each entry into a copy of
        `base`): the RPC `object patch` commands are gone from Kubo. Where every directory it
        changes is a plain one of a modest size, it is built here from blocks instead, with
        the same bytes: one `block/get` per changed directory not seen lately, a stat per
        entry not just added, one `block/put` and the pin, where MFS takes five requests and
        rewrites each changed directory in the node (a file replaced in a directory of 1,000:
        3 ms against 5 to 8 ms). Anything else (a sharded directory, a path through a file, a
        name inside another entry) goes through MFS.
        """
        edits = _edits(entries)
        return (
            self._compose(edits, base) if edits is not None else self.compose_in_mfs(entries, base)
        )

    def _compose(
        self, edits: _Edits, base: str | None, sizes: Mapping[str, int] | None = None
    ) -> str:
        with self._recent_blocks_lock:
            known = {**self._added_sizes, **(sizes or {})}
        made: list[tuple[bytes, list[bytes]]] = []  # (block, its links)
        built = self._built_directory(base, edits, known, made)
        if built is None:
            return self.compose_in_mfs(_flat(edits), base)
        root_cid, _ = built
        blocks = [block for block, _ in made]
        cids = [dag_pb_cid(block) for block in blocks]
        self._put_blocks(blocks, codec="dag-pb", expected=cids, remember=False)
        # Remembered as built: _put_blocks would decode each again.
        for cid, (block, links) in zip(cids, made, strict=True):
            self._remember_block(cid, block, ("directory", links, _UNIXFS_DIRECTORY))
        self.pin(root_cid, based_on=base)
        return root_cid

    def _built_directory(
        self,
        cid: str | None,
        edits: _Edits,
        sizes: dict[str, int],
        made: list[tuple[bytes, list[bytes]]],
        old_size: int | None = None,
    ) -> tuple[str, int | None] | None:
        """(CID, cumulative size) of directory `cid` (None: a new, empty one) with `edits`
        applied, its block and those of its changed subdirectories appended to `made`; None
        where MFS would make something else (see compose). The size is worked out from the
        old one (`old_size`, from the parent's link), so that only the links a binary search
        passes are decoded: a directory of 1,000 entries costs what one of ten does. Without
        `old_size` (the root) it is None."""
        if cid is None:
            links: list[bytes] = []
            total: int | None = 0
        else:
            # MFS keeps a directory's CID version and hash function: built ones are v1 sha2-256.
            if cid_binary(cid)[:4] != _DAG_PB_V1_SHA256:
                return None
            kind, decoded, data = self._unixfs_block(cid)
            if kind != "directory" or data != _UNIXFS_DIRECTORY:
                return None  # a file, a HAMT, or a directory with a mode or a time
            links = list(decoded)
            total = None if old_size is None else old_size - dag_pb_block_size(data, links)
        for name, edit in edits.items():
            index, found = _link_index(links, name)
            old_cid, old_link_size = None, 0
            if found:
                old_cid = dag_pb_link(links[index])[1]
                old_link_size = dag_pb_link_name_size(links[index])[1]
            if isinstance(edit, str):
                if old_cid is not None and not self._is_file(old_cid):
                    return None  # MFS refuses to put anything over a directory
                if edit not in sizes:
                    sizes[edit] = self._cumulative_size(edit)
                new_cid, new_size = edit, sizes[edit]
            else:
                child = self._built_directory(
                    old_cid, edit, sizes, made, old_link_size if found else None
                )
                if child is None:
                    return None
                new_cid, child_size = child
                assert child_size is not None  # a subdirectory's is known
                new_size = child_size
            new_link = dag_pb_link_bytes(name, new_cid, new_size)
            if found:
                links[index] = new_link
            else:
                links.insert(index, new_link)
            if total is not None:
                total += new_size - old_link_size
        block = dag_pb_block(_UNIXFS_DIRECTORY, links)
        if len(block) > _BUILT_DIRECTORY_MAX_BYTES:
            return None
        made.append((block, links))
        return dag_pb_cid(block), None if total is None else total + len(block)

    def _is_file(self, cid: str) -> bool:
        return cid_codec(cid) == "raw" or self._unixfs_block(cid)[0] == "file"

    def _cumulative_size(self, cid: str) -> int:
        """What a dag-pb link to `cid` gives as its Tsize: the bytes of all its blocks."""
        answer = self._call(
            "/files/stat",
            f"/ipfs/{cid}",
            timeout=self.fetch_timeout,
            what=f"stat {cid}",
        )
        return int(answer["CumulativeSize"])

    def compose_in_mfs(self, entries: Mapping[str, str], base: str | None = None) -> str:
        """`compose`, always through Kubo's MFS (what the built directories must equal)."""
        for name in entries:
            parts = name.strip("/").split("/")
            if not name.strip("/") or any(p in ("", ".", "..") for p in parts):
                raise InvalidPathError(f"{name!r} is not a usable entry name")
        return _retried_mfs_write(lambda: self._compose_once(entries, base))

    def _compose_once(self, entries: Mapping[str, str], base: str | None) -> str:
        scratch = f"/.ipfs-execute-compose-{secrets.token_hex(8)}"
        try:
            if base:
                self._call(
                    "/files/cp",
                    f"/ipfs/{base}",
                    scratch,
                    timeout=self.fetch_timeout,
                    what=f"compose on {base}",
                )
            else:
                self._call(
                    "/files/mkdir",
                    scratch,
                    opts={"cid-version": "1", "hash": "sha2-256"},
                    what="compose",
                )
            for name, cid in entries.items():
                self._files_cp(cid, f"{scratch}/{name.strip('/')}", what=f"compose {name}={cid}")
            answer = self._call("/files/stat", scratch, opts={"hash": "true"}, what="compose")
            cid = str(answer["Hash"])
            self.pin(cid, based_on=base)
            return cid
        finally:
            try:
                self._call(
                    "/files/rm",
                    scratch,
                    opts={"recursive": "true", "force": "true"},
                    what="compose clean-up",
                )
            except IpfsError:
                pass

    # -- MFS: the node's own mutable file system, where the result cache's index lives --------

    def mfs_read(self, path: str) -> bytes | None:
        """A small file from MFS, or None when there is nothing at `path`."""
        try:
            # Never a composition still being stored (_call): the index's own files.
            data: bytes = self._call(
                "/files/read", path, decoder="none", what=path, after_writes=False
            )
            return data
        except NotRetrievableError:
            return None
        except IpfsError as error:
            if "does not exist" in str(error) or "not exist" in str(error):
                return None
            raise

    def mfs_link(self, path: str, cid: str) -> None:
        """Make MFS `path` point at `cid` (parents created, an old entry replaced)."""
        _retried_mfs_write(lambda: self._files_cp(cid, path, what=f"link {path} to {cid}"))

    def _files_cp(self, cid: str, path: str, *, what: str) -> None:
        """MFS `path` set to `cid`, its parents made, what was there replaced."""
        self._call(
            "/files/cp",
            f"/ipfs/{cid}",
            path,
            opts={"parents": "true", "force": "true"},
            timeout=self.fetch_timeout,
            what=what,
        )

    def mfs_hash(self, path: str) -> str | None:
        try:
            return str(self._call("/files/stat", path, opts={"hash": "true"}, what=path)["Hash"])
        except IpfsError as error:
            if (
                "does not exist" in str(error)
                or "not exist" in str(error)
                or isinstance(error, NotRetrievableError)
            ):
                return None
            raise

    def mfs_ls(self, path: str) -> list[str]:
        try:
            answer = self._call("/files/ls", path, what=path)
        except IpfsError as error:
            if "does not exist" in str(error) or isinstance(error, NotRetrievableError):
                return []
            raise
        return [str(entry["Name"]) for entry in answer.get("Entries") or []]

    # -- peers -----------------------------------------------------------------------------

    def peer_addresses(self) -> list[str]:
        """This node's swarm addresses with its peer ID, for another node to connect to."""
        answer = self._call("/id", what="node identity")
        peer = str(answer["ID"])
        return [a if "/p2p/" in a else f"{a}/p2p/{peer}" for a in answer.get("Addresses") or []]

    def peer_id(self) -> str:
        """This node's peer ID."""
        return str(self._call("/id", what="node identity")["ID"])

    def swarm_connect(self, address: str) -> None:
        self._call("/swarm/connect", address, timeout=self.fetch_timeout, what=f"connect {address}")

    def is_pinned(self, cid: str) -> bool:
        """Whether this node pins `cid` recursively (so holds all of it); asks no peer."""
        try:
            self._call(
                "/pin/ls",
                f"/ipfs/{cid}",
                opts={"type": "recursive"},
                timeout=self.fetch_timeout,
                what=f"pin ls {cid}",
            )
        except IpfsError as error:
            if "not pinned" in str(error) or type(error) is NotRetrievableError:
                return False
            raise
        return True

    # -- CAR files: a notebook's bundle ----------------------------------------------------

    def dag_export(self, cid: str, dest: Path) -> int:
        """Write the whole DAG under `cid` to `dest` as a CAR file, streamed (memory stays flat
        whatever its size) and atomically; returns its size in bytes."""
        chunks = self._call(
            "/dag/export",
            cid,
            opts={"progress": "false"},
            decoder="none",
            stream=True,
            what=f"export {cid}",
        )
        partial = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.partial")
        size = 0
        try:
            try:
                with open(partial, "wb") as out:
                    for chunk in chunks:
                        out.write(chunk)
                        size += len(chunk)
            except (ConnectionError, TimeoutError) as error:
                raise IpfsError(
                    f"exporting {cid}: the daemon's answer broke off ({error})"
                ) from None
            except OSError as error:
                raise UsageError(
                    f"cannot write the bundle {dest}: {error.strerror or error}"
                ) from None
            refusal = chunks.trailers.get("x-stream-error")
            if refusal:
                raise IpfsError(f"exporting {cid} as a CAR failed: {refusal}")
            os.replace(partial, dest)
        except BaseException:
            chunks.close()
            partial.unlink(missing_ok=True)
            raise
        return size

    def dag_import(self, car: Path) -> list[str]:
        """Import a CAR file (sent streamed, never read whole) and pin its roots; the roots."""
        try:
            handle = open(car, "rb")  # noqa: SIM115 (closed by the body generator)
        except OSError as error:
            raise UsageError(f"cannot read the bundle {car}: {error.strerror or error}") from None
        boundary = secrets.token_hex(16)

        def body() -> Iterator[bytes]:
            with handle:
                yield _part_header(boundary, car.name, "application/vnd.ipld.car")
                while chunk := handle.read(UPLOAD_CHUNK):
                    yield chunk
                yield f"\r\n--{boundary}--\r\n".encode()

        from . import duplex_http  # h11 and a thread: the body is streamed

        rpc = self._endpoint
        endpoint = duplex_http.Endpoint(
            family=socket.AF_UNIX if rpc.unix_path is not None else socket.AF_INET,
            address=rpc.unix_path if rpc.unix_path is not None else (rpc.host, rpc.port),
            host_header=rpc.host_header,
            tls=rpc.tls,
        )
        headers = dict(self.request_headers)
        headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        query = urllib.parse.urlencode(
            {"stream-channels": "true", "pin-roots": "true", "stats": "false"}
        )
        try:
            reply = duplex_http.post(
                endpoint,
                f"/api/v0/dag/import?{query}",
                body(),
                headers=headers,
                stall_timeout=self.add_stall_timeout,
            )
        except duplex_http.StalledError:
            raise IpfsError(
                f"importing {car}: the IPFS daemon at {self.api} neither took nor sent a byte "
                f"for {self.add_stall_timeout:g} s; check that it is running, then import again"
            ) from None
        except OSError as error:
            raise IpfsError(
                f"importing {car}: the connection to the IPFS daemon at {self.api} broke "
                f"({error}); import again"
            ) from None
        refusal = (
            (_error_message(reply.error_body) or f"HTTP {reply.status}")
            if reply.status != 200
            else reply.trailers.get("x-stream-error")
        )
        if refusal:
            raise IpfsError(f"importing {car}: the IPFS daemon refused it: {refusal}")
        roots = []
        for item in _json_objects(reply.last_line) or []:
            root = item.get("Root") if isinstance(item, dict) else None
            if isinstance(root, dict):
                if root.get("PinErrorMsg"):
                    raise IpfsError(
                        f"importing {car}: pinning its root failed: {root['PinErrorMsg']}"
                    )
                roots.append(str(root["Cid"]["/"]))
        if not roots:
            raise IpfsError(f"importing {car}: the daemon named no root (is it a CAR file?)")
        return roots

    def pin_remote(self, cid: str, service: str, *, name: str) -> None:
        """Ask a remote pinning service configured in the node (`ipfs pin remote service
        add`) to pin `cid`; returns once the request is queued there."""
        try:
            self._call(
                "/pin/remote/add",
                f"/ipfs/{cid}",
                opts={"service": service, "name": name, "background": "true"},
                what=f"pin {cid} remotely",
            )
        except IpfsExecuteError as error:
            if "service" in str(error).lower() and (
                "not" in str(error).lower() or "unknown" in str(error).lower()
            ):
                raise UsageError(
                    f"no remote pinning service named {service!r} in the IPFS node's "
                    f"configuration: add it with `ipfs pin remote service add {service} "
                    "ENDPOINT TOKEN` (docs/trust.md)"
                ) from None
            raise


def _as_path(text: str) -> str:
    """`CID`, `CID/sub` or `/ipfs/CID/sub` as an /ipfs/ path for the RPC API."""
    return str(IpfsPath.parse(text))


# -- multipart body for /add -----------------------------------------------------------------


class _AddCounter:
    """Files and bytes of a tree handed to the sender, reported to an AddProgressCallback.

    The body generator counts in the sending thread; `report` and `finish` are called in the
    thread that reads the daemon's replies, which is the caller's, so a notebook's display
    calls stay in the cell's thread."""

    def __init__(self, what: str, callback: AddProgressCallback) -> None:
        self.what = what
        self.callback = callback
        self.files = 0
        self.bytes = 0
        self.files_total, self.bytes_total = _count_tree(what)
        self._started = time.monotonic()
        self._last = self._started

    def _progress(self, now: float, finished: bool) -> AddProgress:
        files, size = self.files, self.bytes
        return AddProgress(
            path=self.what,
            files=files,
            bytes=size,
            # A tree that changed while sent: the totals are what was sent.
            files_total=files if finished else max(self.files_total, files),
            bytes_total=size if finished else max(self.bytes_total, size),
            seconds=now - self._started,
            finished=finished,
        )

    def report(self) -> None:
        now = time.monotonic()
        if now - self._last >= PROGRESS_INTERVAL_S:
            self._last = now
            self.callback(self._progress(now, finished=False))

    def finish(self) -> None:
        self.callback(self._progress(time.monotonic(), finished=True))


def _count_tree(root: str) -> tuple[int, int]:
    """Files (and symlinks) and their bytes under root, as _multipart_tree will send them;
    one lstat per entry (scandir's), entries that cannot be read are skipped here."""
    try:
        st = os.lstat(root)
    except OSError:
        return 0, 0
    if not stat_module.S_ISDIR(st.st_mode):
        return (1, st.st_size) if stat_module.S_ISREG(st.st_mode) else (0, 0)
    files = size = 0
    pending = [root]
    while pending:
        try:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            pending.append(entry.path)
                        elif entry.is_symlink():
                            files += 1
                        elif entry.is_file(follow_symlinks=False):
                            files += 1
                            size += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return files, size


class _UnreadableEntry(Exception):
    """A file or directory of the tree could not be read while it was being sent."""

    def __init__(self, path: str, error: OSError) -> None:
        self.path = path
        self.reason = error.strerror or str(error)
        super().__init__(f"{path}: {self.reason}")


def _error_message(body: bytes) -> str:
    """The message of a Kubo error answer ({"Message": ..., "Type": "error"}), or its text."""
    try:
        return str(json.loads(body)["Message"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace").strip()[:500]


def _chained(first: list[bytes], rest: Iterator[bytes]) -> Iterator[bytes]:
    """`first`, then `rest`; closing this closes `rest` (a generator reading a file)."""
    try:
        yield from first
        yield from rest
    finally:
        close = getattr(rest, "close", None)
        if close is not None:
            close()


def _json_objects(body: bytes) -> list[Any] | None:
    """The JSON values of an answer, one after another (Kubo streams one per line), or None."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return None
    decoder = json.JSONDecoder()
    objects: list[Any] = []
    index, end = 0, len(text)
    while True:
        while index < end and text[index].isspace():
            index += 1
        if index == end:
            return objects
        try:
            value, index = decoder.raw_decode(text, index)
        except ValueError:
            return None
        objects.append(value)


def _part_header(boundary: str, name: str, content_type: str) -> bytes:
    # Kubo unescapes file names with Go's url.QueryUnescape, so escape everything ('+' too).
    # The name's own bytes are escaped, so a name that is not UTF-8 arrives as it is on disk.
    quoted = urllib.parse.quote(os.fsencode(name), safe="")
    return (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{quoted}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode()


def _file_chunks(path: str) -> Iterator[bytes]:
    # O_NOFOLLOW: a file swapped for a symlink after listing must not be followed.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb", buffering=0) as handle:
        while chunk := handle.read(UPLOAD_CHUNK):
            yield chunk


# The kinds of entry UnixFS has no form for, as a warning names them.
_NO_UNIXFS_FORM = (
    (stat_module.S_ISFIFO, "a named pipe (FIFO)"),
    (stat_module.S_ISSOCK, "a socket"),
    (stat_module.S_ISCHR, "a character device"),
    (stat_module.S_ISBLK, "a block device"),
)


def _multipart_tree(
    root: Path, boundary: str, left_out: list[LeftOut], counter: _AddCounter | None = None
) -> Iterator[bytes]:
    """Stream a tree as Kubo's multipart format: parents before children, sorted, no following.

    Entries UnixFS cannot hold are appended to `left_out`; an entry that cannot be read raises
    _UnreadableEntry. What has been handed on is counted in `counter`, if given."""
    root_name = root.name or "root"

    def emit(host_path: str, name: str, relative: str) -> Iterator[bytes]:
        try:
            st = os.lstat(host_path)
            if stat_module.S_ISDIR(st.st_mode):
                children = sorted(os.listdir(host_path), key=os.fsencode)  # byte order
            elif stat_module.S_ISLNK(st.st_mode):
                target = os.readlink(host_path)
        except OSError as error:
            raise _UnreadableEntry(host_path, error) from None
        if stat_module.S_ISDIR(st.st_mode):
            yield _part_header(boundary, name, "application/x-directory")
            yield b"\r\n"
            for child in children:
                yield from emit(
                    os.path.join(host_path, child),
                    f"{name}/{child}",
                    f"{relative}/{child}" if relative else child,
                )
        elif stat_module.S_ISLNK(st.st_mode):
            yield _part_header(boundary, name, "application/symlink")
            yield target.encode("utf-8", "surrogateescape")
            yield b"\r\n"
            if counter is not None:
                counter.files += 1
        elif stat_module.S_ISREG(st.st_mode):
            yield _part_header(boundary, name, "application/octet-stream")
            try:
                if counter is None:
                    yield from _file_chunks(host_path)
                else:
                    for chunk in _file_chunks(host_path):
                        counter.bytes += len(chunk)  # counted before the send: off by <1 chunk
                        yield chunk
            except OSError as error:
                raise _UnreadableEntry(host_path, error) from None
            yield b"\r\n"
            if counter is not None:
                counter.files += 1
        else:
            kind = next((k for test, k in _NO_UNIXFS_FORM if test(st.st_mode)), "a special file")
            left_out.append(LeftOut(relative, kind))

    yield from emit(str(root), root_name, "")
    yield f"--{boundary}--\r\n".encode()


def _is_empty_directory(path: Path) -> bool:
    if not stat_module.S_ISDIR(path.lstat().st_mode):
        return False
    with os.scandir(path) as entries:
        return next(entries, None) is None


def _retried_mfs_write(write: Callable[[], _T]) -> _T:
    """`write()` (an MFS `cp`, idempotent), done again when Kubo lost what it had just made.

    Kubo's MFS can lose a directory or file that a request has just made when other requests
    change MFS at the same time ("cp: cannot flush the created file ...: file does not
    exist"; seen with the result index written while `--each` composes its entries, and
    reproduced with parallel `files cp` alone), and two requests making the same parent
    directory at once fail one of them ("file already exists", though `--force` replaces an
    existing entry): done again, the write goes through.
    """
    for attempt in range(_MFS_WRITE_ATTEMPTS):
        try:
            return write()
        except IpfsError as error:
            raced = "does not exist" in str(error) or "already exists" in str(error)
            if not raced or attempt == _MFS_WRITE_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


# The entries of a compose as a tree: a name maps to a CID, or to the edits of a directory.
_Edits = dict[str, "str | _Edits"]


def _edits(entries: Mapping[str, str]) -> _Edits | None:
    """`entries` ({"a/b": CID}) as a tree of edits; None where MFS decides the outcome: a
    name that is not usable (MFS says why), or one entry inside another ("a" and "a/b")."""
    tree: _Edits = {}
    for name, cid in entries.items():
        steps = name.strip("/").split("/")
        if any(step in ("", ".", "..") for step in steps):
            return None
        node = tree
        for step in steps[:-1]:
            child = node.setdefault(step, {})
            if isinstance(child, str):
                return None
            node = child
        if steps[-1] in node:
            return None
        node[steps[-1]] = cid
    return tree


def _flat(edits: _Edits, prefix: str = "") -> dict[str, str]:
    """The entries a tree of edits came from."""
    flat: dict[str, str] = {}
    for name, edit in edits.items():
        if isinstance(edit, str):
            flat[prefix + name] = edit
        else:
            flat.update(_flat(edit, f"{prefix}{name}/"))
    return flat


def _link_index(links: list[bytes], name: str) -> tuple[int, bool]:
    """Where `name` is, or goes, among a directory's `links` (sorted by the bytes of their
    names, as dag-pb requires), and whether it is there: a binary search."""
    wanted = name.encode("utf-8", "surrogateescape")
    low, high = 0, len(links)
    while low < high:
        middle = (low + high) // 2
        if dag_pb_link_name_size(links[middle])[0].encode("utf-8", "surrogateescape") < wanted:
            low = middle + 1
        else:
            high = middle
    found = low < len(links) and dag_pb_link_name_size(links[low])[0] == name
    return low, found
