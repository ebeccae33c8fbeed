"""StagingCache: atomic fills, one filler per key across processes, cleanup after crashes."""

from __future__ import annotations

import multiprocessing
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ipfs_execute_magic.staging_cache import StagingCache, disk_usage, remove_tree

CID = "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"
OTHER = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"


def write_tree(path: Path) -> None:
    (path / "sub").mkdir()
    (path / "sub/file").write_text("content")


def test_fill_get_remove(tmp_path: Path) -> None:
    cache = StagingCache(tmp_path / "cache")
    assert cache.get("rootfs", CID) is None
    assert cache.entries("rootfs") == []
    path = cache.fill("rootfs", CID, write_tree)
    assert path == cache.path_for("rootfs", CID) == tmp_path / "cache/rootfs" / CID
    assert cache.get("rootfs", CID) == path
    assert (path / "sub/file").read_text() == "content"
    assert stat.S_IMODE(path.stat().st_mode) == 0o755  # the tree's root: part of the view
    # The cache's own directories are nobody else's business.
    for directory in ("", "rootfs", "tmp", "locks"):
        assert stat.S_IMODE((tmp_path / "cache" / directory).stat().st_mode) == 0o700
    assert cache.fill("rootfs", CID, lambda _: pytest.fail("filled twice")) == path
    assert cache.entries("rootfs") == [CID]
    assert cache.entries("input") == []
    cache.remove("rootfs", CID)
    assert cache.get("rootfs", CID) is None and not path.exists()
    assert os.listdir(tmp_path / "cache/tmp") == []
    cache.remove("rootfs", CID)  # removing what is not there is fine


@pytest.mark.parametrize("key", ["", "../etc", "a/b", "bafy.x", "bafy key", "x" * 201])
def test_keys_must_be_cids(tmp_path: Path, key: str) -> None:
    cache = StagingCache(tmp_path)
    with pytest.raises(ValueError, match="must be a CID"):
        cache.path_for("rootfs", key)
    with pytest.raises(ValueError, match="must be a CID"):
        cache.fill("rootfs", key, write_tree)


@pytest.mark.parametrize("kind", ["", "../x", "Rootfs", "tmp/x"])
def test_kinds_must_be_words(tmp_path: Path, kind: str) -> None:
    with pytest.raises(ValueError, match="cache kind"):
        StagingCache(tmp_path).get(kind, CID)


def test_failing_filler_leaves_nothing_and_next_caller_retries(tmp_path: Path) -> None:
    cache = StagingCache(tmp_path)

    def broken(path: Path) -> None:
        write_tree(path)
        (path / "ro").mkdir()
        (path / "ro/f").write_text("x")
        os.chmod(path / "ro", 0o555)
        (path / "escape").symlink_to(tmp_path / "outside")
        raise RuntimeError("download failed")

    (tmp_path / "outside").mkdir()
    (tmp_path / "outside/keep").write_text("keep")
    with pytest.raises(RuntimeError, match="download failed"):
        cache.fill("input", CID, broken)
    assert cache.get("input", CID) is None
    assert os.listdir(tmp_path / "tmp") == []
    assert (tmp_path / "outside/keep").read_text() == "keep"  # the symlink was not followed
    assert cache.fill("input", CID, write_tree) == cache.path_for("input", CID)


def test_keyboard_interrupt_in_filler_cleans_up(tmp_path: Path) -> None:
    cache = StagingCache(tmp_path)

    def interrupted(path: Path) -> None:
        write_tree(path)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.fill("rootfs", CID, interrupted)
    assert os.listdir(tmp_path / "tmp") == [] and cache.get("rootfs", CID) is None


