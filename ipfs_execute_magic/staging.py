"""Rootfs and input CIDs turned into ready-to-bind directories, cached by CID.

A rootfs is a `.tar.gz`, `.tar.zst` or `.tar` file CID, or a directory CID used as the root
itself. An input is a directory CID. Both are fetched once, extracted safely (never following a
symlink on the host) and reused read-only by every later run.
"""

from __future__ import annotations

import os
import stat as stat_module
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from . import archive
from .cache import ContentCache
from .errors import BadRootfsError, StagingError, UsageError
from .store import Store

# Where the sandbox mounts things: these must be real directories in the staged root, because
# bwrap 0.8 follows symlinks while creating mount points (it could create files on the host).
MOUNT_POINTS = ("input", "output", "tmp", "proc", "dev")
ENTRY_POINT = "sbin/init"

# The empty directory under the import settings the store sends: needs no fetching.
EMPTY_DIRECTORY_CID = "bafybeiczsscdsbs7ffqz55asqdf3smv6klcw3gofszvwlyarci47bgf354"

ProgressCallback = Callable[[str, int, "int | None"], None]  # (what, bytes so far, total)


@dataclass(frozen=True)
class StagedTree:
    cid: str
    path: Path
    was_cached: bool
    seconds: float


class _CountingReader:
    """Reports progress as a stream is read (for the notebook's progress line)."""

    def __init__(self, stream: BinaryIO, what: str, total: int | None,
                 on_progress: ProgressCallback | None) -> None:
        self._stream = stream
        self._what = what
        self._total = total
        self._on_progress = on_progress
        self._done = 0
        self._last_report = 0.0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._done += len(data)
        now = time.monotonic()
        if self._on_progress and (now - self._last_report > 0.2 or not data):
            self._last_report = now
            self._on_progress(self._what, self._done, self._total)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._stream.close()


class Stager:
    def __init__(self, store: Store, cache: ContentCache, *,
                 on_progress: ProgressCallback | None = None) -> None:
        self.store = store
        self.cache = cache
        self.on_progress = on_progress

    # -- public ----------------------------------------------------------------------------

    def stage_rootfs(self, cid: str) -> StagedTree:
        started = time.monotonic()
        ready = self.cache.get("rootfs", cid)
        if ready is not None:
            return StagedTree(cid, ready, True, time.monotonic() - started)
        path = self.cache.fill("rootfs", cid, lambda tmp: self._fill_rootfs(cid, tmp))
        return StagedTree(cid, path, False, time.monotonic() - started)

    def stage_input(self, cid: str) -> StagedTree:
        started = time.monotonic()
        ready = self.cache.get("input", cid)
        if ready is not None:
            return StagedTree(cid, ready, True, time.monotonic() - started)
        if cid == EMPTY_DIRECTORY_CID:
            path = self.cache.fill("input", cid, lambda tmp: None)
        else:
            path = self.cache.fill("input", cid, lambda tmp: self._fill_input(cid, tmp))
        return StagedTree(cid, path, False, time.monotonic() - started)

    # -- filling ---------------------------------------------------------------------------

    def _fill_rootfs(self, cid: str, dest: Path) -> None:
        kind = self.store.stat(cid)
        if kind.kind == "directory":
            self._extract_directory(cid, dest, what=f"rootfs {cid}")
            _make_files_executable(dest)
        elif kind.kind == "file":
            stream = _CountingReader(self.store.cat_stream(cid), f"rootfs {cid}", kind.size,
                                     self.on_progress)
            try:
                archive.extract(stream, dest, name=f"rootfs {cid}",  # type: ignore[arg-type]
                                require_end_marker=True)
            finally:
                stream.close()
        else:
            raise BadRootfsError(f"rootfs {cid} is a {kind.kind}; give a .tar.gz/.tar.zst/.tar "
                                 "file CID or a directory CID")
        check_rootfs(dest, cid)

    def _fill_input(self, cid: str, dest: Path) -> None:
        kind = self.store.stat(cid)
        if kind.kind != "directory":
            raise UsageError(f"input {cid} is a {kind.kind}, not a directory: put it in one, "
                             f"e.g. `ipfs-mkdir data.bin {cid}`")
        self._extract_directory(cid, dest, what=f"input {cid}")

    def _extract_directory(self, cid: str, dest: Path, *, what: str) -> None:
        total = None
        stream = _CountingReader(self.store.tar_stream(cid), what, total, self.on_progress)
        try:
            archive.extract(stream, dest, name=what, compression="tar",  # type: ignore[arg-type]
                            require_end_marker=True)
        finally:
            stream.close()
        _hoist_single_top(dest, cid)


def _hoist_single_top(dest: Path, top_name: str) -> None:
    """`get` wraps the tree in a directory named after the CID: make its content the entry."""
    top = dest / top_name
    if not top.is_dir() or top.is_symlink():
        raise StagingError(f"fetching {top_name} gave an unexpected tar layout")
    parked = dest.parent / f".{dest.name}.top"
    os.rename(top, parked)
    for child in os.listdir(parked):
        os.rename(parked / child, dest / child)
    os.rmdir(parked)
    os.chmod(dest, 0o755)


def _make_files_executable(root: Path) -> None:
    """UnixFS directories carry no file modes (unless added with preserve-mode), so a directory
    used as a root would have no executable at all: make every regular file executable."""
    for folder, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            if stat_module.S_ISREG(st.st_mode):
                os.chmod(path, 0o755)


def check_rootfs(root: Path, cid: str) -> None:
    """Refuse a root whose mount points are not real directories; create missing ones."""
    for name in MOUNT_POINTS:
        path = root / name
        try:
            st = path.lstat()
        except FileNotFoundError:
            path.mkdir(mode=0o755)
            continue
        if not stat_module.S_ISDIR(st.st_mode):
            kind = "a symlink" if stat_module.S_ISLNK(st.st_mode) else "not a directory"
            raise BadRootfsError(f"rootfs {cid}: /{name} is {kind}; it must be a real directory "
                                 "(the sandbox mounts over it)")
    init = root / ENTRY_POINT
    try:
        st = init.lstat()
    except FileNotFoundError:
        raise BadRootfsError(f"rootfs {cid} has no /{ENTRY_POINT}: the payload starts as "
                             f"`/{ENTRY_POINT} ARGS...`; add one to the image") from None
    if stat_module.S_ISREG(st.st_mode) and not st.st_mode & 0o111:
        raise BadRootfsError(f"rootfs {cid}: /{ENTRY_POINT} is not executable")
    if stat_module.S_ISDIR(st.st_mode):
        raise BadRootfsError(f"rootfs {cid}: /{ENTRY_POINT} is a directory")
