"""Inputs staged by parts (one staged tree per top-level entry, reused by CID) and scripted
bases (a big input staged once, each cell's script bound over an empty directory in it).

The payload must see exactly what a whole staging shows it; a new input that differs from a
staged one in a few entries fetches only those; a script edit fetches only the script;
nothing a run uses is evicted under it. Real Kubo, real bwrap, as root (the parts bound in the
run's private mount namespace) and as an ordinary user (the parts bound by bwrap).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import subprocess
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import package_copy_for_other_users

from ipfs_execute_magic import staging
from ipfs_execute_magic.cid import EMPTY_DIRECTORY_CID
from ipfs_execute_magic.node import EmbeddedNode
from ipfs_execute_magic.record import SCRIPT_PATH, RunRequest
from ipfs_execute_magic.runner import Runner
from ipfs_execute_magic.sandbox import SandboxSpec, run_sandbox
from ipfs_execute_magic.sandbox.output_area import OutputArea
from ipfs_execute_magic.settings import Limits, Settings
from ipfs_execute_magic.staging import PARTS_MIN_BYTES, Stager
from ipfs_execute_magic.staging_cache import StagingCache, disk_usage

# Every entry's name, mode, size, mtime, link count and type, then every file's checksum:
# what a payload could tell apart between two stagings of one input.
LISTING = (
    "cd /input && find . | sort | while read -r f; do "
    'stat -c \'%n %a %s %Y %h %F\' "$f"; done && find . -type f | sort | while read -r f; do md5sum "$f"; done'
)


def _deterministic_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest.fixture(scope="module")
def big_input(store, tmp_path_factory: pytest.TempPathFactory) -> str:
    """An input past PARTS_MIN_BYTES: files and directories at the top, nested ones, a name
    with a space, an empty directory and an empty file."""
    root = tmp_path_factory.mktemp("big-input")
    (root / "data").mkdir()
    (root / "data" / "big.bin").write_bytes(_deterministic_bytes(1, PARTS_MIN_BYTES))
    (root / "data" / "deeper" / "deepest").mkdir(parents=True)
    (root / "data" / "deeper" / "deepest" / "x.txt").write_text("x\n")
    (root / "notes").mkdir()
    (root / "notes" / "a note.txt").write_text("a note\n")
    (root / "empty-dir").mkdir()
    (root / "empty-file").write_bytes(b"")
    (root / "top.csv").write_text("a,b\n1,2\n")
    return str(store.add_path(root))


def _fetches(stager: Stager) -> dict[str, int]:
    """Bytes read per fetch, as the stager reports them."""
    seen: dict[str, int] = {}

    def on_progress(what: str, done: int, _total: int | None) -> None:
        seen[what] = max(seen.get(what, 0), done)

    stager.on_progress = on_progress
    return seen


def _listing(rootfs: Path, staged: staging.StagedTree, output_root: Path) -> str:
    output = Path(tempfile.mkdtemp(dir=output_root))
    spec = SandboxSpec(
        rootfs,
        staged.path,
        output,
        ("/sbin/init", "sh", "-c", LISTING),
        Limits(timeout=60),
        input_parts=staged.parts,
    )
    printed: list[bytes] = []
    result = run_sandbox(spec, on_stdout=printed.append, on_stderr=printed.append)
    assert result.exit_status == 0, b"".join(printed).decode(errors="replace")
    return b"".join(printed).decode()


def test_every_way_of_staging_shows_the_tree_a_whole_staging_shows(
    store, busybox_cid: str, big_input: str, scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(staging, "SIDE_BY_SIDE_MIN_BYTES", PARTS_MIN_BYTES)  # this one is small
    cache = StagingCache(scratch / "cache")
    stager = Stager(store, cache)
    rootfs = stager.stage_rootfs(busybox_cid).path
    added = store.compose({"new": store.add_bytes(b"new\n")}, base=big_input)
    replaced = store.compose({"top.csv": store.add_bytes(b"a,b\n3,4\n")}, base=big_input)
    with contextlib.ExitStack() as hold:
        # The first big input: a whole tree, nothing bound.
        first = stager.stage_input(big_input, hold=hold)
        assert first.path == cache.path_for("input", big_input) and first.parts == ()
        seen = {big_input: _listing(rootfs, first, scratch)}
        # An entry added: a skeleton, each old entry bound from the first input's tree.
        skeleton = stager.stage_input(added, hold=hold)
        assert skeleton.path == cache.path_for("parts", added) / "tree"
        assert [name for name, _ in skeleton.parts] == sorted(
            ["data", "notes", "empty-dir", "empty-file", "new", "top.csv"]
        )
        assert dict(skeleton.parts)["data"] == first.path / "data"
        seen[added] = _listing(rootfs, skeleton, scratch)
        # An entry replaced: the first input's tree with the new file bound over the old.
        over = stager.stage_input(replaced, hold=hold)
        assert over.path == first.path and [name for name, _ in over.parts] == ["top.csv"]
        seen[replaced] = _listing(rootfs, over, scratch)
        for cid, listing in seen.items():
            assert listing == _listing(rootfs, stager.stage_input(cid, by_parts=False), scratch)
        # A whole tree's top-level entries are fetched side by side: the same tree as one
        # stream of the whole input gives.
        one_stream = Path(tempfile.mkdtemp(dir=scratch))
        stager._extract_directory(big_input, one_stream, what="one stream")
        staging.set_tree_mtimes(one_stream)
        one_stream.chmod(0o755)
        reference = staging.StagedTree(big_input, one_stream, False, 0.0)
        assert _listing(rootfs, reference, scratch) == seen[big_input]
    assert "./data/deeper/deepest/x.txt" in seen[big_input]
    assert f"./data/big.bin 644 {PARTS_MIN_BYTES} " in seen[added]
    # The root of /input: mode, SOURCE_DATE_EPOCH, and 2 + 3 subdirectories as link count.
    assert f". 755 4096 {staging.SOURCE_DATE_EPOCH} 5 directory" in seen[added]


def test_an_input_differing_in_one_entry_fetches_only_that_entry(
    store, big_input: str, scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(staging, "SIDE_BY_SIDE_MIN_BYTES", PARTS_MIN_BYTES)  # this one is small
    stager = Stager(store, StagingCache(scratch / "cache"))
    first = _fetches(stager)
    stager.stage_input(big_input)
    assert sum(first.values()) > PARTS_MIN_BYTES  # everything, once
    # Entry by entry, side by side.
    assert sorted(what.split(" (")[0] for what in first) == [
        f"input entry {name}" for name in ("data", "empty-dir", "empty-file", "notes", "top.csv")
    ]
    replaced = store.compose({"top.csv": store.add_bytes(b"a,b\n3,4\n")}, base=big_input)
    added = store.compose({"new": store.add_bytes(b"new\n")}, base=big_input)
    for changed, name in ((replaced, "top.csv"), (added, "new")):
        fetched = _fetches(stager)
        staged = stager.stage_input(changed)
        assert list(fetched) == [f"input entry {name} ({store.resolve(f'{changed}/{name}')})"]
        assert sum(fetched.values()) < 4096  # its tar member, not the 4 MiB around it
        assert dict(staged.parts)[name].read_bytes() == store.cat(f"{changed}/{name}")
    # Staged again: nothing fetched at all, not even the skeleton.
    fetched = _fetches(stager)
    assert stager.stage_input(added).was_cached and fetched == {}


def test_a_new_script_on_a_big_input_stages_nothing(
    scratch: Path, busybox_tarball: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    settings = Settings(home=scratch / "home")
    with Runner(settings) as runner:
        store = runner.store
        busybox = store.add_path(busybox_tarball)
        root = tmp_path_factory.mktemp("script-input")
        for index in range(3):
            (root / f"dir-{index}").mkdir()
            (root / f"dir-{index}" / "blob").write_bytes(
                _deterministic_bytes(index, PARTS_MIN_BYTES // 2)
            )
        data = store.add_path(root)
        request = RunRequest(busybox, data, script="md5sum /input/dir-*/blob > /output/sums")
        first = runner.run(request)
        assert first.record.succeeded
        grown_by: list[int] = []
        for edit in range(2):
            before = disk_usage(runner.staging_cache.root)
            fetched: dict[str, int] = {}

            def on_progress(what: str, done: int, _total: int | None, seen=fetched) -> None:
                seen[what] = done

            result = runner.run(
                RunRequest(busybox, data, script=f"# edit {edit}\nmd5sum /input/dir-*/blob"),
                on_progress=on_progress,
            )
            grown_by.append(disk_usage(runner.staging_cache.root) - before)
            assert result.record.succeeded
            assert result.stdout == store.cat(f"{first}/sums")
            # Nothing is fetched: the data is the scripted base, and the script's directory
            # is written beside the run's /output.
            assert not [what for what in fetched if what.startswith("input")]
        # The data was staged once, for the first run, as the scripted base; no run added
        # anything.
        assert runner.staging_cache.entries("scripted") == [data]
        assert runner.staging_cache.entries("parts") == []
        assert runner.staging_cache.entries("part") == []
        assert max(grown_by) < 1024 * 1024
    EmbeddedNode(settings).stop()


def _scripted(store, base: str, script: str) -> str:
    """`base` with the cell's script added, as the runner makes it."""
    return str(store.add_file_into(base, SCRIPT_PATH, script.encode())[0])


