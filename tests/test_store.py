"""The store against the real embedded Kubo node."""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import recursive_pins

from ipfs_execute_magic.cid import IpfsPath, is_cid
from ipfs_execute_magic.errors import (
    DaemonUnreachableError,
    InvalidPathError,
    IpfsError,
    NotRetrievableError,
)
from ipfs_execute_magic.store import AddProgress, Store, _parse_version


def make_tree(root: Path) -> Path:
    tree = root / "tree"
    (tree / "a" / "b" / "c").mkdir(parents=True)
    (tree / "a" / "b" / "c" / "deep.txt").write_text("deep\n")
    (tree / ".dotfile").write_text("hidden\n")
    (tree / ".dotdir").mkdir()
    (tree / ".dotdir" / "x").write_text("x")
    (tree / "empty").mkdir()
    (tree / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))  # several 1 MiB chunks
    (tree / "name with spaces+plus%.txt").write_text("odd name")
    os.symlink("a/b/c/deep.txt", tree / "rel-link")
    os.symlink("/etc/passwd", tree / "abs-link")
    os.symlink("a", tree / "dir-link")
    os.symlink("does/not/exist", tree / "dangling")
    return tree


def test_tree_cid_equals_kubo_cli(store: Store, kubo_env, scratch: Path) -> None:
    tree = make_tree(scratch)
    ours = store.add_path(tree)
    cli = subprocess.run(
        [
            "ipfs",
            "add",
            "-r",
            "--hidden",
            "-Q",
            "--only-hash",
            "--cid-version=1",
            "--raw-leaves",
            "--chunker=size-1048576",
            str(tree),
        ],
        env=kubo_env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert ours == cli.stdout.strip()
    kinds = {entry.name: entry.kind for entry in store.ls(ours)}
    assert kinds["rel-link"] == kinds["abs-link"] == kinds["dir-link"] == "symlink"
    assert kinds["empty"] == "directory" and ".dotfile" in kinds and ".dotdir" in kinds


def test_symlinks_are_not_followed(store: Store, kubo_env, scratch: Path) -> None:
    tree = make_tree(scratch)
    cid = store.add_path(tree)
    target = subprocess.run(
        ["ipfs", "cat", f"{cid}/rel-link"], env=kubo_env, capture_output=True, text=True, check=True
    )
    # A UnixFS symlink node holds its target path, not the bytes of the file it points to.
    assert target.stdout == "a/b/c/deep.txt"
    assert store.cat(f"{cid}/abs-link") == b"/etc/passwd"
    assert store.cat(f"{cid}/a/b/c/deep.txt") == b"deep\n"


def test_resolve_forms(store: Store, scratch: Path) -> None:
    tree = make_tree(scratch)
    cid = store.add_path(tree)
    sub = store.resolve(f"{cid}/a/b")
    assert store.resolve(f"/ipfs/{cid}/a/b") == sub
    assert store.resolve(f"/ipfs/{cid}/a/b/") == sub
    assert store.resolve(f"ipfs://{cid}/a/b") == sub
    assert store.resolve(cid) == cid
    assert [e.name for e in store.ls(sub)] == ["c"]


def test_ipns_resolved_once_to_immutable_cid(store: Store, kubo_env, scratch: Path) -> None:
    tree = make_tree(scratch)
    cid = store.add_path(tree)
    published = subprocess.run(
        ["ipfs", "name", "publish", "--allow-offline", "-Q", f"/ipfs/{cid}"],
        env=kubo_env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    name = published.removeprefix("/ipns/")
    assert store.resolve(f"/ipns/{name}") == cid
    assert store.resolve(f"/ipns/{name}/a/b") == store.resolve(f"{cid}/a/b")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "hello",
        "Qm123",
        "/ipfs/",
        "/ipfs/notacid/x",
        "bafy../..",
        f"/ipfs/{'b' + 'a' * 58}/../etc",
    ],
)
def test_malformed_paths_are_usage_errors(bad: str) -> None:
    with pytest.raises(InvalidPathError) as error:
        IpfsPath.parse(bad)
    assert "\n" not in str(error.value)


def test_missing_sub_path_says_which(store: Store, scratch: Path) -> None:
    cid = store.add_path(make_tree(scratch))
    with pytest.raises(NotRetrievableError) as error:
        store.resolve(f"{cid}/no/such/file")
    assert cid in str(error.value)


