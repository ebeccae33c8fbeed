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
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

from . import sandbox  # its names load when used: a cache hit needs none of them
from .cid import EMPTY_DIRECTORY_CID
from .errors import BadRootfsError, StagingError, TruncatedStreamError, UsageError
from .record import SCRIPT_DIR
from .sandbox.determinism import SOURCE_DATE_EPOCH
from .staging_cache import StagingCache, remove_tree
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
# How many recently used big trees staged whole are tried as an earlier version of an input,
# and searched for its top-level entries.
EARLIER_TREES_TRIED = 4
# The top-level entries of an input of this size or more, staged whole, are fetched this
# many at a time (below it, one stream costs less than a look at each entry's kind).
SIDE_BY_SIDE_MIN_BYTES = 64 * 1024 * 1024
FILL_THREADS = 3
# The mount point of a script's directory in a scripted base's skeleton (its CID unused).
_SCRIPT_DIR_ENTRY = Entry(name=SCRIPT_DIR, cid="", size=0, kind="directory")
# A part's tree is this entry of its staging cache entry (a file part is a file).
_PART_TREE = "t"
_SKELETON_TREE = "tree"
_PARTS_MANIFEST = "parts.json"


class StagedTree(NamedTuple):
    cid: str
    path: Path
    was_cached: bool
    seconds: float
    # Staged by parts: `path` holds a mount point per top-level entry, and each entry's
    # own staged tree is bound over it, read-only (SandboxSpec.input_parts).
    parts: tuple[tuple[str, Path], ...] = ()


# Where a bind's tree is: (kind, key) of a staged tree and the name of an entry at its top.
TreeSource = tuple[str, str, str]


class Bind(NamedTuple):
    """What is bound at `path` under /input: the staged part of `cid`, or, with `source`,
    the same content as an entry of another staged tree."""

    path: str
    cid: str
    source: TreeSource | None = None

    def to_json(self) -> list[str]:
        return [self.path, self.cid, *(self.source or ())]

    @classmethod
    def from_json(cls, item: list[str]) -> Bind:
        """[path, cid] (a part), or [path, cid, kind, key, name]."""
        path, cid, *source = (str(value) for value in item)
        if len(source) == 3:
            return cls(path, cid, (source[0], source[1], source[2]))
        if source:
            raise ValueError(f"a bind of {len(item)} fields")
        return cls(path, cid)


