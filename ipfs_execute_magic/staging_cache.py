"""Staged trees on disk: a rootfs or input tree, keyed by its CID (the staging cache).

Layout under `root`:

    <kind>/<key>/        ready entries (only ever appear by an atomic rename)
    tmp/<kind>.<key>.*   entries being filled (or left behind by a killed filler)
    locks/<kind>.<key>   flock files: one filler per key, across processes and threads
    locks/<kind>.<key>.use  shared flock held by each run using the entry (`use`); its mtime
                         is the entry's last use (the trees' own mtimes are the payload's)
    sizes/<kind>.<key>.<bytes>  empty: its name is the entry's disk usage, measured once when
                         it was filled (one listing sums the cache after each fill)

A CID names immutable content, so a ready entry never changes and is reused by every later run.
With a limit, a fill that takes the cache past it evicts the least recently used entries that
no run holds (`evict`); an entry in use is never removed.
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
from typing import NamedTuple

__all__ = ["CacheEntry", "StagingCache", "disk_usage", "remove_tree"]

_KIND = re.compile(r"[a-z][a-z0-9-]{0,31}")
_KEY = re.compile(r"[A-Za-z0-9]{1,200}")
# The cache's own directories are private: the sandbox reaches a staged tree through a bind
# made for it, so no other user needs to traverse them.
_DIR_MODE = 0o700
# The root of a staged tree is what the payload sees as / or /input: its mode is part of the
# run's view and stays as it always was.
_TREE_MODE = 0o755
# Directories of the cache itself, never a kind of entry.
_RESERVED = frozenset({"tmp", "locks", "sizes"})


class CacheEntry(NamedTuple):
    """One ready entry: its disk usage, when a run last used it, whether one uses it now."""

    kind: str
    key: str
    bytes: int
    last_used: float  # seconds since the epoch
    in_use: bool


class StagingCache:
    def __init__(self, root: Path, *, limit_bytes: int | None = None) -> None:
        self.root = Path(root)
        # None: unbounded (private staging directories of a verification, tests).
        self.limit_bytes = limit_bytes
        self._tmp = self.root / "tmp"
        self._locks = self.root / "locks"
        self._sizes = self.root / "sizes"
        self._locks_ready = False

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
                size = disk_usage(work)
                os.rename(work, final)
            except BaseException:
                remove_tree(work)
                raise
            self._write_size(kind, key, size)
        # Only a fill grows the cache, so only a fill checks the limit; the entry just filled
        # is safe if the caller holds it with `use`, as runs do.
        if self.limit_bytes is not None and self._recorded_total() > self.limit_bytes:
            self.evict(self.limit_bytes)
        return final

    @contextlib.contextmanager
    def use(self, kind: str, key: str) -> Iterator[None]:
        """Hold the entry (ready or not yet) against eviction, and stamp its last use.

        Take it before `get` or `fill` and keep it until the sandbox has ended.
        """
        _check_name(kind, key)
        if not self._locks_ready:  # once: a run holds a hundred entries staged by parts
            for directory in (self.root, self._locks):
                _make_dir(directory)
            self._locks_ready = True
        path = self._locks / f"{kind}.{key}.use"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                if _is_file_at(fd, path):
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # an eviction unlinked this lock while we waited: take the new one
        try:
            os.utime(fd)
            yield
        finally:
            os.close(fd)

    def usage(self) -> list[CacheEntry]:
        """Every ready entry, least recently used first."""
        found = []
        recorded = self._recorded_sizes()
        for kind in self._kinds():
            for key in self.entries(kind):
                use_lock = self._locks / f"{kind}.{key}.use"
                size, size_file = recorded.get((kind, key), (None, ""))
                if size is None:  # filled by a version that did not record sizes
                    size = disk_usage(self.path_for(kind, key))
                    self._write_size(kind, key, size)
                    size_file = f"{kind}.{key}.{size}"
                last_used = 0.0  # never used by a run that stamps it: the first to go
                for stamp in (use_lock, self._sizes / size_file):
                    with contextlib.suppress(FileNotFoundError):
                        last_used = os.stat(stamp).st_mtime
                        break
                found.append(CacheEntry(kind, key, size, last_used, self._in_use(use_lock)))
        return sorted(found, key=lambda entry: (entry.last_used, entry.kind, entry.key))

    def evict(self, keep_bytes: int = 0) -> list[CacheEntry]:
        """Remove least recently used entries that no run holds until at most `keep_bytes`
        remain (0: all that can go). Returns what was removed."""
        entries = self.usage()
        total = sum(entry.bytes for entry in entries)
        removed = []
        for entry in entries:
            if total <= keep_bytes:
                break
            if self._evict(entry.kind, entry.key):
                total -= entry.bytes
                removed.append(entry)
        return removed

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
            for name in self._size_files(kind, key):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._sizes / name)
            remove_tree(doomed)

    def take(self, kind: str, key: str, dest: Path) -> bool:
        """Move the ready entry's tree onto `dest` (an empty directory of this cache's file
        system) and forget the entry; False, changing nothing, when it is not there or a run
        holds it."""
        use_lock = self._locks / f"{kind}.{key}.use"
        try:
            fd = os.open(use_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # in use
            if not _is_file_at(fd, use_lock):
                return False  # evicted meanwhile
            with self._locked(kind, key):
                try:
                    os.rename(self.path_for(kind, key), dest)
                except FileNotFoundError:
                    return False
                for name in self._size_files(kind, key):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self._sizes / name)
            os.unlink(use_lock)  # as eviction does: a run waiting on it locks anew
            return True
        finally:
            os.close(fd)

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

    def recently_used(self, kind: str, *, min_bytes: int = 0) -> list[str]:
        """Keys of the ready entries of this kind (of at least `min_bytes` if given), the most
        recently used first."""
        if min_bytes:  # from the size records of this kind: the few big ones, not every entry
            recorded = self._recorded_sizes(kind)
            keys = [
                key
                for (_, key), (size, _) in recorded.items()
                if size >= min_bytes and self.get(kind, key) is not None
            ]
        else:
            keys = self.entries(kind)
        stamped = []
        for key in keys:
            try:
                stamped.append((os.stat(self._locks / f"{kind}.{key}.use").st_mtime, key))
            except FileNotFoundError:
                stamped.append((0.0, key))  # never used by a run: last
        return [key for _, key in sorted(stamped, reverse=True)]

    def sweep_use_locks(self) -> int:
        """Delete use locks of entries that do not exist (a run whose CID could not be staged)
        and that no run holds; returns how many went."""
        try:
            names = os.listdir(self._locks)
        except FileNotFoundError:
            return 0
        swept = 0
        for name in names:
            kind, _, rest = name.partition(".")
            key, _, suffix = rest.partition(".")
            if suffix != "use" or not (_KIND.fullmatch(kind) and _KEY.fullmatch(key)):
                continue
            if self.get(kind, key) is None and self._evict(kind, key):
                swept += 1
        return swept

    def _evict(self, kind: str, key: str) -> bool:
        """Remove the entry unless a run holds it (then False)."""
        path = self._locks / f"{kind}.{key}.use"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            return False  # the cache itself went away
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            if not _is_file_at(fd, path):
                return False  # evicted meanwhile by somebody else
            self.remove(kind, key)
            # Unlinked while held: a run waiting on this file sees it is gone and locks anew.
            os.unlink(path)
            return True
        finally:
            os.close(fd)

    def _in_use(self, use_lock: Path) -> bool:
        try:
            fd = os.open(use_lock, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def _kinds(self) -> list[str]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(name for name in names if _KIND.fullmatch(name) and name not in _RESERVED)

    def _write_size(self, kind: str, key: str, size: int) -> None:
        # A key is filled once, and its records go with it (`remove`, `take`): no other to
        # replace.
        _make_dir(self._sizes)
        name = f"{kind}.{key}.{size}"
        os.close(os.open(self._sizes / name, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))

    def _size_files(self, kind: str, key: str) -> list[str]:
        try:
            names = os.listdir(self._sizes)
        except FileNotFoundError:
            return []
        record = f"{kind}.{key}"  # the older format's name; now followed by ".<bytes>"
        return [
            name
            for name in names
            if name == record
            or (
                name.startswith(f"{record}.")
                and name.rpartition(".")[2].isdigit()
                and name.count(".") == 2
            )
        ]

    def _recorded_sizes(self, kind: str | None = None) -> dict[tuple[str, str], tuple[int, str]]:
        """(kind, key) -> (bytes, the file that says so), from one listing (and a read of each
        record in the older format, whose size was the file's content); of one kind if
        given."""
        try:
            names = os.listdir(self._sizes)
        except FileNotFoundError:
            return {}
        if kind is not None:
            names = [name for name in names if name.startswith(f"{kind}.")]
        sizes: dict[tuple[str, str], tuple[int, str]] = {}
        for name in names:
            name_kind, _, rest = name.partition(".")
            key, _, size = rest.partition(".")
            if not (_KIND.fullmatch(name_kind) and _KEY.fullmatch(key)):
                continue
            if size.isdigit():
                sizes[(name_kind, key)] = (int(size), name)
            elif not size:
                try:
                    recorded = int((self._sizes / name).read_text())
                    # Renamed to the current format: read once, never again.
                    os.rename(self._sizes / name, self._sizes / f"{name}.{recorded}")
                except (FileNotFoundError, ValueError):
                    continue
                sizes.setdefault((name_kind, key), (recorded, f"{name}.{recorded}"))
        return sizes

    def _recorded_total(self) -> int:
        """The sum of the recorded sizes: one directory listing."""
        return sum(size for size, _ in self._recorded_sizes().values())

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


def _is_file_at(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is still the one at `path` (not unlinked or replaced)."""
    try:
        here = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


def disk_usage(path: Path) -> int:
    """Bytes of disk a tree takes, as `du` counts them (hard links once, symlinks not
    followed); 0 if it does not exist."""
    total = 0
    seen: set[tuple[int, int]] = set()
    pending = [str(path)]
    while pending:
        current = pending.pop()
        try:
            info = os.lstat(current)
        except OSError:
            continue
        if info.st_nlink > 1:
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
        total += info.st_blocks * 512
        if stat.S_ISDIR(info.st_mode):
            try:
                with os.scandir(current) as listing:
                    pending.extend(entry.path for entry in listing)
            except OSError:
                continue  # unreadable: counted as far as it can be
    return total


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
