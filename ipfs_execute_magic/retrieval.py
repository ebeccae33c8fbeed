"""IPFS content written to a local path: `ie.get`, `result.download`, `ipfs-execute get`.

A raw block (always a file) is streamed from `cat`; anything else is the tar stream of `get`,
written by the safe extractor (archive.py), which never follows a symlink on the host and
refuses escapes and devices. (Kubo's stat calls a UnixFS symlink a file: only the tar tells.) Either is written into a temporary directory next to DEST and renamed
into place at the end, so an error or Ctrl-C leaves nothing behind.

Modes are the extractor's normalised ones (0644, 0755 for executables and directories; a file
from `cat` is 0644). Times are those of the download: content added without preserve-mtime
has none, and `get` stamps everything with the time of the request.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat as stat_module
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from . import archive
from .cid import EMPTY_DIRECTORY_CID, EMPTY_FILE_CID, IpfsPath, cid_codec
from .errors import IpfsExecuteError, RetrievalError, UsageError
from .store import Store

ProgressCallback = Callable[[str, int, "int | None"], None]  # (what, bytes so far, total)

_CHUNK = 1024 * 1024
_REPORT_SECONDS = 0.1
_REPORT_BYTES = 4 * 1024 * 1024
# The user asked for this content: only the disk bounds it (staging keeps archive.py's limits).
_LIMITS = archive.ArchiveLimits(max_members=2**40, max_total_bytes=2**62, max_member_bytes=2**62)


@dataclass(frozen=True)
class Retrieved:
    """What `retrieve` wrote."""

    cid: str
    path: Path  # where it is now (DEST, or DEST/NAME for a file into a directory)
    kind: str  # "file", "directory" or "symlink"
    files: int  # regular files written
    bytes: int  # their total size


class _Progress:
    """Counts bytes as they arrive; reports at most every 0.1 s or 4 MiB, and at the end."""

    def __init__(self, what: str, total: int | None, callback: ProgressCallback | None) -> None:
        self.what = what
        self.total = total
        self.callback = callback
        self.done = 0
        self._last_time = 0.0
        self._last_done = 0

    def add(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if self.callback is not None and (
            now - self._last_time >= _REPORT_SECONDS or self.done - self._last_done >= _REPORT_BYTES
        ):
            self._report(now)

    def finish(self) -> None:
        if self.callback is not None and (self._last_time == 0.0 or self._last_done != self.done):
            self._report(time.monotonic())

    def _report(self, now: float) -> None:
        assert self.callback is not None
        self._last_time, self._last_done = now, self.done
        # A tar stream carries headers too: never report more than the file's size.
        done = self.done if self.total is None else min(self.done, self.total)
        self.callback(self.what, done, self.total)


class _CountingSource:
    """A stream that tells `_Progress` how much was read from it (for the extractor)."""

    def __init__(self, stream: BinaryIO, progress: _Progress) -> None:
        self._stream = stream
        self._progress = progress

    def read(self, size: int = -1, /) -> bytes:
        data = self._stream.read(size)
        self._progress.add(len(data))
        return data


def retrieve(
    store: Store,
    source: str,
    dest: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    on_progress: ProgressCallback | None = None,
) -> Retrieved:
    """Write the file, directory or symlink at `source` (a CID or IPFS path) to `dest`.

    A directory becomes `dest` itself, which must not exist or be an empty directory. A file
    becomes `dest`, or `dest/NAME` when `dest` is an existing directory (as `cp` does; NAME is
    the last component of the path, else the CID). An existing destination is replaced only
    with `overwrite`.
    """
    parsed = IpfsPath.parse(str(source))  # a malformed path fails before any daemon contact
    what = str(parsed)
    cid = store.resolve(parsed)
    if cid == EMPTY_FILE_CID:  # nothing to fetch; peers do not reliably serve it
        kind, size = "file", 0
    elif cid == EMPTY_DIRECTORY_CID:
        kind, size = "directory", 0
    else:
        found = store.stat(cid)
        kind, size = found.kind, found.size
    target = _target(Path(dest), kind, parsed.sub.rpartition("/")[2] or cid, overwrite)
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as error:
        raise RetrievalError(
            f"cannot write {what} to {target}: {error.strerror} ({target.parent}); "
            "choose a directory you can write to"
        ) from None
    try:
        fetched = work / cid
        progress = _Progress(what, size if kind == "file" else None, on_progress)
        if cid == EMPTY_DIRECTORY_CID:
            os.mkdir(fetched, 0o755)
            files, written = 0, 0
        elif kind == "file" and (cid == EMPTY_FILE_CID or cid_codec(cid) == "raw"):
            files, written = 1, _write_file(store, cid, fetched, size, what, progress)
        else:
            files, written = _extract(store, cid, work, fetched, what, progress)
            if fetched.is_symlink():
                kind = "symlink"
        progress.finish()
        _put_in_place(fetched, target, work / ".replaced", overwrite)
    except IpfsExecuteError:
        raise
    except OSError as error:
        raise RetrievalError(
            f"cannot write {what} to {target}: {error.strerror}: check that its directory is "
            "writable and has room"
        ) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Retrieved(cid, target, kind, files, written)


def _target(dest: Path, kind: str, name: str, overwrite: bool) -> Path:
    """Where the content goes; refuses an existing destination unless `overwrite`."""
    found = _lstat(dest)
    # Into an existing directory, as `cp` does; a symlink to one is never followed.
    if kind != "directory" and found is not None and stat_module.S_ISDIR(found.st_mode):
        dest, found = dest / name, _lstat(dest / name)
    if not dest.parent.is_dir():
        raise UsageError(f"cannot write to {dest}: {dest.parent} is not a directory; create it")
    if found is None or overwrite:
        return dest
    if stat_module.S_ISDIR(found.st_mode):
        if kind == "directory" and not os.listdir(dest):
            return dest  # an empty directory is replaced by the rename, as if it were not there
        raise UsageError(
            f"{dest} is a directory that is not empty: give a new path, or replace it "
            "(--force / overwrite=True)"
        )
    raise UsageError(
        f"{dest} already exists: give a new path, or replace it (--force / overwrite=True)"
    )


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _write_file(
    store: Store, cid: str, path: Path, size: int, what: str, progress: _Progress
) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with open(os.open(path, flags, 0o644), "wb") as out:
        os.fchmod(out.fileno(), 0o644)  # whatever the umask, as the extractor's files
        if size == 0 and cid == EMPTY_FILE_CID:
            return 0
        stream = store.cat_stream(cid)
        try:
            while chunk := stream.read(_CHUNK):
                out.write(chunk)
                progress.add(len(chunk))
        finally:
            stream.close()
    if progress.done != size:
        raise RetrievalError(
            f"the download of {what} was cut after {progress.done} of {size} bytes; retry"
        )
    return size


def _extract(
    store: Store, cid: str, work: Path, fetched: Path, what: str, progress: _Progress
) -> tuple[int, int]:
    stream = store.tar_stream(cid)
    try:
        stats = archive.extract(
            _CountingSource(stream, progress),
            work,
            name=what,
            compression="tar",
            limits=_LIMITS,
            require_end_marker=True,
        )
    finally:
        stream.close()
    # `get` wraps the content in one member named after the CID.
    if _lstat(fetched) is None or len(os.listdir(work)) != 1:
        raise RetrievalError(f"fetching {what} gave an unexpected tar layout; retry")
    if fetched.is_dir() and not fetched.is_symlink():
        os.chmod(fetched, 0o755)
    return stats.files, stats.bytes


def _put_in_place(fetched: Path, target: Path, parking: Path, overwrite: bool) -> None:
    """Rename the finished content to `target` (atomic when `target` is absent, an empty
    directory, or a file replaced by a file); with `overwrite`, other kinds are moved aside
    first (into the work directory, removed after)."""
    try:
        os.rename(fetched, target)
    except OSError as error:
        if not overwrite or error.errno not in (
            errno.ENOTEMPTY,
            errno.EEXIST,
            errno.EISDIR,
            errno.ENOTDIR,
        ):
            raise
        os.rename(target, parking)
        try:
            os.rename(fetched, target)
        except OSError:
            os.rename(parking, target)  # the work directory is removed next: put it back
            raise


__all__ = ["ProgressCallback", "Retrieved", "retrieve"]