def test_a_scripted_input_shows_the_tree_a_whole_staging_shows(
    store, busybox_cid: str, big_input: str, scratch: Path
) -> None:
    cache = StagingCache(scratch / "cache")
    stager = Stager(store, cache)
    rootfs = stager.stage_rootfs(busybox_cid).path
    scripted = _scripted(store, big_input, "echo one\n")
    with contextlib.ExitStack() as hold:
        on_base = stager.stage_input(scripted, hold=hold, base=big_input)
        whole = stager.stage_input(scripted, hold=hold, by_parts=False)
        assert on_base.path == cache.path_for("scripted", big_input)
        assert [name for name, _ in on_base.parts] == [".ipfs-execute"]
        seen = _listing(rootfs, on_base, scratch)
        assert seen == _listing(rootfs, whole, scratch)
    assert "./.ipfs-execute/script 644 9 " in seen
    # The root: 2 + 3 subdirectories of the data + the script's directory.
    assert f". 755 4096 {staging.SOURCE_DATE_EPOCH} 6 directory" in seen
    # The base itself, run without a script, has no trace of the script's mount point, and
    # is not fetched again: its entries are bound from the scripted base.
    fetched = _fetches(stager)
    plain_staged = stager.stage_input(big_input)
    assert fetched == {}
    # (from one of the trees staged whole above: the scripted base, or the whole staging)
    bound_from = dict(plain_staged.parts)["data"].parent
    assert bound_from in (
        cache.path_for("scripted", big_input),
        cache.path_for("input", scripted),
    )
    plain = _listing(rootfs, plain_staged, scratch)
    assert ".ipfs-execute" not in plain
    assert f". 755 4096 {staging.SOURCE_DATE_EPOCH} 5 directory" in plain


