"""Inputs staged by parts: one staged tree per top-level entry, reused by CID.

The payload must see exactly what a whole staging shows it; a new input that differs from a
staged one in a few entries fetches only those; parts a run uses are never evicted under it.
Real Kubo, real bwrap, as root (the parts bound in the run's private mount namespace) and as
an ordinary user (the parts bound by bwrap).
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
from ipfs_execute_magic.node import EmbeddedNode
from ipfs_execute_magic.record import RunRequest
from ipfs_execute_magic.runner import Runner
from ipfs_execute_magic.sandbox import SandboxSpec, run_sandbox
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


def test_staged_by_parts_the_payload_sees_the_tree_a_whole_staging_shows(
    store, busybox_cid: str, big_input: str, scratch: Path
) -> None:
    cache = StagingCache(scratch / "cache")
    stager = Stager(store, cache)
    rootfs = stager.stage_rootfs(busybox_cid).path
    with contextlib.ExitStack() as hold:
        by_parts = stager.stage_input(big_input, hold=hold)
        whole = stager.stage_input(big_input, hold=hold, by_parts=False)
        assert [name for name, _ in by_parts.parts] == sorted(
            ["data", "notes", "empty-dir", "empty-file", "top.csv"]
        )
        assert whole.parts == () and whole.path == cache.path_for("input", big_input)
        seen_by_parts = _listing(rootfs, by_parts, scratch)
        assert seen_by_parts == _listing(rootfs, whole, scratch)
    assert "./data/deeper/deepest/x.txt" in seen_by_parts
    assert f"./data/big.bin 644 {PARTS_MIN_BYTES} " in seen_by_parts
    # The root of /input: mode, SOURCE_DATE_EPOCH, and 2 + 3 subdirectories as link count.
    assert f". 755 4096 {staging.SOURCE_DATE_EPOCH} 5 directory" in seen_by_parts


def test_an_input_differing_in_one_entry_fetches_only_that_entry(
    store, big_input: str, scratch: Path
) -> None:
    stager = Stager(store, StagingCache(scratch / "cache"))
    first = _fetches(stager)
    stager.stage_input(big_input)
    assert sum(first.values()) > PARTS_MIN_BYTES  # everything, once
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


def test_a_new_script_on_a_big_input_stages_only_the_script(
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
            # The earlier script's directory is reused: the new script is bound over the old.
            staged = [what.split(" (")[0] for what in fetched if what.startswith("input entry")]
            assert staged == ["input entry .ipfs-execute/script"]
        # The data was staged once, for the first run; an edit adds a skeleton and a script.
        assert len(runner.staging_cache.entries("parts")) == 3
        assert len(runner.staging_cache.entries("part")) == 3 + 3
        assert max(grown_by) < 1024 * 1024
    EmbeddedNode(settings).stop()


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
        # What the last run used stays (held while it ran, the newest since): the four data
        # parts, the first script's directory with the second script bound over its script;
        # the first run's skeleton went at the next fill.
        assert len(cache.entries("parts")) == 1
        assert len(cache.entries("part")) == 4 + 2


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_an_ordinary_user_sees_the_parts_bound_by_bwrap(
    store, busybox_cid: str, big_input: str, scratch: Path
) -> None:
    """Without root there is no private mount namespace of ours: bwrap binds each part."""
    base_dir = Path(tempfile.mkdtemp(prefix="iex-parts-"))
    try:
        os.chmod(base_dir, 0o755)
        cache = StagingCache(base_dir / "cache")
        stager = Stager(store, cache)
        rootfs = stager.stage_rootfs(busybox_cid).path
        staged = stager.stage_input(big_input)
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
    the other does not hold at that moment, yet neither run finds a part gone."""
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
                script = f"# worker {worker}, edit {edit}\ncat /input/part-* | md5sum"
                result = runner.run(RunRequest(busybox, data, script=script))
                if not result.record.succeeded or result.stdout.split()[0] != expected:
                    failures.append(f"worker {worker} edit {edit}: {result.stderr!r}")

    workers = [threading.Thread(target=edits, args=(worker,)) for worker in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert failures == []