def _fill_in_process(root: str, counter: str, start: float) -> str:
    def slow_filler(path: Path) -> None:
        with open(counter, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(0.3)
        write_tree(path)

    time.sleep(max(0.0, start - time.time()))
    return str(StagingCache(Path(root)).fill("rootfs", CID, slow_filler))


@pytest.mark.slow
def test_concurrent_processes_fill_once(tmp_path: Path) -> None:
    counter = tmp_path / "filler-calls"
    start = time.time() + 0.5  # all eight try at the same moment
    context = multiprocessing.get_context("fork")
    with context.Pool(8) as pool:
        results = pool.starmap(
            _fill_in_process, [(str(tmp_path / "cache"), str(counter), start)] * 8
        )
    assert len(counter.read_text().splitlines()) == 1
    assert set(results) == {str(tmp_path / "cache/rootfs" / CID)}
    assert (Path(results[0]) / "sub/file").read_text() == "content"


def test_concurrent_threads_fill_once(tmp_path: Path) -> None:
    cache = StagingCache(tmp_path)
    calls = []
    results: list[Path] = []
    barrier = threading.Barrier(6)

    def filler(path: Path) -> None:
        calls.append(1)
        time.sleep(0.1)
        write_tree(path)

    def worker() -> None:
        barrier.wait()
        results.append(cache.fill("rootfs", CID, filler))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 6


def test_stale_tmp_is_removed_but_live_filler_is_not(tmp_path: Path) -> None:
    cache = StagingCache(tmp_path)
    cache.fill("rootfs", "warmup", write_tree)
    # Work dirs of killed fillers: one for the key we fill next, one for another key.
    for name in (f"rootfs.{CID}.dead1", f"input.{OTHER}.dead2"):
        stale = tmp_path / "tmp" / name
        stale.mkdir()
        write_tree(stale)
        os.chmod(stale / "sub", 0o555)
    (tmp_path / "tmp/unrelated-name").mkdir()  # not ours: left alone

    inside_filler = threading.Event()
    release = threading.Event()

    def blocking_filler(path: Path) -> None:
        inside_filler.set()
        release.wait(10)
        write_tree(path)

    live = threading.Thread(target=cache.fill, args=("input", "liveKey", blocking_filler))
    live.start()
    try:
        assert inside_filler.wait(10)
        live_dirs = [
            name for name in os.listdir(tmp_path / "tmp") if name.startswith("input.liveKey.")
        ]
        assert len(live_dirs) == 1
        cache.fill("rootfs", CID, write_tree)
        remaining = sorted(os.listdir(tmp_path / "tmp"))
        assert remaining == sorted([live_dirs[0], "unrelated-name"])
    finally:
        release.set()
        live.join()
    assert cache.get("input", "liveKey") is not None
    assert cache.entries("rootfs") == sorted([CID, "warmup"])


def test_remove_tree_does_not_follow_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    os.chmod(outside, 0o555)
    tree = tmp_path / "tree"
    (tree / "ro").mkdir(parents=True)
    (tree / "ro/link").symlink_to(outside)
    (tree / "dirlink").symlink_to(outside)
    os.chmod(tree / "ro", 0o500)
    remove_tree(tree)
    assert not tree.exists()
    assert (outside / "keep").read_text() == "keep"
    assert stat.S_IMODE(outside.stat().st_mode) == 0o555


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged uid")
def test_read_only_tree_is_removed_by_an_unprivileged_owner() -> None:
    # Root ignores directory permissions; an ordinary user is stopped by a 0555 directory.
    base = Path(tempfile.mkdtemp(prefix="ipfs-execute-cache-test-"))
    try:
        os.chmod(base, 0o755)
        tree = base / "tree"
        (tree / "a/b").mkdir(parents=True)
        (tree / "a/b/file").write_text("x")
        for path in (tree, tree / "a", tree / "a/b", tree / "a/b/file"):
            os.chown(path, 65534, 65534)
        os.chmod(tree / "a/b", 0o555)
        os.chmod(tree / "a", 0o555)
        os.chmod(base, 0o777)  # the uid must be able to unlink `tree` itself
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            status = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                remove_tree(tree)
                status = 0
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert not tree.exists()
    finally:
        remove_tree(base)


# -- size limit and eviction ---------------------------------------------------------------

KEYS = [f"bafkrei{letter}" for letter in "abcdef"]


def write_bytes(size: int) -> Callable[[Path], None]:
    def filler(path: Path) -> None:
        (path / "data").write_bytes(b"x" * size)

    return filler


def test_fill_records_the_entry_size_once(tmp_path: Path) -> None:
    cache = StagingCache(tmp_path)
    path = cache.fill("input", KEYS[0], write_bytes(100_000))
    (entry,) = cache.usage()
    assert (entry.kind, entry.key, entry.in_use) == ("input", KEYS[0], False)
    assert entry.bytes == disk_usage(path) >= 100_000
    sizes = tmp_path / "sizes"
    # The record is the name of an empty file: the limit check sums a listing, reads nothing.
    assert os.listdir(sizes) == [f"input.{KEYS[0]}.{entry.bytes}"]
    # Recorded, not measured again: what usage() reports comes from the record.
    (sizes / f"input.{KEYS[0]}.{entry.bytes}").rename(sizes / f"input.{KEYS[0]}.7")
    assert cache.usage()[0].bytes == 7
    # A record in the older format (the size as the file's content) is read once, renamed.
    (sizes / f"input.{KEYS[0]}.7").rename(sizes / f"input.{KEYS[0]}")
    (sizes / f"input.{KEYS[0]}").write_text("9\n")
    assert cache._recorded_total() == 9
    assert os.listdir(sizes) == [f"input.{KEYS[0]}.9"]
    assert cache.usage()[0].bytes == 9
    # An entry without a record (older caches) is measured once and recorded.
    (sizes / f"input.{KEYS[0]}.9").unlink()
    assert cache.usage()[0].bytes == disk_usage(path)
    assert os.listdir(sizes) == [f"input.{KEYS[0]}.{disk_usage(path)}"]
    cache.remove("input", KEYS[0])
    assert cache.usage() == [] and os.listdir(sizes) == []


def test_disk_usage_counts_hard_links_once_and_follows_no_symlink(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    (tmp_path / "big").write_bytes(b"x" * 1_000_000)
    (tmp_path / "tree/file").write_bytes(b"y" * 200_000)
    os.link(tmp_path / "tree/file", tmp_path / "tree/link")
    (tmp_path / "tree/sym").symlink_to(tmp_path / "big")
    assert 200_000 <= disk_usage(tmp_path / "tree") < 400_000
    assert disk_usage(tmp_path / "missing") == 0


def test_a_fill_past_the_limit_evicts_least_recently_used_first(tmp_path: Path) -> None:
    size = disk_usage_of_one(tmp_path / "probe")
    cache = StagingCache(tmp_path / "cache", limit_bytes=3 * size)
    for key in KEYS[:3]:
        with cache.use("input", key):
            cache.fill("input", key, write_bytes(50_000))
        time.sleep(0.02)  # distinct stamps
    with cache.use("input", KEYS[0]):  # used again: now the most recent
        pass
    time.sleep(0.02)
    assert [entry.key for entry in cache.usage()] == [KEYS[1], KEYS[2], KEYS[0]]
    with cache.use("input", KEYS[3]):
        cache.fill("input", KEYS[3], write_bytes(50_000))
    assert sorted(cache.entries("input")) == sorted([KEYS[0], KEYS[2], KEYS[3]])
    with cache.use("input", KEYS[4]):
        cache.fill("input", KEYS[4], write_bytes(50_000))
    assert sorted(cache.entries("input")) == sorted([KEYS[0], KEYS[3], KEYS[4]])
    assert sum(entry.bytes for entry in cache.usage()) <= 3 * size
    # Under the limit: nothing goes.
    assert cache.evict(3 * size) == []
    assert [entry.key for entry in cache.evict(0)] == [KEYS[0], KEYS[3], KEYS[4]]
    assert cache.usage() == [] and cache.entries("input") == []


def disk_usage_of_one(directory: Path) -> int:
    directory.mkdir()
    write_bytes(50_000)(directory)
    os.chmod(directory, 0o755)
    return disk_usage(directory)


def test_an_entry_in_use_is_never_evicted_even_past_the_limit(tmp_path: Path) -> None:
    cache = StagingCache(tmp_path, limit_bytes=1)
    with cache.use("rootfs", KEYS[0]):
        path = cache.fill("rootfs", KEYS[0], write_bytes(50_000))
        assert cache.get("rootfs", KEYS[0]) == path  # over the limit, but held
        with cache.use("input", KEYS[1]):
            cache.fill("input", KEYS[1], write_bytes(50_000))
            assert cache.get("rootfs", KEYS[0]) == path
            assert {entry.key for entry in cache.usage() if entry.in_use} == set(KEYS[:2])
            assert cache.evict(0) == []
        # Released: the next fill's eviction (or gc) may take them.
        assert [entry.key for entry in cache.evict(0)] == [KEYS[1]]
    assert [entry.key for entry in cache.evict(0)] == [KEYS[0]]


def _hold_entries(root: str, key: str, ready: Any, done: Any, seen: Any) -> None:
    cache = StagingCache(Path(root), limit_bytes=1)
    with cache.use("input", key):
        path = cache.fill("input", key, write_bytes(100_000))
        ready.wait()  # every process has filled (and evicted what it could)
        for _ in range(20):
            seen.put((key, (path / "data").exists()))
            time.sleep(0.01)
        done.wait()


@pytest.mark.slow
def test_concurrent_processes_never_evict_each_others_entries(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    ready, done = context.Barrier(5), context.Barrier(5)
    seen = context.Queue()
    processes = [
        context.Process(target=_hold_entries, args=(str(tmp_path), key, ready, done, seen))
        for key in KEYS[:4]
    ]
    for process in processes:
        process.start()
    ready.wait(timeout=30)
    done.wait(timeout=30)
    for process in processes:
        process.join(30)
        assert process.exitcode == 0
    observations = [seen.get(timeout=5) for _ in range(80)]
    assert all(present for _, present in observations), observations
    # Every one filled past a 1-byte limit and evicted all it could: each held its own.
    cache = StagingCache(tmp_path, limit_bytes=1)
    assert sorted(cache.entries("input")) == sorted(KEYS[:4])
    assert len(cache.evict(0)) == 4


def test_use_after_an_eviction_takes_the_new_lock(tmp_path: Path) -> None:
    cache = StagingCache(tmp_path)
    with cache.use("input", KEYS[0]):
        cache.fill("input", KEYS[0], write_tree)
    assert len(cache.evict(0)) == 1
    assert not (tmp_path / "locks" / f"input.{KEYS[0]}.use").exists()
    with cache.use("input", KEYS[0]):
        cache.fill("input", KEYS[0], write_tree)
        assert cache.evict(0) == []  # the new lock file is the one held


def test_sweep_removes_use_locks_of_missing_entries_no_run_holds(tmp_path: Path) -> None:
    cache = StagingCache(tmp_path)
    with cache.use("rootfs", KEYS[0]):
        pass  # staging failed: a lock without an entry
    with cache.use("input", KEYS[1]):
        cache.fill("input", KEYS[1], write_tree)
    with cache.use("rootfs", KEYS[2]):  # a run about to stage it
        assert cache.sweep_use_locks() == 1
        assert sorted(os.listdir(tmp_path / "locks")) == sorted(
            [f"input.{KEYS[1]}", f"input.{KEYS[1]}.use", f"rootfs.{KEYS[2]}.use"]
        )
    assert cache.get("input", KEYS[1]) is not None


def test_take_moves_an_entry_no_run_holds_and_forgets_it(tmp_path: Path) -> None:
    cache = StagingCache(tmp_path / "cache")
    path = cache.fill("input", KEYS[0], write_bytes(1000))
    # A run holds it: nothing moves.
    dest = Path(tempfile.mkdtemp(dir=tmp_path / "cache" / "tmp"))
    with cache.use("input", KEYS[0]):
        assert not cache.take("input", KEYS[0], dest)
    assert cache.get("input", KEYS[0]) == path and os.listdir(dest) == []
    assert cache.take("input", KEYS[0], dest)
    assert (dest / "data").read_bytes() == b"x" * 1000
    assert cache.get("input", KEYS[0]) is None and cache.usage() == []
    assert os.listdir(tmp_path / "cache" / "sizes") == []
    # Gone: a second take has nothing to move.
    assert not cache.take("input", KEYS[0], Path(tempfile.mkdtemp(dir=tmp_path)))