@pytest.mark.parametrize("base", ["big", "small", "empty"])
def test_a_script_written_beside_the_output_shows_what_a_whole_staging_shows(
    store, busybox_cid: str, big_input: str, scratch: Path, base: str
) -> None:
    """The runner writes the script's directory instead of fetching it: under any umask the
    payload sees the tree of the input's CID, as a whole staging of it shows it."""
    small = store.compose({"tiny.txt": store.add_bytes(b"tiny\n")})
    data = {"big": big_input, "small": small, "empty": EMPTY_DIRECTORY_CID}[base]
    script = "echo written; ls -l /input\n"
    scripted = _scripted(store, data, script)
    stager = Stager(store, StagingCache(scratch / "cache"))
    rootfs = stager.stage_rootfs(busybox_cid).path
    area = OutputArea(Path(tempfile.mkdtemp(dir=scratch)) / "output")
    old_umask = os.umask(0o077)
    try:
        area.create(Limits())
        written = area.write_script("script", script.encode(), staging.SOURCE_DATE_EPOCH)
    finally:
        os.umask(old_umask)
    try:
        fetched = _fetches(stager)
        with contextlib.ExitStack() as hold:
            on_base = stager.stage_input(scripted, hold=hold, base=data, script_dir=written)
            assert dict(on_base.parts)[".ipfs-execute"] == written
            assert on_base.path == stager.staging_cache.path_for("scripted", data)
            assert not [what for what in fetched if what.startswith("input entry")]
            seen = _listing(rootfs, on_base, scratch)
            whole = stager.stage_input(scripted, hold=hold, by_parts=False)
            assert seen == _listing(rootfs, whole, scratch)
        assert f"./.ipfs-execute/script 644 {len(script)} {staging.SOURCE_DATE_EPOCH}" in seen
    finally:
        area.release()


