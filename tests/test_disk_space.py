"""The staging cache's limit in real runs; `du` and `gc` of a data directory of its own."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipfs_execute_magic.disk_space import collect, usage
from ipfs_execute_magic.errors import NotRetrievableError, UsageError
from ipfs_execute_magic.node import EmbeddedNode
from ipfs_execute_magic.record import RunRequest
from ipfs_execute_magic.runner import Runner
from ipfs_execute_magic.settings import Settings
from ipfs_execute_magic.store import Store

CLI = str(Path(sys.prefix) / "bin" / "ipfs-execute")


@pytest.fixture()
def own_home(scratch: Path) -> Iterator[Settings]:
    """A data directory (and node) of its own: gc here frees nothing other tests need."""
    settings = Settings(home=scratch / "home", staging_limit_bytes=1)
    yield settings
    EmbeddedNode(settings).stop()


def test_runs_past_the_limit_keep_what_they_use_and_evict_the_rest(
    own_home: Settings, busybox_tarball: Path
) -> None:
    with Runner(own_home) as runner:
        busybox = runner.store.add_path(busybox_tarball)
        first = runner.store.compose({"a": runner.store.add_bytes(b"first\n")})
        second = runner.store.compose({"b": runner.store.add_bytes(b"second\n")})
        cache = runner.staging_cache
        # A 1-byte limit: every fill is past it, yet the trees a run uses stay until it ends.
        result = runner.run(RunRequest(busybox, first, script="cat /input/a > /output/out"))
        assert runner.store.cat(f"{result}/out") == b"first\n"
        staged = result.record.input  # the input with the script in it
        assert cache.entries("input") == [staged] and cache.entries("rootfs") == [busybox]
        result = runner.run(RunRequest(busybox, second, script="cat /input/b > /output/out"))
        assert runner.store.cat(f"{result}/out") == b"second\n"
        # The second run's fill evicted the first input (not in use); its own trees stayed.
        staged = result.record.input
        assert cache.entries("input") == [staged] and cache.entries("rootfs") == [busybox]
        assert {entry.key for entry in cache.usage()} == {busybox, staged}
        assert not any(entry.in_use for entry in cache.usage())


def test_du_and_gc_say_what_is_held_and_free_it(own_home: Settings, busybox_tarball: Path) -> None:
    settings = own_home.with_changes(staging_limit_bytes=20 * 1024**3)
    with Runner(settings) as runner:
        store = runner.store
        busybox = store.add_path(busybox_tarball)
        result = runner.run(RunRequest(busybox, None, script="echo kept > /output/out"))
        # Blocks nobody pins: a copy of someone else's content, say.
        unpinned = store.add_bytes(os.urandom(3 * 1024**2), pin=False)

    kept = settings.kept_outputs_dir / "20260101T000000-deadbeef"
    kept.mkdir(parents=True)
    (kept / "result").write_bytes(b"r" * 100_000)
    dead_run = settings.runs_dir / "20260101T000000-0badf00d"
    (dead_run / "output").mkdir(parents=True)
    (dead_run / "output/partial").write_bytes(b"p" * 200_000)
    old = time.time() - 3600
    os.utime(dead_run, (old, old))
    live_run = settings.runs_dir / "20260101T000001-11111111"
    live_run.mkdir()
    os.utime(live_run, (old, old))
    held = os.open(live_run, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(held, fcntl.LOCK_EX)  # as a run in progress holds its directory
    try:
        held_usage = usage(settings)
        assert {entry.kind for entry in held_usage.staging} == {"rootfs", "input"}
        assert held_usage.staging_bytes > 1024**2  # busybox, extracted
        assert held_usage.node_repo_bytes is not None and held_usage.node_repo_bytes > 3 * 1024**2
        assert [(k.path, k.bytes >= 100_000) for k in held_usage.kept_outputs] == [(kept, True)]
        assert {(run.path, run.stale) for run in held_usage.runs} == {
            (dead_run, True),
            (live_run, False),
        }
        text = str(held_usage)
        assert "2 entries, 0 in use" in text and str(kept) in text

        with Store.connect(settings) as store:
            report = collect(settings, store)
            assert report.staging_entries == 2
            assert report.staging_bytes == held_usage.staging_bytes
            assert report.runs == 1 and report.runs_bytes >= 200_000
            assert report.repo_blocks is not None and report.repo_blocks >= 3
            assert report.repo_bytes >= 3 * 1024**2
            assert report.kept_outputs == 0 and report.kept_outputs_left == 1
            assert "freed in total" in str(report)
            # What records name is pinned: the output and its record are still here.
            assert store.cat(f"{result}/out") == b"kept\n"
            assert store.cat(result.record_cid)
            with pytest.raises(NotRetrievableError):
                store.cat(unpinned)  # gone from the offline node
    finally:
        os.close(held)
    assert kept.is_dir() and live_run.is_dir() and not dead_run.exists()
    after = usage(settings)
    assert after.staging == [] and len(after.kept_outputs) == 1

    # The kept outputs go only when asked for.
    with Store.connect(settings) as store:
        report = collect(settings, store, kept_outputs=True)
    assert report.kept_outputs == 1 and report.kept_outputs_bytes >= 100_000
    assert not kept.exists()


def test_cli_du_and_gc(own_home: Settings, busybox_tarball: Path) -> None:
    env = dict(os.environ, IPFS_EXECUTE_HOME=str(own_home.home))
    kept = own_home.kept_outputs_dir / "20260101T000000-cafebabe"
    kept.mkdir(parents=True)
    (kept / "x").write_text("x")
    du = subprocess.run([CLI, "du"], env=env, capture_output=True, text=True, check=True)
    assert "staging cache: 0 entries" in du.stdout and str(kept) in du.stdout
    gc = subprocess.run([CLI, "gc"], env=env, capture_output=True, text=True, check=True)
    assert "freed in total" in gc.stdout and "0 deleted, 1 kept" in gc.stdout
    assert kept.exists()
    gc = subprocess.run(
        [CLI, "--staging-limit", "1G", "gc", "--kept-outputs"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "1 deleted, 0 kept" in gc.stdout and not kept.exists()


def test_the_limit_comes_from_the_environment_and_is_checked(monkeypatch) -> None:
    assert Settings().staging_limit_bytes == 20 * 1024**3
    monkeypatch.setenv("IPFS_EXECUTE_STAGING_LIMIT", "5G")
    assert Settings.from_env().staging_limit_bytes == 5 * 1024**3
    assert Settings.from_env(staging_limit_bytes="1T").staging_limit_bytes == 1024**4
    monkeypatch.setenv("IPFS_EXECUTE_STAGING_LIMIT", "lots")
    with pytest.raises(UsageError, match="IPFS_EXECUTE_STAGING_LIMIT"):
        Settings.from_env()


def test_magics_du_gc_and_the_limit_in_config(
    ip, home: Path, own_home: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    import ipfs_execute_magic as ie

    kept = own_home.kept_outputs_dir / "20260101T000000-feedface"
    kept.mkdir(parents=True)
    try:
        ip.run_line_magic("config", f"IpfsExecuteMagics.home = {str(own_home.home)!r}")
        ip.run_line_magic("config", "IpfsExecuteMagics.staging_limit = '3G'")
        assert ie.default_runner().settings.staging_limit_bytes == 3 * 1024**3
        assert ie.default_runner().staging_cache.limit_bytes == 3 * 1024**3
        capsys.readouterr()
        ip.run_line_magic("ipfs_du", "")
        assert str(kept) in capsys.readouterr().out
        ip.run_line_magic("ipfs_gc", "")
        assert "0 deleted, 1 kept" in capsys.readouterr().out and kept.exists()
        ip.run_line_magic("ipfs_gc", "--kept-outputs")
        assert "1 deleted, 0 kept" in capsys.readouterr().out and not kept.exists()
    finally:
        ip.run_line_magic("config", "IpfsExecuteMagics.staging_limit = None")
        ip.run_line_magic("config", f"IpfsExecuteMagics.home = {str(home)!r}")
    assert ie.default_runner().settings.home == home
