"""Values the front ends hand to users: a run's result and references to IPFS content.

`str()` of each is its CID (or IPFS path), so they can be used wherever a CID is expected:
`ie.run(rootfs, counts, ...)`, `%%ipfs_execute $rootfs $counts`, `{counts}/rootfs.tar.gz`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from .record import RunRecord

if TYPE_CHECKING:
    from .store import Entry, Store

TAIL_BYTES = 1024 * 1024  # how much of each output stream a result keeps in memory


class IpfsRef(str):
    """A CID or IPFS path that is also a string. `ref / "sub/file"` makes a sub path."""

    __slots__ = ("_store",)
    _store: Store | None

    def __new__(cls, path: str, store: Store | None = None) -> IpfsRef:
        ref = super().__new__(cls, path)
        ref._store = store
        return ref

    @property
    def cid(self) -> str:
        return str(self).removeprefix("/ipfs/").split("/")[0]

    def __truediv__(self, sub: str) -> IpfsRef:
        return IpfsRef(f"{str(self).rstrip('/')}/{str(sub).strip('/')}", self._store)

    def __repr__(self) -> str:
        return f"IpfsRef({str(self)!r})"

    def _require_store(self) -> Store:
        if self._store is None:
            from . import default_runner

            self._store = default_runner().store
        return self._store

    def read_bytes(self, path: str = "") -> bytes:
        target = self / path if path else self
        return self._require_store().cat(str(target))

    def read_text(self, path: str = "", encoding: str = "utf-8") -> str:
        return self.read_bytes(path).decode(encoding)

    def ls(self, path: str = "") -> list[Entry]:
        store = self._require_store()
        return store.ls(store.resolve(str(self / path if path else self)))

    def download(
        self,
        dest: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        on_progress: Callable[[str, int, int | None], None] | None = None,
    ) -> Path:
        """Write this file or tree to `dest` (see `ie.get`); return where it was written."""
        from .retrieval import retrieve

        store = self._require_store()
        return retrieve(store, str(self), dest, overwrite=overwrite, on_progress=on_progress).path


class FileEntry(NamedTuple):
    path: str  # relative to the root listed, '/'-separated
    kind: str  # "file", "directory" or "symlink"
    size: int
    cid: str


@dataclass
class RunResult:
    """A finished run: its record, what it printed, and its /output to read and chain."""

    record: RunRecord
    stdout: bytes = b""
    stderr: bytes = b""
    store: Store | None = field(default=None, repr=False, compare=False)
    record_cid: str | None = None  # the run record in IPFS (`ipfs cat` it)
    cache_hit: bool = False  # True: nothing ran, this is the recorded result of an earlier run
    disagreement: str | None = None  # a forced re-run gave another output than the cache had
    # Who attests this output (trust.TrustSummary.describe()), e.g. "reproduced by 3 keys,
    # 2 trusted"; and a note when a hit was served on no trusted key's word (--trust-any).
    trust: str | None = None
    trust_note: str | None = None
    _listing: list[FileEntry] | None = field(default=None, repr=False, compare=False)

    # -- the CIDs --------------------------------------------------------------------------

    @property
    def output(self) -> IpfsRef:
        if self.record.output is None:
            raise ValueError("this run has no output CID")
        return IpfsRef(self.record.output, self.store)

    @property
    def input(self) -> IpfsRef:
        return IpfsRef(self.record.input, self.store)

    @property
    def rootfs(self) -> IpfsRef:
        return IpfsRef(self.record.rootfs, self.store)

    @property
    def exit_status(self) -> int | None:
        return self.record.exit_status

    @property
    def ok(self) -> bool:
        return self.record.succeeded

    @property
    def duration(self) -> float:
        return self.record.durations.get("total", 0.0)

    def __str__(self) -> str:
        return self.record.output or ""

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __truediv__(self, sub: str) -> IpfsRef:
        return self.output / sub

    # -- reading the output ----------------------------------------------------------------

    def files(self) -> list[FileEntry]:
        """Everything under /output, depth first (cached: the output is immutable)."""
        if self._listing is None:
            assert self.store is not None
            self._listing = [
                FileEntry(path, entry.kind, entry.size, entry.cid)
                for path, entry in self.store.walk(str(self.output))
            ]
        return self._listing

    def ls(self, path: str = "") -> list[Entry]:
        return self.output.ls(path)

    def read_bytes(self, path: str) -> bytes:
        return self.output.read_bytes(path)

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.output.read_text(path, encoding)

    def download(
        self,
        dest: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        on_progress: Callable[[str, int, int | None], None] | None = None,
    ) -> Path:
        """Write /output to the new directory `dest` (see `ie.get`); return `dest`."""
        return self.output.download(dest, overwrite=overwrite, on_progress=on_progress)

    @property
    def stdout_text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def stderr_text(self) -> str:
        return self.stderr.decode("utf-8", "replace")


class StreamTail:
    """Keeps the last TAIL_BYTES of a stream and passes each chunk on."""

    def __init__(self, forward: Callable[[bytes], None] | None = None) -> None:
        self._buffer = bytearray()
        self._forward = forward

    def __call__(self, chunk: bytes) -> None:
        self._buffer += chunk
        if len(self._buffer) > 2 * TAIL_BYTES:
            del self._buffer[:-TAIL_BYTES]
        if self._forward is not None:
            self._forward(chunk)

    def value(self) -> bytes:
        return bytes(self._buffer[-TAIL_BYTES:])