def test_data_run_without_a_script_first_becomes_the_scripted_base_without_a_fetch(
    store, busybox_cid: str, big_input: str, scratch: Path
) -> None:
    """A cell's loop must cost nothing whichever way the data was first used: the whole tree
    a run without a script staged is moved to be the scripted base, and runs without a
    script then bind its entries from there."""
    cache = StagingCache(scratch / "cache")
    stager = Stager(store, cache)
    rootfs = stager.stage_rootfs(busybox_cid).path
    plain_first = _listing(rootfs, stager.stage_input(big_input), scratch)
    assert cache.entries("input") == [big_input]
    scripted = _scripted(store, big_input, "echo moved\n")
    fetched = _fetches(stager)
    with contextlib.ExitStack() as hold:
        on_base = stager.stage_input(scripted, hold=hold, base=big_input)
        assert [what.split(" (")[0] for what in fetched] == ["input entry .ipfs-execute"]
        assert on_base.path == cache.path_for("scripted", big_input)
        assert cache.entries("input") == []  # moved, not copied
        seen = _listing(rootfs, on_base, scratch)
        assert seen == _listing(rootfs, stager.stage_input(scripted, by_parts=False), scratch)
    fetched = _fetches(stager)
    plain_again = stager.stage_input(big_input)
    assert fetched == {} and len(plain_again.parts) == 5
    assert _listing(rootfs, plain_again, scratch) == plain_first


def test_a_new_version_of_a_scripted_data_set_fetches_only_what_changed(
    store, busybox_cid: str, big_input: str, scratch: Path
) -> None:
    stager = Stager(store, StagingCache(scratch / "cache"))
    rootfs = stager.stage_rootfs(busybox_cid).path
    stager.stage_input(_scripted(store, big_input, "true\n"), base=big_input)
    new_x = store.add_bytes(b"x, replaced\n")
    version = store.compose({"data/deeper/deepest/x.txt": new_x}, base=big_input)
    added = store.compose({"data/deeper/added.txt": new_x}, base=big_input)
    cases = (
        # The earlier version with the one file bound over its old self.
        (version, ["data/deeper/deepest/x.txt"]),
        # data/deeper gained a name: that directory, not big.bin beside it.
        (added, ["data/deeper"]),
    )
    for changed, expected in cases:
        scripted = _scripted(store, changed, f"ls -lR /input # {expected}\n")
        fetched = _fetches(stager)
        with contextlib.ExitStack() as hold:
            on_earlier = stager.stage_input(scripted, hold=hold, base=changed)
            assert [what.split(" (")[0] for what in fetched] == [
                *(f"input entry {path}" for path in expected),
                "input entry .ipfs-execute",
            ]
            assert sum(fetched.values()) < 64 * 1024
            whole = stager.stage_input(scripted, hold=hold, by_parts=False)
            assert _listing(rootfs, on_earlier, scratch) == _listing(rootfs, whole, scratch)


@pytest.fixture()
def own_home(scratch: Path) -> Iterator[Settings]:
    """A data directory (and node) of its own, with a 1-byte staging cache limit: every fill
    evicts everything no run holds."""
    settings = Settings(home=scratch / "home", staging_limit_bytes=1)
    yield settings
    EmbeddedNode(settings).stop()