def test_unknown_cid_fails_fast_offline(store: Store) -> None:
    unknown = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
    with pytest.raises(NotRetrievableError) as error:
        store.cat(unknown)
    assert unknown in str(error.value)


def test_compose_nested_names(store: Store, scratch: Path) -> None:
    cid = store.add_path(make_tree(scratch))
    deep = store.resolve(f"{cid}/a/b/c/deep.txt")
    composed = store.compose({"data/deep.txt": deep, "tree": cid})
    assert store.cat(f"{composed}/data/deep.txt") == b"deep\n"
    assert store.resolve(f"{composed}/tree") == cid
    extended = store.compose({"more.txt": deep}, base=composed)
    assert sorted(e.name for e in store.ls(extended)) == ["data", "more.txt", "tree"]
    with pytest.raises(InvalidPathError):
        store.compose({"../escape": deep})


def test_ten_thousand_files_do_not_hang(store: Store, kubo_env, scratch: Path) -> None:
    tree = scratch / "many"
    for group in range(100):
        folder = tree / f"g{group:03d}"
        folder.mkdir(parents=True)
        for index in range(100):
            (folder / f"f{index:03d}").write_text(f"{group}-{index}\n")
    ours = store.add_path(tree)  # pytest-timeout bounds this; the CLI takes seconds
    cli = subprocess.run(
        ["ipfs", "add", "-r", "--hidden", "-Q", "--only-hash", str(tree)],
        env=kubo_env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert ours == cli.stdout.strip()


def test_add_streams_in_constant_memory(settings, scratch: Path) -> None:
    big = scratch / "big.bin"
    with open(big, "wb") as handle:
        handle.truncate(400 * 1024 * 1024)  # sparse: cheap to make, 400 MiB to read
    # The probe's own high-water mark (VmHWM): getrusage's ru_maxrss starts at this pytest
    # process's peak (a child started by vfork and exec inherits it), which hides any growth.
    probe = textwrap.dedent(f"""
        from pathlib import Path
        from ipfs_execute_magic.settings import Settings
        from ipfs_execute_magic.store import Store
        def peak_kib():
            status = Path("/proc/self/status").read_text().splitlines()
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        store = Store.connect(Settings(home={str(settings.home)!r}))
        before = peak_kib()
        store.add_path({str(big)!r}, pin=False)
        print((peak_kib() - before) // 1024)
    """)
    grown_mib = int(
        subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    assert grown_mib < 64, f"adding a 400 MiB file grew the client by {grown_mib} MiB"


def test_unreachable_daemon_is_a_clear_error() -> None:
    store = Store("/ip4/127.0.0.1/tcp/1")
    with pytest.raises(DaemonUnreachableError) as error:
        store.version()
    assert "/ip4/127.0.0.1/tcp/1" in str(error.value)


def test_cid_syntax() -> None:
    assert is_cid("QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn")
    assert is_cid("bafybeiczsscdsbs7ffqz55asqdf3smv6klcw3gofszvwlyarci47bgf354")
    assert not is_cid("bafybeiczsscdsbs7ffqz55asqdf3smv6klcw3gofszvwlyarci47bgf35!")
    assert not is_cid("QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3N0")  # 0 is not base58
    assert _parse_version("0.43.1") == (0, 43, 1)
    assert _parse_version("0.44.0-rc1") == (0, 44, 0)


def test_raw_leaf_cid_matches_the_daemon(store: Store) -> None:
    from ipfs_execute_magic.cid import EMPTY_FILE_CID, raw_leaf_cid

    for data in (b"", b"x", b'{"record": 1}\n' * 1000, os.urandom(1024 * 1024)):
        assert raw_leaf_cid(data) == store.add_bytes(data, pin=False)
    assert raw_leaf_cid(b"") == EMPTY_FILE_CID


def test_add_reports_growing_progress_ending_at_the_totals(store: Store, scratch: Path) -> None:
    tree = scratch / "progress-tree"
    total_bytes = 0
    for group in range(30):
        folder = tree / f"g{group:02d}"
        folder.mkdir(parents=True)
        for index in range(100):
            data = os.urandom(1000 + index)
            (folder / f"f{index:03d}").write_bytes(data)
            total_bytes += len(data)
    with open(tree / "big.bin", "wb") as handle:
        handle.truncate(200 * 1024 * 1024)  # sparse: cheap to make, long enough to report on
    total_bytes += 200 * 1024 * 1024
    os.symlink("big.bin", tree / "link")
    seen: list[AddProgress] = []
    threads: set[int] = set()

    def on_progress(progress: AddProgress) -> None:
        seen.append(progress)
        threads.add(threading.get_ident())

    cid = store.add_path(tree, pin=False, on_progress=on_progress)
    assert cid == store.add_path(tree, pin=False)  # progress changes nothing in what is added
    assert threads == {threading.get_ident()}  # called in the caller's thread, not the sender's
    last = seen[-1]
    assert last.finished and [p.finished for p in seen].count(True) == 1
    assert (last.files, last.bytes) == (3002, total_bytes)
    assert (last.files_total, last.bytes_total) == (3002, total_bytes)
    assert len(seen) >= 2, "only the final report came"
    for before, after in itertools.pairwise(seen):
        assert before.files <= after.files and before.bytes <= after.bytes
        assert before.seconds <= after.seconds
    # Throttled: nowhere near one call per file.
    assert len(seen) <= last.seconds / 0.1 + 2
    assert seen[0].files_total == 3002 and seen[0].bytes_total == total_bytes


def test_a_composition_is_pinned_whether_or_not_its_base_is(store: Store, kubo_env) -> None:
    """On a pinned base, the pin of a composition walks only what differs (`pin update`); on
    an unpinned one it falls back to pinning the whole: either way it is pinned, and the
    base's own pin state is left as it was."""
    pinned_base = store.compose({"a": store.add_bytes(b"pinned base\n")})
    loose_base = store.compose({"a": store.add_bytes(b"loose base\n", pin=False)})
    subprocess.run(["ipfs", "pin", "rm", loose_base], env=kubo_env, check=True, capture_output=True)
    on_pinned = store.compose({"b": store.add_bytes(b"b\n")}, base=pinned_base)
    on_loose = store.compose({"b": store.add_bytes(b"b\n")}, base=loose_base)
    pins = recursive_pins(kubo_env)
    assert {pinned_base, on_pinned, on_loose} <= pins
    assert loose_base not in pins


@pytest.mark.slow  # a few seconds of MFS writes
def test_mfs_writes_in_parallel_all_land(store: Store) -> None:
    """Composes and index links at once, as `--each` composes its entries while runs are
    recorded: Kubo's MFS loses some such writes now and then ("cannot flush the created file
    ...: file does not exist"); every one must still land, with what it was given."""
    cids = [store.add_bytes(b"entry %d\n" % i, name=f"f{i}.txt") for i in range(64)]
    expected = {i: store.compose({f"f{i:02d}.txt": cids[i]}) for i in range(64)}
    prefix = f"/ipfs-execute-test-{os.getpid()}-{time.monotonic_ns()}"
    errors: list[BaseException] = []
    composed: list[tuple[int, str]] = []

    def compose(worker: int) -> None:
        try:
            for step in range(100):
                i = (worker * 100 + step) % 64
                composed.append((i, store.compose({f"f{i:02d}.txt": cids[i]})))
        except BaseException as error:
            errors.append(error)

    def link(worker: int) -> None:
        try:
            for step in range(200):
                store.mfs_link(f"{prefix}/w{worker}/e{step}", cids[step % 64])
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=compose, args=(w,)) for w in range(6)]
    threads += [threading.Thread(target=link, args=(w,)) for w in range(3)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert len(composed) == 600 and all(cid == expected[i] for i, cid in composed)
        for worker in range(3):
            for step in (0, 99, 199):
                assert store.mfs_hash(f"{prefix}/w{worker}/e{step}") == cids[step % 64]
    finally:
        store._call("/files/rm", prefix, opts={"recursive": "true", "force": "true"})


def test_directory_changes_name_what_two_directories_hold_differently(store: Store) -> None:
    """Read from the blocks (dag-pb decoded here), checked against what the node resolves."""
    entries = {f"file-{index:04d}": store.add_bytes(b"%d\n" % index) for index in range(300)}
    base = store.compose({**entries, "sub/x": store.add_bytes(b"x\n")})
    replaced = store.compose(
        {"file-0007": store.add_bytes(b"seven\n"), "sub/x": store.add_bytes(b"y\n")}, base=base
    )
    assert store.directory_changes(base, base) == {}
    changes = store.directory_changes(base, replaced)
    assert changes is not None and sorted(changes) == ["file-0007", "sub"]
    for name, (old, new) in changes.items():
        assert (old, new) == (store.resolve(f"{base}/{name}"), store.resolve(f"{replaced}/{name}"))
    added = store.compose({"new": store.add_bytes(b"new\n")}, base=base)
    assert store.directory_changes(base, added) is None  # the names differ
    assert store.directory_changes(base, entries["file-0001"]) is None  # a file
    assert store.unixfs_kind(base) == "directory"
    assert store.unixfs_kind(entries["file-0001"]) == "file"


def test_binary_cids_read_from_blocks_are_written_as_the_node_writes_them() -> None:
    import base64

    from ipfs_execute_magic.cid import _BASE58, _base_decode, cid_text, raw_leaf_cid

    v0 = "Qmbvkmk9LFsGneteXk3G7YLqtLVME566ho6ibaQZZVHaC9"
    assert cid_text(_base_decode(v0, _BASE58)) == v0
    v1 = raw_leaf_cid(b"data")
    assert cid_text(base64.b32decode(v1[1:].upper() + "=" * (-len(v1[1:]) % 8))) == v1


@pytest.mark.parametrize("entries", [0, 3, 300])
def test_a_file_added_into_a_directory_is_what_mfs_would_make(store: Store, entries: int) -> None:
    """Built from blocks for speed, the directory must be the one `compose` (MFS) makes, or
    cached runs of scripts composed before would no longer be found."""
    files = {f"entry {index:03d}": store.add_bytes(b"%d\n" % index) for index in range(entries)}
    base = store.compose({**files, "zz/deeper": store.add_bytes(b"z\n")})
    script = b"echo built\n" * 10
    built, script_cid = store.add_file_into(base, ".ipfs-execute/script", script)
    assert script_cid == store.add_bytes(script)
    assert built == store.compose({".ipfs-execute/script": script_cid}, base=base)
    assert store.cat(f"{built}/.ipfs-execute/script") == script
    assert store.cat(f"{built}/zz/deeper") == b"z\n"


def _slowed_writes(
    store: Store, monkeypatch: pytest.MonkeyPatch, *, fail: type[Exception] | None = None
):
    """Blocks put on the write-behind thread take 0.3 s (or fail): a call that does not wait
    for them would find them missing."""
    put = store._put_blocks

    def slow_put(*args, **kwargs) -> None:
        if threading.current_thread().name == "ipfs-execute-write-behind":
            time.sleep(0.3)
            if fail is not None:
                raise fail("IPFS block/put failed: the test says no")
        put(*args, **kwargs)

    monkeypatch.setattr(store, "_put_blocks", slow_put)


def test_a_file_added_behind_is_there_for_every_call_after_it(
    store: Store, kubo_env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """add_file_behind returns before the blocks are stored; any later call that could read
    them waits for them (and the pin), while a read of the result index does not."""
    base = store.compose({"data.txt": store.add_bytes(b"data\n")})
    _slowed_writes(store, monkeypatch)
    started = time.monotonic()
    composed = store.add_file_behind(base, ".ipfs-execute/script", b"echo behind\n")
    assert time.monotonic() - started < 0.2
    assert store.mfs_read("/no-such-index-entry") is None
    assert time.monotonic() - started < 0.2  # the index read did not wait
    assert store.cat(f"{composed.directory}/.ipfs-execute/script") == b"echo behind\n"
    assert time.monotonic() - started >= 0.3  # the cat did
    composed.written.wait()
    assert composed.directory in recursive_pins(kubo_env)
    assert (composed.directory, composed.file) == store.add_file_into(
        base, ".ipfs-execute/script", b"echo behind\n"
    )


@pytest.mark.parametrize("error", [IpfsError, RuntimeError])
def test_a_failed_write_behind_is_raised_to_its_owner_and_to_the_call_that_needed_it(
    store: Store, monkeypatch: pytest.MonkeyPatch, error: type[Exception]
) -> None:
    """Whatever the writing raised (an unexpected error too): nothing is taken as stored."""
    base = store.compose({"data.txt": store.add_bytes(b"failing\n")})
    _slowed_writes(store, monkeypatch, fail=error)
    composed = store.add_file_behind(base, ".ipfs-execute/script", b"echo lost\n")
    with pytest.raises(error, match="the test says no"):
        store.cat(f"{composed.directory}/.ipfs-execute/script")
    with pytest.raises(error, match="the test says no"):
        composed.written.wait()  # told again: its owner must know
    assert store.cat(f"{base}/data.txt") == b"failing\n"  # once told, the store goes on


def test_files_added_behind_from_many_threads_all_land(store: Store, kubo_env) -> None:
    """Runs of `--each` compose their scripts at once: no write waits for another's thread."""
    base = store.compose({"shared.txt": store.add_bytes(b"shared\n")})
    made: list[tuple[str, bytes]] = []

    def compose(worker: int) -> None:
        for step in range(5):
            script = b"echo %d %d\n" % (worker, step)
            made.append((store.add_file_behind(base, "s/script", script).directory, script))

    threads = [threading.Thread(target=compose, args=(worker,)) for worker in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    assert len(made) == 40
    for directory, script in made:
        assert store.cat(f"{directory}/s/script") == script
    assert {directory for directory, _ in made} <= recursive_pins(kubo_env)


@pytest.fixture(scope="module")
def shapes(store: Store, kubo_env, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Directories to compose on: a thousand files in a subdirectory, files of one and of
    several blocks, a nested tree, a directory of an older CID version."""
    big_file = os.urandom(3 * 1024 * 1024 + 17)  # four blocks: a dag-pb file
    files = {f"many/file-{i:04d}.dat": store.add_bytes(b"%d\n" % i) for i in range(1000)}
    tree = store.compose(
        {
            **files,
            "top.txt": store.add_bytes(b"top\n"),
            "big.bin": store.add_bytes(big_file),
            "a/b/c/deep.txt": store.add_bytes(b"deep\n"),
            "é名前/ünï.txt": store.add_bytes(b"unicode\n"),
        }
    )
    scratch = tmp_path_factory.mktemp("v0")  # pytest's own, removed as it removes the others
    (scratch / "x.txt").write_text("x\n")
    (scratch / "sub").mkdir()
    (scratch / "sub" / "y.txt").write_text("y\n")
    v0 = subprocess.run(
        ["ipfs", "add", "-r", "-Q", "--cid-version=0", str(scratch)],
        env=kubo_env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return {"tree": tree, "v0": v0, "big_file": store.add_bytes(big_file)}


# What compose leaves to MFS: what MFS refuses, or might make otherwise than a build here.
LEFT_TO_MFS = {
    "a file in place of a directory",
    "a directory in place of a directory",
    "on a CIDv0 directory",
    "through a file",
    "an entry inside another",
}


@pytest.mark.parametrize(
    "case",
    [
        "replace a file in a directory of 1,000",
        "add a file to a directory of 1,000",
        "replace a deep file",
        "add under new directories",
        "a file in place of a directory",
        "a directory in place of a file",
        "a directory in place of a directory",
        "a file in place of a file of several blocks",
        "several entries, several directories",
        "a file of several blocks",
        "unicode names",
        "no base",
        "no base, nothing",
        "on a CIDv0 directory",
        "through a file",
        "an entry inside another",
    ],
)
def test_a_built_composition_is_what_mfs_makes(store: Store, shapes, case: str) -> None:
    """compose builds the directory from blocks where it can; it must be byte for byte the
    one MFS makes (cached runs are keyed by it), and leave to MFS whatever it cannot build."""
    new = store.add_bytes(f"new for {case}\n".encode())
    other = store.add_bytes(b"other\n")
    tree, v0 = shapes["tree"], shapes["v0"]
    base, entries = {
        "replace a file in a directory of 1,000": (tree, {"many/file-0500.dat": new}),
        "add a file to a directory of 1,000": (tree, {"many/zzz-new.dat": new}),
        "replace a deep file": (tree, {"a/b/c/deep.txt": new}),
        "add under new directories": (tree, {"n/e/w/file": new, "a/b/new": other}),
        "a file in place of a directory": (tree, {"a": new}),
        "a directory in place of a file": (tree, {"top.txt": f"{tree}/a"}),
        "a directory in place of a directory": (tree, {"a/b": f"{tree}/many"}),
        "a file in place of a file of several blocks": (tree, {"big.bin": new}),
        "several entries, several directories": (
            tree,
            {"many/file-0001.dat": new, "a/b/c/deep.txt": other, "top.txt": new, "z": other},
        ),
        "a file of several blocks": (tree, {"many/copy.bin": shapes["big_file"]}),
        "unicode names": (tree, {"é名前/ünï.txt": new, "é名前/ß": other}),
        "no base": (None, {"one": new, "two/three": other}),
        "no base, nothing": (None, {}),
        "on a CIDv0 directory": (v0, {"sub/y.txt": new}),
        "through a file": (tree, {"top.txt/inside": new}),
        "an entry inside another": (tree, {"a": new, "a/b": other}),
    }[case]
    resolved = {name: store.resolve(cid) for name, cid in entries.items()}

    def outcome(compose) -> tuple[str, str]:
        try:
            return "ok", compose(resolved, base)
        except IpfsError as error:
            return "error", type(error).__name__

    with _calls_recorded(store) as seen:
        ours = outcome(store.compose)
    assert ours == outcome(store.compose_in_mfs)
    through_mfs = any(path in ("/files/cp", "/files/mkdir") for path in seen)
    assert through_mfs == (case in LEFT_TO_MFS)
    if case == "replace a file in a directory of 1,000":
        built = store.compose(resolved, base)
        assert store.cat(f"{built}/many/file-0500.dat") == f"new for {case}\n".encode()
        assert store.cat(f"{built}/many/file-0499.dat") == b"499\n"


@contextlib.contextmanager
def _calls_recorded(store: Store) -> Iterator[list[str]]:
    """The RPC paths `store` calls meanwhile."""
    seen: list[str] = []
    call = store._call

    def recording(path: str, *args: str, **kwargs):
        seen.append(path)
        return call(path, *args, **kwargs)

    store._call = recording  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        del store._call


def test_a_composition_built_from_blocks_is_pinned_and_takes_few_requests(
    store: Store, shapes, kubo_env
) -> None:
    new = store.add_bytes(b"not through mfs\n")
    with _calls_recorded(store) as seen:
        built = store.compose({"many/file-0007.dat": new}, shapes["tree"])
    # The two changed directories were read lately, and the new file's size is known from
    # its add: the two blocks are stored, and pinned by the difference from the base.
    assert seen == ["/block/put", "/pin/update"]
    assert built in recursive_pins(kubo_env)


@pytest.fixture(scope="module")
def slow_to_read(store: Store) -> tuple[str, bytes]:
    """A 24 MiB file: long enough that reading it slowly outlasts a one-second timeout."""
    data = os.urandom(24 * 1024 * 1024)
    return store.add_bytes(data, name="slow.bin"), data


def _read_slowly(stream, pause: float = 0.05) -> bytes:
    got = bytearray()
    while chunk := stream.read(1024 * 1024):
        got += chunk
        time.sleep(pause)
    return bytes(got)


def test_a_transfer_longer_than_the_fetch_timeout_is_read_whole(
    store: Store, slow_to_read: tuple[str, bytes]
) -> None:
    """The fetch timeout bounds how long no byte comes, not the whole transfer: with Kubo's
    own per-command timeout, a big `get` or `cat` was cut when it ran out."""
    cid, data = slow_to_read
    patient = Store(store.api, fetch_timeout=1.0)
    start = time.monotonic()
    with patient.cat_stream(cid) as stream:
        assert _read_slowly(stream) == data
    assert time.monotonic() - start > 1.0  # it did outlast the timeout


def test_a_stream_the_daemon_ends_with_an_error_is_an_error_not_a_short_read(
    store: Store, slow_to_read: tuple[str, bytes]
) -> None:
    """Kubo reports a command that fails after its answer began in a trailer; a stream cut
    that way (here by a deadline of its own) must fail, never read as a whole shorter file."""
    cid, data = slow_to_read
    chunks = store._call(
        "/cat", cid, opts={"timeout": "500ms"}, decoder="none", stream=True, what=cid
    )
    got = bytearray()
    start = time.monotonic()
    with pytest.raises(IpfsError, match=cid):
        for chunk in chunks:
            # Slow for the first second (the daemon blocks on a full socket and its deadline
            # passes), then as fast as the rest comes.
            if (
                time.monotonic() - start < 1.0
                and len(got) // 2**20 != (len(got) + len(chunk)) // 2**20
            ):
                time.sleep(0.1)
            got += chunk
    assert len(got) < len(data)