class _CountingReader:
    """Reports progress as a stream is read (for the notebook's progress line)."""

    def __init__(
        self,
        stream: BinaryIO,
        what: str,
        total: int | None,
        on_progress: ProgressCallback | None,
        stop: threading.Event | None = None,
    ) -> None:
        self._stream = stream
        self._what = what
        self._total = total
        self._on_progress = on_progress
        self._stop = stop  # set: the staging this read belongs to has failed or was stopped
        self._done = 0
        self._last_report = 0.0

    def read(self, size: int = -1) -> bytes:
        if self._stop is not None and self._stop.is_set():
            raise StagingError(f"fetching {self._what} stopped: the staging it is part of ended")
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
        base: str | None = None,
        script_dir: Path | None = None,
    ) -> StagedTree:
        """The input's tree: staged whole, or shown as staged trees with a few binds over them.

        A small input (under PARTS_MIN_BYTES) is staged whole, its script aside (`base`): one
        fetch costs less than a mount. A big one is staged so that a new version costs what
        changed:

        - `base` given: `cid` is that input with the cell's script added at SCRIPT_PATH. The
          base is staged once with an empty SCRIPT_DIR (`scripted/BASE`, whole or by parts
          like any input), and each script's directory is bound over it: an edit costs one
          mount, and a small fetch unless the caller wrote that directory (`script_dir`,
          holding exactly what SCRIPT_DIR holds in `cid`: the script file, with the modes
          and times of a staged tree).
        - An input (or base) that an earlier one staged whole differs from only by replaced
          entries, however deep, is that earlier tree with each changed file or directory
          bound over its old self (at most REPLACED_MAX).
        - An input most of whose top-level entries are staged already (as parts, or in a
          recent whole tree) gets a skeleton of mount points with each entry bound over its
          own (`parts/CID`): only the new entries are fetched, as parts of their own.
        - Anything else is staged whole, top-level entries fetched side by side; later
          versions start from it.

        The payload sees the same tree every way. `hold` keeps every entry used against
        eviction until it is closed; `by_parts=False` stages whole (what a shuffled view needs).
        """
        started = time.monotonic()
        held: set[tuple[str, str]] = set()

        def use(kind: str, key: str) -> None:
            if hold is not None and (kind, key) not in held:
                held.add((kind, key))
                hold.enter_context(self.staging_cache.use(kind, key))

        def staged(path: Path, was_cached: bool, binds: list[Bind] | None = None) -> StagedTree:
            written = None if script_dir is None else (SCRIPT_DIR, script_dir)
            parts, all_ready = self._stage_binds(binds or [], use, written)
            seconds = time.monotonic() - started
            return StagedTree(cid, path, was_cached and all_ready, seconds, parts)

        scripted = base is not None
        # The warm paths, probed without their locks first: a stat or two, no round trip.
        # The cell's loop first: a new script each time, on a base staged once.
        if scripted and by_parts and self.staging_cache.get("scripted", str(base)) is not None:
            use("scripted", str(base))
            tree = self.staging_cache.get("scripted", str(base))
            script_bind = self._script_bind(cid)
            if tree is not None and script_bind is not None:
                return staged(tree, True, [script_bind])
        use("input", cid)
        ready = self.staging_cache.get("input", cid)
        if ready is not None:
            _settle_old_entry(ready)
            return staged(ready, True)
        if cid == EMPTY_DIRECTORY_CID:
            return staged(self.staging_cache.fill("input", cid, set_tree_mtimes), False)
        if not by_parts:
            return staged(self._fill_whole("input", cid, None), False)
        for skeleton_kind, key in (("parts", cid), ("scripted-parts", base if scripted else None)):
            if key is None or self.staging_cache.get(skeleton_kind, key) is None:
                continue
            use(skeleton_kind, key)
            skeleton = self.staging_cache.get(skeleton_kind, key)
            script_bind = self._script_bind(cid) if skeleton_kind == "scripted-parts" else None
            if skeleton is not None and (skeleton_kind == "parts" or script_bind is not None):
                manifest = json.loads((skeleton / _PARTS_MANIFEST).read_text())
                binds = [Bind.from_json(item) for item in manifest["binds"]]
                binds += [script_bind] if script_bind is not None else []
                return staged(skeleton / _SKELETON_TREE, True, binds)

        kind, data, extra = "input", cid, []
        if scripted:
            script_bind = self._script_bind(cid)
            if script_bind is not None:  # else a sharded root: staged as any input
                kind, data, extra = "scripted", str(base), [script_bind]
        found = check_input_is_directory(self.store, data)
        if found.size < PARTS_MIN_BYTES:
            use(kind, data)
            return staged(self._fill_whole(kind, data, found.size), False, extra)
        earlier = self._earlier_tree(kind, data, use)
        if earlier is not None:
            tree, replaced = earlier
            return staged(tree, False, [*replaced, *extra])
        if kind == "scripted" and self.staging_cache.get("input", data) is not None:
            # The data was run on without a script first: its tree becomes the scripted base
            # (moved, not copied), and runs without a script bind its entries from there. The
            # cell's loop is what must cost nothing.
            use(kind, data)
            return staged(self._fill_whole(kind, data, found.size), False, extra)
        sources = self._tree_sources()
        entries = self._top_entries(data, sources)
        reused = self._reused_binds(entries, sources, use) if _stageable_by_parts(entries) else None
        if reused is not None:
            # A scripted base's skeleton is the base's, with an empty SCRIPT_DIR: every edit
            # of the cell reuses it.
            skeleton_kind = "parts" if kind == "input" else "scripted-parts"
            mount_points = entries if kind == "input" else [*entries, _SCRIPT_DIR_ENTRY]
            use(skeleton_kind, data)
            skeleton = self.staging_cache.fill(
                skeleton_kind,
                data,
                functools.partial(_make_skeleton, entries=mount_points, binds=reused),
            )
            return staged(skeleton / _SKELETON_TREE, False, [*reused, *extra])
        use(kind, data)
        return staged(self._fill_whole(kind, data, found.size), False, extra)

    def _script_bind(self, cid: str) -> Bind | None:
        """The bind of a scripted input's SCRIPT_DIR, from its root block (which the runner
        has just made, so the store has it), or None for a root that is no plain directory."""
        script_dir = dict(self.store.directory_links(cid) or ()).get(SCRIPT_DIR)
        return None if script_dir is None else Bind(SCRIPT_DIR, script_dir)

    def _earlier_tree(
        self, kind: str, data: str, use: Callable[[str, str], None]
    ) -> tuple[Path, list[Bind]] | None:
        """A recently used big tree of `kind` staged whole that `data` differs from only by
        replaced entries (same names and kinds, however deep), with the binds that show `data`
        over it; None if none does."""
        recent = self.staging_cache.recently_used(kind, min_bytes=PARTS_MIN_BYTES)
        for old in recent[:EARLIER_TREES_TRIED]:
            use(kind, old)
            old_tree = self.staging_cache.get(kind, old)
            if old_tree is None:
                continue  # evicted meanwhile
            replaced: list[tuple[str, str]] = []
            if old == data or self._replacements(old, data, old_tree, "", replaced):
                return old_tree, [Bind(path, cid) for path, cid in replaced]
        return None

    def _tree_sources(self) -> dict[str, tuple[str, TreeSource]]:
        """Top-level entries of recently used big trees staged whole, by CID: (name, where).
        An input that holds one of them can bind it from there instead of fetching it."""
        sources: dict[str, tuple[str, TreeSource]] = {}
        for kind in ("input", "scripted"):
            recent = self.staging_cache.recently_used(kind, min_bytes=PARTS_MIN_BYTES)
            for key in recent[:EARLIER_TREES_TRIED]:
                for name, child in self.store.directory_links(key) or ():
                    if kind != "scripted" or name != SCRIPT_DIR:
                        sources.setdefault(child, (name, (kind, key, name)))
        return sources

    def _reused_binds(
        self,
        entries: list[Entry],
        sources: dict[str, tuple[str, TreeSource]],
        use: Callable[[str, str], None],
    ) -> list[Bind] | None:
        """A bind per top-level entry, from what is staged already where it can be; None when
        less than half the entries are (then the input is worth a whole tree of its own)."""
        binds: list[Bind] = []
        reused = 0
        for entry in entries:
            if self.staging_cache.get("part", entry.cid) is not None:
                binds.append(Bind(entry.name, entry.cid))
            elif entry.cid in sources:
                binds.append(Bind(entry.name, entry.cid, sources[entry.cid][1]))
            else:
                earlier = None
                if entry.kind == "directory":
                    earlier = self._replacement_binds(entry.name, entry.cid, sources, use)
                binds.extend(earlier or [Bind(entry.name, entry.cid)])
                if earlier is None:
                    continue  # fetched: not reused
            reused += 1
        return binds if reused * 2 >= len(entries) else None

    def _top_entries(self, cid: str, sources: dict[str, tuple[str, TreeSource]]) -> list[Entry]:
        """An input's top-level entries, from its root block: the kind of an entry staged
        already is read from its staged tree (no round trip), others from their own first block
        (none for a raw block). `ls` would read every child of a hundred big directories."""
        links = self.store.directory_links(cid)
        if links is None:
            return self.store.ls(cid)
        entries = []
        for name, child in links:
            staged: Path | None = None
            part = self.staging_cache.get("part", child)
            if part is not None:
                staged = part / _PART_TREE
            elif child in sources:
                source_kind, key, inner = sources[child][1]
                tree = self.staging_cache.get(source_kind, key)
                staged = None if tree is None else tree / inner
            mode = 0
            if staged is not None:
                with contextlib.suppress(FileNotFoundError):
                    mode = os.lstat(staged).st_mode
            if stat_module.S_ISDIR(mode) or stat_module.S_ISREG(mode):
                kind = "directory" if stat_module.S_ISDIR(mode) else "file"
            else:
                kind = self.store.unixfs_kind(child)
                kind = "directory" if kind == "sharded-directory" else kind
            entries.append(Entry(name=name, cid=child, size=0, kind=kind))
        return entries

    def _stage_binds(
        self,
        binds: list[Bind],
        use: Callable[[str, str], None],
        written: tuple[str, Path] | None = None,
    ) -> tuple[tuple[tuple[str, Path], ...], bool]:
        """Each bind's tree, as (path under /input, tree), and whether all were staged
        already: `written` (path, tree) where the caller wrote that path's tree, a subtree of
        a staged tree where the bind says so and it is still there, else the part of its CID,
        fetched if need be."""
        parts = []
        all_ready = True
        for bind in binds:
            if written is not None and bind.path == written[0]:
                parts.append(written)
                continue
            staged = self._staged_tree(bind, use)
            if staged is None:  # not staged, or its source evicted: fetched as a part
                all_ready = False
                use("part", bind.cid)  # before the fill: never evicted before the run ends
                part = self.staging_cache.fill(
                    "part", bind.cid, functools.partial(self._fill_part, bind.cid, bind.path)
                )
                staged = part / _PART_TREE
            parts.append((bind.path, staged))
        return tuple(parts), all_ready

    def _staged_tree(self, bind: Bind, use: Callable[[str, str], None]) -> Path | None:
        """The staged file or directory a bind names, held from now on (taken before the
        look, so never evicted between them), or None when it is not staged; never a fetch.
        Checked with lstat: only a file or a directory is bound, never what a symlink names."""
        if bind.source is not None:
            kind, key, inner = bind.source
            use(kind, key)
            tree = self.staging_cache.get(kind, key)
            found = None if tree is None or not _is_entry_name(inner) else tree / inner
            if found is None:
                return None
        else:
            use("part", bind.cid)
            part = self.staging_cache.get("part", bind.cid)
            if part is None:
                return None
            found = part / _PART_TREE
        try:
            mode = os.lstat(found).st_mode
        except FileNotFoundError:
            return None
        return found if stat_module.S_ISDIR(mode) or stat_module.S_ISREG(mode) else None

    def _replacement_binds(
        self,
        name: str,
        cid: str,
        sources: dict[str, tuple[str, TreeSource]],
        use: Callable[[str, str], None],
    ) -> list[Bind] | None:
        """Binds that show directory `cid` at `name` as a staged earlier version of it with
        the entries that changed bound over their old selves, or None.

        An earlier version is what a recently staged input held under the same name (the data
        set before one of its files was replaced): a part, or an entry of a whole tree. It
        serves when every difference, however deep, replaces an entry by one of the same kind
        and name: then the old entry is the mount point of the new one. A directory whose
        names changed is replaced whole (its new version fetched as a part); a file that
        became a directory, or the other way round, and more than REPLACED_MAX changes, stage
        the new version whole.
        """
        candidates = self._earlier_versions(name, cid)
        candidates += [
            Bind(name, old, source)
            for old, (old_name, source) in sources.items()
            if old_name == name and old != cid
        ]
        for old in candidates:
            resolved = self._staged_tree(old, use)
            if resolved is None or not resolved.is_dir():  # a directory's earlier version
                continue
            replaced: list[tuple[str, str]] = []
            if self._replacements(old.cid, cid, resolved, name, replaced):
                return [old, *(Bind(path, new) for path, new in replaced)]
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
            entry_path = f"{path}/{entry}" if path else entry  # "": the input's root
            # The staged old tree is ours and never changes; lstat: a symlink is no mount point.
            old_mode = os.lstat(mount_point).st_mode
            if stat_module.S_ISDIR(old_mode):
                deeper: list[tuple[str, str]] = []
                if self._replacements(old_cid, new_cid, mount_point, entry_path, deeper):
                    replaced.extend(deeper)
                elif self.store.unixfs_kind(new_cid) == "directory":
                    replaced.append((entry_path, new_cid))  # this directory, whole
                else:
                    return False
            elif stat_module.S_ISREG(old_mode) and self.store.unixfs_kind(new_cid) == "file":
                replaced.append((entry_path, new_cid))
            else:
                return False
        return True

    def _earlier_versions(self, name: str, cid: str) -> list[Bind]:
        """What recently staged skeletons bound at top-level `name` with another CID, newest
        first."""
        manifests: list[tuple[float, Path]] = []
        for skeleton_kind in ("parts", "scripted-parts"):
            skeletons = os.fspath(self.staging_cache.root / skeleton_kind)
            with contextlib.suppress(FileNotFoundError), os.scandir(skeletons) as found_keys:
                for key in found_keys:
                    manifest = Path(key.path, _PARTS_MANIFEST)
                    try:
                        manifests.append((os.stat(manifest).st_mtime, manifest))
                    except (FileNotFoundError, NotADirectoryError):
                        continue  # evicted meanwhile (entries appear only by a rename)
        found: list[Bind] = []
        for _, found_manifest in sorted(manifests, reverse=True)[:EARLIER_VERSIONS_SCANNED]:
            try:
                binds = [
                    Bind.from_json(item) for item in json.loads(found_manifest.read_text())["binds"]
                ]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            for bind in binds:
                if bind.path == name and bind.cid != cid and bind not in found:
                    found.append(bind)
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

    def _fill_whole(self, kind: str, cid: str, size: int | None) -> Path:
        """Entry `kind`/`cid` of the staging cache, the input's whole tree ("scripted": with
        an empty SCRIPT_DIR, the mount point of each script's directory); `size` its bytes,
        if known."""

        def fill(dest: Path) -> None:
            if kind == "scripted" and cid == EMPTY_DIRECTORY_CID:
                pass  # dest is an empty directory already
            elif kind == "scripted" and self.staging_cache.take("input", cid, dest):
                pass  # the tree staged for runs without a script, moved here
            else:
                self._fetch_input(cid, dest, side_by_side=(size or 0) >= SIDE_BY_SIDE_MIN_BYTES)
                set_tree_mtimes(dest)  # `get` stamps every entry with the time of the request
            if kind == "scripted":
                os.mkdir(dest / SCRIPT_DIR)
                os.chmod(dest / SCRIPT_DIR, 0o755)
                times = (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH)
                for made in (dest / SCRIPT_DIR, dest):  # the root's mtime changed with it
                    os.utime(made, times, follow_symlinks=False)

        return self.staging_cache.fill(kind, cid, fill)

    def _fetch_input(self, cid: str, dest: Path, *, side_by_side: bool) -> None:
        """The input's tree into dest: with `side_by_side`, its top-level entries fetched
        side by side when they are plain files and directories with distinct names (one
        stream of 1 GB keeps one core busy extracting while the node waits), else as one
        stream."""
        links = self.store.directory_links(cid) if side_by_side else None
        if (
            links is None
            or not 2 <= len(links) <= PARTS_MAX_ENTRIES
            or not all(_is_entry_name(name) for name, _ in links)
            or len({name for name, _ in links}) != len(links)
            or any(
                self.store.unixfs_kind(child) not in ("file", "directory", "sharded-directory")
                for _, child in links
            )
        ):
            self._extract_directory(cid, dest, what=f"input {cid}")
            return
        import concurrent.futures  # a cold staging only: a cache hit never loads it

        stop = threading.Event()

        def fetch(name: str, child: str) -> None:
            # Beside dest and named like it ("KIND.KEY."): the lock its filler holds covers it
            # (StagingCache._remove_stale_tmp).
            prefix = ".".join(dest.name.split(".")[:2]) + "."
            work = Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
            try:
                os.rename(self._fetch_entry(child, name, work, stop), dest / name)
            finally:
                remove_tree(work)

        with concurrent.futures.ThreadPoolExecutor(FILL_THREADS) as pool:
            fetches = [pool.submit(fetch, name, child) for name, child in links]
            try:
                for done in fetches:
                    done.result()
            except BaseException:
                stop.set()  # the other fetches end at their next read
                for pending in fetches:
                    pending.cancel()
                raise
        os.chmod(dest, 0o755)

    def _fetch_entry(
        self, cid: str, name: str, dest: Path, stop: threading.Event | None = None
    ) -> Path:
        """One entry of an input (a file or a directory) extracted into dest; its path."""
        from . import archive  # extraction only: a warm run never imports it

        what = f"input entry {name} ({cid})"
        stream = _CountingReader(self.store.tar_stream(cid), what, None, self.on_progress, stop)
        try:
            archive.extract(stream, dest, name=what, compression="tar", require_end_marker=True)
        finally:
            stream.close()
        top = dest / cid
        mode = os.lstat(top).st_mode  # never a symlink: it would be bound, followed, as a part
        if not (stat_module.S_ISDIR(mode) or stat_module.S_ISREG(mode)):
            raise StagingError(f"fetching {what} gave an unexpected tar layout")
        return top

    def _fill_part(self, cid: str, name: str, dest: Path) -> None:
        """One top-level entry of an input (a file or a directory) at dest/_PART_TREE."""
        os.rename(self._fetch_entry(cid, name, dest), dest / _PART_TREE)
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
        entry.kind in ("file", "directory") and _is_entry_name(entry.name) for entry in entries
    )


def _is_entry_name(name: str) -> bool:
    """A name that is one entry of a directory: never a path, never . or .."""
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name


def _make_skeleton(dest: Path, *, entries: list[Entry], binds: list[Bind]) -> None:
    """The /input of an input staged by parts: a mount point per entry, with the mode and
    mtime a whole staging gives the input's root, and beside it the manifest of the binds
    that show the input's tree over it."""
    tree = dest / _SKELETON_TREE
    os.mkdir(tree)
    times = (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH)
    tree_fd = os.open(tree, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for entry in entries:  # each stamped as made: no walk of a hundred empty directories
            if entry.kind == "directory":
                os.mkdir(entry.name, 0o755, dir_fd=tree_fd)
            else:
                flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
                os.close(os.open(entry.name, flags, 0o644, dir_fd=tree_fd))
            os.utime(entry.name, times, dir_fd=tree_fd, follow_symlinks=False)
    finally:
        os.close(tree_fd)
    os.chmod(tree, 0o755)
    os.utime(tree, times)
    (dest / _PARTS_MANIFEST).write_text(json.dumps({"binds": [bind.to_json() for bind in binds]}))


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