def test_parts_a_run_uses_are_never_evicted_under_it(
    own_home: Settings, busybox_tarball: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with Runner(own_home) as runner:
        store = runner.store
        busybox = store.add_path(busybox_tarball)
        root = tmp_path_factory.mktemp("evict-input")
        for index in range(4):
            (root / f"part-{index}").write_bytes(_deterministic_bytes(index, PARTS_MIN_BYTES // 3))
        data = store.add_path(root)
        for edit in range(2):
            result = runner.run(
                RunRequest(busybox, data, script=f"# {edit}\ncat /input/part-* | md5sum")
            )
            assert result.record.succeeded, result.stderr
            assert result.stdout.split()[0].decode() == _md5(
                b"".join(_deterministic_bytes(i, PARTS_MIN_BYTES // 3) for i in range(4))
            )
        cache = runner.staging_cache
        # What the last run used stays (held while it ran, the newest since): the data as a
        # scripted base. The scripts' directories were written beside /output, not cached.
        assert cache.entries("scripted") == [data]
        assert cache.entries("part") == []


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.mark.parametrize("staged_as", ["parts", "scripted base", "script written"])
def test_an_ordinary_user_sees_the_parts_bound_by_bwrap(
    store, busybox_cid: str, big_input: str, scratch: Path, staged_as: str
) -> None:
    """Without root there is no private mount namespace of ours: bwrap binds each part (or
    the script's directory over a scripted base, fetched or written beside /output)."""
    base_dir = Path(tempfile.mkdtemp(prefix="iex-parts-"))
    area = OutputArea(base_dir / "run" / "output")
    try:
        os.chmod(base_dir, 0o755)
        cache = StagingCache(base_dir / "cache")
        stager = Stager(store, cache)
        rootfs = stager.stage_rootfs(busybox_cid).path
        if staged_as == "parts":
            stager.stage_input(big_input)
            added = store.compose({"new": store.add_bytes(b"new\n")}, base=big_input)
            staged = stager.stage_input(added)  # a skeleton, the old entries bound from the tree
            assert len(staged.parts) == 6
        else:
            scripted = _scripted(store, big_input, "echo from a user\n")
            written = None
            if staged_as == "script written":
                area.path.parent.mkdir()
                area.create(Limits(output_bytes=None))  # a plain directory: nothing mounted
                written = area.write_script(
                    "script", b"echo from a user\n", staging.SOURCE_DATE_EPOCH
                )
            staged = stager.stage_input(scripted, base=big_input, script_dir=written)
            assert staged.path == cache.path_for("scripted", big_input)
            if written is not None:
                assert dict(staged.parts)[".ipfs-execute"] == written
        expected = _listing(rootfs, staged, scratch)  # as root: private binds
        subprocess.run(["chmod", "-R", "a+rX", str(base_dir)], check=True)
        package_parent = package_copy_for_other_users(base_dir)
        user = 1000
        output_dir = Path(tempfile.mkdtemp(dir=base_dir))
        os.chown(output_dir, user, user)
        parts = [(name, str(path)) for name, path in staged.parts]
        script = textwrap.dedent(f"""\
            import sys
            sys.path.insert(0, {str(package_parent)!r})
            from pathlib import Path
            from ipfs_execute_magic.sandbox import SandboxSpec, run_sandbox
            from ipfs_execute_magic.settings import Limits
            parts = tuple((name, Path(path)) for name, path in {parts!r})
            spec = SandboxSpec(Path({str(rootfs)!r}), Path({str(staged.path)!r}),
                               Path({str(output_dir)!r}), ("/sbin/init", "sh", "-c", {LISTING!r}),
                               Limits(timeout=60), input_parts=parts)
            result = run_sandbox(spec, on_stdout=sys.stdout.buffer.write,
                                 on_stderr=sys.stderr.buffer.write)
            sys.exit(result.exit_status)
            """)
        python = shutil.which("python3", path="/usr/bin:/bin")
        assert python is not None, "Debian's python3 is missing: run ./run setup"
        completed = subprocess.run(
            [
                "setpriv",
                f"--reuid={user}",
                f"--regid={user}",
                "--clear-groups",
                python,
                "-c",
                script,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert completed.returncode == 0, completed.stderr
        assert completed.stdout == expected
    finally:
        area.release()
        shutil.rmtree(base_dir, ignore_errors=True)


def test_a_part_path_that_could_leave_the_input_is_refused(scratch: Path) -> None:
    from ipfs_execute_magic.errors import SandboxError

    for name in ("..", "a/../b", "", "/a", "a//b", "a/"):
        with pytest.raises(SandboxError, match="not a relative path of entries"):
            SandboxSpec(scratch, scratch, scratch, ("true",), input_parts=((name, scratch),))


def test_a_directory_changed_deep_inside_is_its_earlier_version_with_the_change_bound_over(
    store, busybox_cid: str, big_input: str, scratch: Path
) -> None:
    cache = StagingCache(scratch / "cache")
    stager = Stager(store, cache)
    rootfs = stager.stage_rootfs(busybox_cid).path
    stager.stage_input(big_input)
    new_x = store.add_bytes(b"x, replaced\n")
    replaced = store.compose({"data/deeper/deepest/x.txt": new_x}, base=big_input)
    renamed = store.compose({"data/deeper/added.txt": new_x}, base=big_input)
    # data/deeper, a directory, is a file in this one.
    top = {entry.name: entry.cid for entry in store.ls(big_input)}
    big_bin = store.resolve(f"{big_input}/data/big.bin")
    retyped = store.compose({**top, "data": store.compose({"big.bin": big_bin, "deeper": new_x})})
    cases = (
        # Only the file is fetched: the rest of data/ is the staged earlier version.
        (replaced, ["data/deeper/deepest/x.txt"]),
        # data/deeper gained a name: that directory is fetched whole, big.bin is not.
        (renamed, ["data/deeper"]),
        # A directory became a file: no earlier version can show that, data/ is fetched anew.
        (retyped, ["data"]),
    )
    for changed, expected in cases:
        fetched = _fetches(stager)
        with contextlib.ExitStack() as hold:
            by_parts = stager.stage_input(changed, hold=hold)
            assert [what.split(" (")[0] for what in fetched] == [
                f"input entry {path}" for path in expected
            ]
            whole = stager.stage_input(changed, hold=hold, by_parts=False)
            assert _listing(rootfs, by_parts, scratch) == _listing(rootfs, whole, scratch)


def test_concurrent_runs_past_the_limit_never_lose_a_part_they_use(
    own_home: Settings, busybox_tarball: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Two runners on one data directory with a 1-byte limit: every fill of one evicts all
    the other does not hold at that moment, yet neither run finds a part gone. One edits
    scripts (its data a scripted base), the other runs new versions of the data without a
    script (staged by parts)."""
    root = tmp_path_factory.mktemp("concurrent-input")
    for index in range(3):
        (root / f"part-{index}").write_bytes(_deterministic_bytes(index, PARTS_MIN_BYTES // 2))
    expected = _md5(
        b"".join(_deterministic_bytes(i, PARTS_MIN_BYTES // 2) for i in range(3))
    ).encode()
    with Runner(own_home) as setup:
        busybox = setup.store.add_path(busybox_tarball)
        data = setup.store.add_path(root)
    failures: list[str] = []

    def edits(worker: int) -> None:
        with Runner(own_home) as runner:
            for edit in range(4):
                if worker == 0:
                    script = f"# edit {edit}\ncat /input/part-* | md5sum"
                    request = RunRequest(busybox, data, script=script)
                else:
                    note = runner.store.add_bytes(f"edit {edit}\n".encode())
                    version = runner.store.compose({f"edit-{edit}": note}, base=data)
                    request = RunRequest(
                        busybox, version, args=("sh", "-c", "cat /input/part-* | md5sum")
                    )
                try:
                    result = runner.run(request)
                except Exception as error:  # a part gone under the run, say: a failure too
                    failures.append(f"worker {worker} edit {edit}: {error}")
                    continue
                if not result.record.succeeded or result.stdout.split()[0] != expected:
                    failures.append(f"worker {worker} edit {edit}: {result.stderr!r}")

    workers = [threading.Thread(target=edits, args=(worker,)) for worker in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert failures == []


def test_a_failed_entry_stops_a_side_by_side_fill_and_leaves_nothing(
    store, big_input: str, scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One entry failing (a fetch cut, an archive refused) fails the whole staging: the other
    fetches stop at their next read, and neither the entry nor a work directory is left."""
    monkeypatch.setattr(staging, "SIDE_BY_SIDE_MIN_BYTES", PARTS_MIN_BYTES)
    cache = StagingCache(scratch / "cache")
    stager = Stager(store, cache)
    real_fetch = Stager._fetch_entry

    def fetch(self: Stager, cid: str, name: str, dest: Path, stop=None) -> Path:
        if name == "top.csv":
            raise staging.StagingError(f"input entry {name} ({cid}) was refused")
        return real_fetch(self, cid, name, dest, stop)

    monkeypatch.setattr(Stager, "_fetch_entry", fetch)
    with pytest.raises(staging.StagingError, match=r"top\.csv"):
        stager.stage_input(big_input)
    assert cache.get("input", big_input) is None
    assert os.listdir(scratch / "cache" / "tmp") == []
    monkeypatch.setattr(Stager, "_fetch_entry", real_fetch)
    assert stager.stage_input(big_input).path == cache.path_for("input", big_input)  # retried


def test_a_data_set_with_an_added_entry_under_the_cell_reuses_one_skeleton_for_every_edit(
    store, busybox_cid: str, big_input: str, scratch: Path
) -> None:
    """The cell's data gained a top-level entry: its other entries are bound from the earlier
    scripted base (only the new one fetched), and the skeleton is the data's, so the next
    edit of the cell fetches only its script."""
    cache = StagingCache(scratch / "cache")
    stager = Stager(store, cache)
    rootfs = stager.stage_rootfs(busybox_cid).path
    stager.stage_input(_scripted(store, big_input, "true\n"), base=big_input)
    grown = store.compose({"2024": store.add_bytes(b"a new year\n")}, base=big_input)
    for edit, expected in ((0, ["2024", ".ipfs-execute"]), (1, [".ipfs-execute"])):
        scripted = _scripted(store, grown, f"ls -lR /input # edit {edit}\n")
        fetched = _fetches(stager)
        with contextlib.ExitStack() as hold:
            staged_now = stager.stage_input(scripted, hold=hold, base=grown)
            assert [what.split(" (")[0] for what in fetched] == [
                f"input entry {name}" for name in expected
            ]
            assert staged_now.path == cache.path_for("scripted-parts", grown) / "tree"
            whole = stager.stage_input(scripted, hold=hold, by_parts=False)
            assert _listing(rootfs, staged_now, scratch) == _listing(rootfs, whole, scratch)
    assert cache.entries("scripted-parts") == [grown] and cache.entries("parts") == []


def test_an_entry_fetched_again_because_its_source_went_is_held_like_any_other(
    store, big_input: str, scratch: Path
) -> None:
    """A skeleton binds entries from a whole tree; when that tree has been evicted, the
    entries are fetched as parts of their own, and the run holds them as it holds the rest:
    an eviction meanwhile leaves every tree the run uses."""
    cache = StagingCache(scratch / "cache")
    stager = Stager(store, cache)
    stager.stage_input(big_input)
    added = store.compose({"new": store.add_bytes(b"new\n")}, base=big_input)
    stager.stage_input(added)  # the skeleton, its entries bound from the first tree
    cache.remove("input", big_input)
    with contextlib.ExitStack() as hold:
        staged = stager.stage_input(added, hold=hold)
        assert all(cache.root / "part" in path.parents for _, path in staged.parts)
        cache.evict()  # all that no run holds
        assert all(path.exists() for _, path in staged.parts)
        assert (staged.path).is_dir()
