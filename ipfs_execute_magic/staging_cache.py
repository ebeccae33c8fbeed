"""Staged trees on disk: a rootfs or input tree, keyed by its CID (the staging cache).

Layout under `root`:

    <kind>/<key>/        ready entries (only ever appear by an atomic rename)
    tmp/<kind>.<key>.*   entries being filled (or left behind by a killed filler)
    locks/<kind>.<key>   flock files: one filler per key, across processes and threads

A CID names immutable content, so a ready entry never changes and is reused by every later run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["StagingCache", "remove_tree"]

_KIND = re.compile(r"[a-z][a-z0-9-]{0,31}")
_KEY = re.compile(r"[A-Za-z0-9]{1,200}")
# The cache's own directories are private: the sandbox reaches a staged tree through a bind
# made for it, so no other user needs to traverse them.
_DIR_MODE = 0o700
# The root of a staged tree is what the payload sees as / or /input: its mode is part of the
# run's view and stays as it always was.
_TREE_MODE = 0o755


class StagingCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._tmp = self.root / "tmp"
        self._locks = self.root / "locks"

    def path_for(self, kind: str, key: str) -> Path:
        """Where the entry lives once it is ready."""
        _check_name(kind, key)
        return self.root / kind / key

    def get(self, kind: str, key: str) -> Path | None:
        """The ready entry, or None. One stat: this is on the warm path of every run."""
        path = self.path_for(kind, key)
        try:
            return path if stat.S_ISDIR(os.stat(path).st_mode) else None
        except FileNotFoundError:
            return None

    def fill(self, kind: str, key: str, filler: Callable[[Path], None]) -> Path:
        """The entry, created first if need be by `filler(tmpdir)`.

        Only one caller fills a key at a time; the others wait for it and reuse its result. If
        the filler raises, nothing is kept, the exception propagates and the next caller tries
        again.
        """
        final = self.path_for(kind, key)
        if self.get(kind, key) is not None:
            return final
        for directory in (self.root, self.root / kind, self._tmp, self._locks):
            _make_dir(directory)
        with self._locked(kind, key):
            if self.get(kind, key) is not None:
                return final  # filled by whoever held the lock before us
            self._remove_stale_tmp(held=(kind, key))
            work = Path(tempfile.mkdtemp(prefix=f"{kind}.{key}.", dir=self._tmp))
            try:
                os.chmod(work, _TREE_MODE)
                filler(work)
                os.rename(work, final)
            except BaseException:
                remove_tree(work)
                raise
        return final

    def remove(self, kind: str, key: str) -> None:
        """Delete the entry if it exists; a filler of the same key is waited for."""
        final = self.path_for(kind, key)
        if not os.path.lexists(final):
            return
        for directory in (self._tmp, self._locks):
            _make_dir(directory)
        with self._locked(kind, key):
            # Renamed away first, so that get() never returns a half-deleted tree.
            doomed = Path(tempfile.mkdtemp(prefix=f"{kind}.{key}.", dir=self._tmp))
            try:
                os.rename(final, doomed / "entry")
            except FileNotFoundError:
                pass
            remove_tree(doomed)

    def entries(self, kind: str) -> list[str]:
        """Keys of the ready entries of this kind."""
        _check_name(kind, "x")
        try:
            names = os.listdir(self.root / kind)
        except FileNotFoundError:
            return []
        return sorted(
            name for name in names if _KEY.fullmatch(name) and self.get(kind, name) is not None
        )

    @contextlib.contextmanager
    def _locked(self, kind: str, key: str, *, blocking: bool = True) -> Iterator[bool]:
        """Hold the key's lock (yields False if not blocking and somebody else holds it)."""
        fd = os.open(self._locks / f"{kind}.{key}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True  # the lock goes with the fd: closing it releases, even if we are killed
        finally:
            os.close(fd)

    def _remove_stale_tmp(self, held: tuple[str, str]) -> None:
        """Remove work dirs of fillers that died; a live filler holds its key's lock.

        `held` is the key whose lock the caller holds: its work dirs are all stale.
        """
        try:
            names = os.listdir(self._tmp)
        except FileNotFoundError:
            return
        for name in names:
            kind, _, rest = name.partition(".")
            key = rest.partition(".")[0]
            if not (_KIND.fullmatch(kind) and _KEY.fullmatch(key)):
                continue
            # Never wait here: we hold a lock already, and a live filler may hold this one.
            try:
                if (kind, key) == held:
                    remove_tree(self._tmp / name)
                    continue
                with self._locked(kind, key, blocking=False) as free:
                    if free:
                        remove_tree(self._tmp / name)
            except (OSError, RecursionError):
                # A leftover that cannot be removed must not stop every later fill.
                continue


def _check_name(kind: str, key: str) -> None:
    if not _KIND.fullmatch(kind):
        raise ValueError(f"cache kind {kind!r} must be a short lowercase word")
    if not _KEY.fullmatch(key):
        raise ValueError(f"cache key {key!r} must be a CID (letters and digits only)")


def _make_dir(path: Path) -> None:
    try:
        os.mkdir(path, _DIR_MODE)
    except FileExistsError:
        info = os.stat(path)
        if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) & 0o077:
            os.chmod(path, _DIR_MODE)  # made by a version that let the sandbox uid traverse it
        return
    except FileNotFoundError:
        _make_dir(path.parent)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, _DIR_MODE)
    os.chmod(path, _DIR_MODE)  # whatever the umask


def remove_tree(path: Path) -> None:
    """rmtree that never follows symlinks and copes with read-only directories."""
    try:
        shutil.rmtree(path)  # fd-based on Linux: it does not follow symlinks
        return
    except FileNotFoundError:
        return
    except PermissionError:
        pass
    _add_owner_rwx(path)
    shutil.rmtree(path)


def _add_owner_rwx(top: Path) -> None:
    """Give the owner rwx on every directory of a tree, without following any symlink."""
    pending = [str(top)]
    while pending:
        path = pending.pop()
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                continue
            if st.st_mode & 0o700 != 0o700:
                os.chmod(path, stat.S_IMODE(st.st_mode) | 0o700)
            with os.scandir(path) as listing:
                pending.extend(
                    entry.path for entry in listing if entry.is_dir(follow_symlinks=False)
                )
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
