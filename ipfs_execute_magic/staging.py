"""Rootfs and input CIDs turned into ready-to-bind directories, cached by CID.

A rootfs is a `.tar.gz`, `.tar.zst` or `.tar` file CID, or a directory CID used as the root
itself. An input is a directory CID. Both are fetched once, extracted safely (never following a
symlink on the host) and reused read-only by every later run.

Staged trees look the same wherever and whenever they were staged: modes are normalised by
archive.py and every mtime is SOURCE_DATE_EPOCH. What differs by file system (readdir order)
can be shuffled on purpose with `shuffled_view`, to expose payloads that depend on it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import stat as stat_module
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from . import sandbox  # its names load when used: a cache hit needs none of them
from .cid import EMPTY_DIRECTORY_CID, cid_codec
from .errors import BadRootfsError, StagingError, TruncatedStreamError, UsageError
from .sandbox.determinism import SOURCE_DATE_EPOCH
from .staging_cache import StagingCache
from .store import Entry, Stat, Store

ENTRY_POINT = "sbin/init"

# (what, done, total): staging reports "rootfs CID", "input CID" or "input entry NAME (CID)"
# with bytes; the runner adds the phases PHASE_RUNNING (0, None) and PHASE_ADDING_OUTPUT
# (files sent, files in /output), so one callback can show where a run is.
ProgressCallback = Callable[[str, int, "int | None"], None]
PHASE_RUNNING = "running"
PHASE_ADDING_OUTPUT = "adding output"


# An input of at least this many bytes is staged by parts (one staged tree per top-level
# entry, reused by CID): below it, one fetch of the whole is as quick as the parts' round trips.
PARTS_MIN_BYTES = 4 * 1024 * 1024
# More entries than this and the input is staged whole: each part is one mount for bwrap.
PARTS_MAX_ENTRIES = 256
# An entry changed in more places than this is staged anew rather than shown as its earlier
# version with the changes bound over it.
REPLACED_MAX = 64
# How many recently staged inputs are searched for an earlier version of an entry.
EARLIER_VERSIONS_SCANNED = 32
# A part's tree is this entry of its staging cache entry (a file part is a file).
_PART_TREE = "t"
_SKELETON_TREE = "tree"
_PARTS_MANIFEST = "parts.json"


@dataclass(frozen=True)
class StagedTree:
    cid: str
    path: Path
    was_cached: bool
    seconds: float
    # Staged by parts: `path` holds a mount point per top-level entry, and each entry's
    # own staged tree is bound over it, read-only (SandboxSpec.input_parts).
    parts: tuple[tuple[str, Path], ...] = ()


class _CountingReader:
    """Reports progress as a stream is read (for the notebook's progress line)."""

    def __init__(
        self, stream: BinaryIO, what: str, total: int | None, on_progress: ProgressCallback | None
    ) -> None:
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

    @property
    def bytes_read(self) -> int:
        return self._done

    def close(self) -> None:
        self._stream.close()


class Stager:
    def __init__(
        self,
        store: Store,
        staging_cache: StagingCache,
        *,
        on_progress: ProgressCallback | None = None,
    ) -> None:
        self.store = store
        self.staging_cache = staging_cache
        self.on_progress = on_progress

    # -- public ----------------------------------------------------------------------------

    def stage_rootfs(self, cid: str) -> StagedTree:
        started = time.monotonic()
        ready = self.staging_cache.get("rootfs", cid)
        if ready is not None:
            _settle_old_entry(ready)
            return StagedTree(cid, ready, True, time.monotonic() - started)
        # Checked before the staging cache makes anything: a wrong kind of CID stages nothing.
        found = self._rootfs_stat(cid)
        path = self.staging_cache.fill(
            "rootfs", cid, lambda tmp: self._fill_rootfs(cid, found, tmp)
        )
        return StagedTree(cid, path, False, time.monotonic() - started)

    def stage_input(
        self,
        cid: str,
        *,
        hold: contextlib.ExitStack | None = None,
        by_parts: bool = True,
    ) -> StagedTree:
        """The input's tree, staged whole or by parts.

        A big input is staged by parts: each top-level entry is a staged tree of its own,
        keyed by the entry's CID, so that an input differing from a staged one in a few entries
        (the cell's script, a replaced file, an added directory) costs only those. The payload
        sees the same tree either way. `hold` keeps every entry used against eviction until
        it is closed; `by_parts=False` stages whole (what a shuffled view needs).
        """
        started = time.monotonic()

        def use(kind: str, key: str) -> None:
            if hold is not None:
                hold.enter_context(self.staging_cache.use(kind, key))

        use("input", cid)
        ready = self.staging_cache.get("input", cid)
        if ready is not None:
            _settle_old_entry(ready)
            return StagedTree(cid, ready, True, time.monotonic() - started)
        if by_parts and cid != EMPTY_DIRECTORY_CID:
            use("parts", cid)
            skeleton = self.staging_cache.get("parts", cid)
            if skeleton is not None:
                manifest = json.loads((skeleton / _PARTS_MANIFEST).read_text())
                binds = [(str(path), str(part)) for path, part in manifest["binds"]]
                return StagedTree(
                    cid,
                    skeleton / _SKELETON_TREE,
                    True,
                    time.monotonic() - started,
                    self._stage_parts(binds, use),
                )
        if cid == EMPTY_DIRECTORY_CID:
            path = self.staging_cache.fill("input", cid, set_tree_mtimes)
            return StagedTree(cid, path, False, time.monotonic() - started)
        found = check_input_is_directory(self.store, cid)
        entries = self._top_entries(cid) if by_parts and found.size >= PARTS_MIN_BYTES else []
        if entries and _stageable_by_parts(entries):
            binds = []
            for entry in entries:
                use("part", entry.cid)
                reuse = None
                if entry.kind == "directory" and self.staging_cache.get("part", entry.cid) is None:
                    reuse = self._replacement_binds(entry.name, entry.cid, use)
                binds.extend(reuse or [(entry.name, entry.cid)])
            skeleton = self.staging_cache.fill(
                "parts", cid, functools.partial(_make_skeleton, entries=entries, binds=binds)
            )
            return StagedTree(
                cid,
                skeleton / _SKELETON_TREE,
                False,
                time.monotonic() - started,
                self._stage_parts(binds, use),
            )
        path = self.staging_cache.fill("input", cid, lambda tmp: self._fill_input(cid, tmp))
        return StagedTree(cid, path, False, time.monotonic() - started)

    def _top_entries(self, cid: str) -> list[Entry]:
        """An input's top-level entries, from its root block: the kind of an entry staged as a
        part is read from the part (no round trip), others from their own first block (none
        for a raw block). `ls` would read every child of a hundred big directories instead."""
        links = self.store.directory_links(cid)
        if links is None:
            return self.store.ls(cid)
        entries = []
        for name, child in links:
            part = self.staging_cache.get("part", child)
            if part is not None:
                mode = os.lstat(part / _PART_TREE).st_mode
                kind = "directory" if stat_module.S_ISDIR(mode) else "file"  # as _fill_part made it
            else:
                kind = self.store.unixfs_kind(child)
                kind = "directory" if kind == "sharded-directory" else kind
            entries.append(Entry(name=name, cid=child, size=0, kind=kind))
        return entries

    def _stage_parts(
        self, binds: list[tuple[str, str]], use: Callable[[str, str], None]
    ) -> tuple[tuple[str, Path], ...]:
        """Each bind's part staged (fetched if it is not), as (path under /input, tree)."""
        parts = []
        for path, part_cid in binds:
            use("part", part_cid)  # before get or fill: never evicted between them
            entry = self.staging_cache.get("part", part_cid)
            if entry is None:
                entry = self.staging_cache.fill(
                    "part", part_cid, functools.partial(self._fill_part, part_cid, path)
                )
            parts.append((path, entry / _PART_TREE))
        return tuple(parts)

    def _replacement_binds(
        self, name: str, cid: str, use: Callable[[str, str], None]
    ) -> list[tuple[str, str]] | None:
        """Binds that show directory `cid` at `name` as a staged earlier version of it with
        the entries that changed bound over their old selves, or None.

        An earlier version is a part staged under the same name for another input (the data
        set before one of its files was replaced). It serves when every difference, however
        deep, replaces an entry by one of the same kind and name: then the old entry is the
        mount point of the new one. A directory whose names changed is replaced whole (its new
        version fetched as a part); a file that became a directory, or the other way round,
        and more than REPLACED_MAX changes, stage the new version whole.
        """
        for old in self._earlier_versions(name, cid):
            use("part", old)
            old_tree = self.staging_cache.get("part", old)
            if old_tree is None:
                continue
            replaced: list[tuple[str, str]] = []
            if self._replacements(old, cid, old_tree / _PART_TREE, name, replaced):
                return [(name, old), *replaced]
        return None

    def _replacements(
        self, old: str, new: str, old_tree: Path, path: str, replaced: list[tuple[str, str]]
    ) -> bool:
        """Append to `replaced` the (path, CID) binds that turn `old` into `new` at `path`;
        False when they cannot (names differ, a kind changed, too many)."""
        changes = self.store.directory_changes(old, new)
        if changes is None:
            return False
        for entry, (old_cid, new_cid) in changes.items():
            if len(replaced) >= REPLACED_MAX:
                return False
            mount_point = old_tree / entry
            # The staged old tree is ours and never changes; lstat: a symlink is no mount point.
            old_mode = os.lstat(mount_point).st_mode
            if stat_module.S_ISDIR(old_mode):
                deeper: list[tuple[str, str]] = []
                if self._replacements(old_cid, new_cid, mount_point, f"{path}/{entry}", deeper):
                    replaced.extend(deeper)
                elif self.store.unixfs_kind(new_cid) == "directory":
                    replaced.append((f"{path}/{entry}", new_cid))  # this directory, whole
                else:
                    return False
            elif stat_module.S_ISREG(old_mode) and self.store.unixfs_kind(new_cid) == "file":
                replaced.append((f"{path}/{entry}", new_cid))
            else:
                return False
        return True

    def _earlier_versions(self, name: str, cid: str) -> list[str]:
        """CIDs staged as parts at top-level `name` of recently staged inputs, newest first."""
        manifests = []
        for key in self.staging_cache.entries("parts"):
            manifest = self.staging_cache.path_for("parts", key) / _PARTS_MANIFEST
            try:
                manifests.append((manifest.stat().st_mtime, manifest))
            except FileNotFoundError:
                continue  # evicted meanwhile
        found: list[str] = []
        for _, manifest in sorted(manifests, reverse=True)[:EARLIER_VERSIONS_SCANNED]:
            try:
                binds = json.loads(manifest.read_text())["binds"]
            except (OSError, ValueError, KeyError):
                continue
            for path, part in binds:
                if path == name and part != cid and part not in found:
                    found.append(str(part))
        return found

    # -- filling ---------------------------------------------------------------------------

    def _rootfs_stat(self, cid: str) -> Stat:
        found = self.store.stat(cid)
        if found.kind == "file" and found.size == 0:
            raise BadRootfsError(
                f"rootfs {cid} is an empty file (0 bytes), not an archive: give the CID of a "
                ".tar.gz/.tar.zst/.tar file of the root tree, or of a directory"
            )
        if found.kind not in ("file", "directory"):
            raise BadRootfsError(
                f"rootfs {cid} is a {found.kind}; give a .tar.gz/.tar.zst/.tar "
                "file CID or a directory CID"
            )
        return found

    def _fill_rootfs(self, cid: str, found: Stat, dest: Path) -> None:
        from . import archive  # extraction only: a warm run never imports it

        if found.kind == "directory":
            self._extract_directory(cid, dest, what=f"rootfs {cid}")
            _make_files_executable(dest)
        else:
            stream = _CountingReader(
                self.store.cat_stream(cid), f"rootfs {cid}", found.size, self.on_progress
            )
            try:
                archive.extract(
                    stream,
                    dest,
                    name=f"rootfs {cid}",
                    require_end_marker=True,
                )
            except TruncatedStreamError:
                if stream.bytes_read < found.size:
                    raise  # the download was cut: a retry may get all of it
                # Every byte of the file arrived: the archive itself ends early.
                raise BadRootfsError(
                    f"rootfs {cid} is a truncated archive: all {found.size} bytes of it "
                    "arrived, but it ends before its end-of-archive marker; it was cut short "
                    "when it was made or copied: re-create it and add it again"
                ) from None
            finally:
                stream.close()
        check_rootfs(dest, cid)  # may create mount points: times are set after it
        # Tarballs too: archive.extract does not apply members' mtimes, so the files would
        # carry the time of extraction.
        set_tree_mtimes(dest)

    def _fill_input(self, cid: str, dest: Path) -> None:
        self._extract_directory(cid, dest, what=f"input {cid}")
        set_tree_mtimes(dest)  # `get` stamps every entry with the time of the request

    def _fill_part(self, cid: str, name: str, dest: Path) -> None:
        """One top-level entry of an input (a file or a directory) at dest/_PART_TREE."""
        from . import archive  # extraction only: a warm run never imports it

        what = f"input entry {name} ({cid})"
        stream = _CountingReader(self.store.tar_stream(cid), what, None, self.on_progress)
        try:
            archive.extract(stream, dest, name=what, compression="tar", require_end_marker=True)
        finally:
            stream.close()
        top = dest / cid
        mode = os.lstat(top).st_mode  # never a symlink: it would be bound, followed, as a part
        if not (stat_module.S_ISDIR(mode) or stat_module.S_ISREG(mode)):
            raise StagingError(f"fetching {what} gave an unexpected tar layout")
        os.rename(top, dest / _PART_TREE)
        set_tree_mtimes(dest / _PART_TREE)

    def _extract_directory(self, cid: str, dest: Path, *, what: str) -> None:
        from . import archive  # extraction only: a warm run never imports it

        total = None
        stream = _CountingReader(self.store.tar_stream(cid), what, total, self.on_progress)
        try:
            archive.extract(
                stream,
                dest,
                name=what,
                compression="tar",
                require_end_marker=True,
            )
        finally:
            stream.close()
        _hoist_single_top(dest, cid)


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


def check_input_is_directory(store: Store, cid: str) -> Stat:
    """Refuse an input that the node says is a file (a dag-pb file looks like a directory)."""
    found = store.stat(cid)
    if found.kind != "directory":
        raise UsageError(
            f"input {cid} is a {found.kind}, not a directory: put it in one, "
            f"e.g. `ipfs-mkdir data.bin {cid}`"
        )
    return found


def _stageable_by_parts(entries: list[Entry]) -> bool:
    """Whether each entry can be a part: a file or directory with a plain name, not too many.

    A top-level symlink cannot be bound over a mount point, and a name the extractor would
    refuse must reach it (staging whole) to be refused with its own message.
    """
    return len(entries) <= PARTS_MAX_ENTRIES and all(
        entry.kind in ("file", "directory")
        and entry.name not in ("", ".", "..")
        and "/" not in entry.name
        and "\0" not in entry.name
        for entry in entries
    )


def _make_skeleton(dest: Path, *, entries: list[Entry], binds: list[tuple[str, str]]) -> None:
    """The /input of an input staged by parts: a mount point per entry, with the mode and
    mtime a whole staging gives the input's root, and beside it the manifest of the binds
    that show the input's tree over it."""
    tree = dest / _SKELETON_TREE
    os.mkdir(tree)
    for entry in entries:
        if entry.kind == "directory":
            os.mkdir(tree / entry.name, 0o755)
        else:
            os.close(os.open(tree / entry.name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    os.chmod(tree, 0o755)
    set_tree_mtimes(tree)
    (dest / _PARTS_MANIFEST).write_text(json.dumps({"binds": binds}))


def _hoist_single_top(dest: Path, top_name: str) -> None:
    """`get` wraps the tree in a directory named after the CID: make its content the entry."""
    top = dest / top_name
    if not top.is_dir() or top.is_symlink():
        raise StagingError(f"fetching {top_name} gave an unexpected tar layout")
    # Parked inside the work dir, so a failure here leaves nothing outside it.
    parked = dest / f".ipfs-execute-hoist-{os.getpid()}"
    os.rename(top, parked)
    for child in os.listdir(parked):
        os.rename(parked / child, dest / child)  # a child of that name would be a tar error
    os.rmdir(parked)
    os.chmod(dest, 0o755)


def set_tree_mtimes(root: Path, mtime: int = SOURCE_DATE_EPOCH) -> None:
    """Set the atime and mtime of everything under `root`, and of `root`, to `mtime`.

    Symlinks get their own times (never their targets'); directories are done after their
    content, `root` last, so that a root with the fixed time marks a finished tree.
    """
    times = (mtime, mtime)
    for _folder, dirs, files, folder_fd in os.fwalk(root, topdown=False, follow_symlinks=False):
        for name in (*files, *dirs):
            os.utime(name, times, dir_fd=folder_fd, follow_symlinks=False)
    os.utime(root, times, follow_symlinks=False)


def _settle_old_entry(path: Path) -> None:
    """Fix the times of a tree staged before staging fixed them (one stat when done)."""
    try:
        if os.stat(path).st_mtime != SOURCE_DATE_EPOCH:
            set_tree_mtimes(path)
    except OSError:
        pass  # removed meanwhile, say: only `ls -l` inside would show it


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
    """Refuse a root whose mount points are not real directories; create missing ones.

    They must be real directories because bwrap 0.8 follows symlinks while creating mount
    points (it could create files on the host).
    """
    problem = sandbox.mount_point_problem(root, create_missing=True)
    if problem is not None:
        name, kind = problem
        raise BadRootfsError(
            f"rootfs {cid}: /{name} is {kind}; it must be a real directory "
            "(the sandbox mounts over it)"
        )
    init = root / ENTRY_POINT
    try:
        st = init.lstat()
    except FileNotFoundError:
        raise BadRootfsError(
            f"rootfs {cid} has no /{ENTRY_POINT}: the payload starts as "
            f"`/{ENTRY_POINT} ARGS...`; add one to the image"
        ) from None
    if stat_module.S_ISREG(st.st_mode) and not st.st_mode & 0o111:
        raise BadRootfsError(f"rootfs {cid}: /{ENTRY_POINT} is not executable")
    if stat_module.S_ISDIR(st.st_mode):
        raise BadRootfsError(f"rootfs {cid}: /{ENTRY_POINT} is a directory")


# --- a shuffled view, for verification ---------------------------------------------------------

_VIEW_READY_TIMEOUT_S = 10.0


def shuffled_view_problem() -> str | None:
    """Why `shuffled_view` cannot work here, or None."""
    if shutil.which("disorderfs") is None:
        return "disorderfs is not installed (Debian package disorderfs)"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is missing or not accessible (FUSE is not available)"
    if not _unmount_commands(Path("/")):
        return "fusermount is not installed (Debian package fuse3)"
    return None


@contextlib.contextmanager
def shuffled_view(path: Path, *, parent: Path | None = None) -> Iterator[Path]:
    """A read-only view of the staged tree `path` whose directories list their entries in a
    new random order at every listing (disorderfs --shuffle-dirents).

    Bind it into a sandbox in place of `path` to expose payloads whose output depends on
    readdir order. The view is mounted on a new directory under `parent` (default: the
    system's temporary directory) and unmounted on exit. As root the view serves every uid
    (allow_other), the kernel checking each access against the modes it shows
    (default_permissions), while disorderfs itself reads the tree as root: the tree may lie in
    the private data directory, which the sandbox's uid cannot traverse (disorderfs's
    --multi-user would make it try). Otherwise it serves only the caller's uid, which is the
    sandbox's then, so `user_allow_other` is never needed.
    """
    problem = shuffled_view_problem()
    if problem is not None:
        raise StagingError(f"cannot shuffle the directory order of {path}: {problem}")
    mount_point = Path(tempfile.mkdtemp(prefix="ipfs-execute-shuffled-", dir=parent))
    process: subprocess.Popen[bytes] | None = None
    try:
        argv = [
            str(shutil.which("disorderfs")),
            "-f",
            "--quiet",
            "--shuffle-dirents=yes",
            # Only the order changes: no reversal, and st_blocks as in the tree.
            "--reverse-dirents=no",
            "--pad-blocks=0",
            "-o",
            "ro,allow_other,default_permissions" if os.geteuid() == 0 else "ro",
            str(path),
            str(mount_point),
        ]
        with tempfile.TemporaryFile() as errors:
            # Foreground: the daemon is our child, so nothing outlives the view; it gets
            # SIGTERM (and unmounts) if this thread dies first.
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                start_new_session=True,
                preexec_fn=sandbox.die_with_parent(),
            )
            _wait_mounted(mount_point, process, errors, path)
        yield mount_point
    finally:
        if process is not None:
            _stop_view(mount_point, process)
        with contextlib.suppress(OSError):
            mount_point.rmdir()


def _wait_mounted(
    mount_point: Path, process: subprocess.Popen[bytes], errors: BinaryIO, path: Path
) -> None:
    deadline = time.monotonic() + _VIEW_READY_TIMEOUT_S
    while not os.path.ismount(mount_point):
        if process.poll() is not None or time.monotonic() > deadline:
            errors.seek(0)
            message = errors.read().decode("utf-8", "replace").strip()
            raise StagingError(
                f"disorderfs could not mount a shuffled view of {path}: "
                f"{message or 'it did not mount in time'}"
            )
        time.sleep(0.005)


def _unmount_commands(mount_point: Path) -> list[list[str]]:
    """Normal, then lazy (a process may still be inside), unmount commands available here."""
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    if fusermount is not None:
        return [
            [fusermount, "-u", "-q", str(mount_point)],
            [fusermount, "-u", "-z", "-q", str(mount_point)],
        ]
    if os.geteuid() == 0 and (umount := shutil.which("umount")):
        return [[umount, str(mount_point)], [umount, "-l", str(mount_point)]]
    return []


def _stop_view(mount_point: Path, process: subprocess.Popen[bytes]) -> None:
    """Unmount (which ends the daemon), wait for the daemon; best effort, never raises."""
    for command in _unmount_commands(mount_point):
        if not os.path.ismount(mount_point):
            break
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                command, stdin=subprocess.DEVNULL, capture_output=True, timeout=10, check=False
            )
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
