"""The staging cache's limit in real runs; `du` and `gc` of a data directory of its own: every
part of it, the /output templates and the example images' tarballs too."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipfs_execute_magic.disk_space import PathUsage, collect, usage
from ipfs_execute_magic.errors import NotRetrievableError, UsageError
from ipfs_execute_magic.images import catalog
from ipfs_execute_magic.node import EmbeddedNode
from ipfs_execute_magic.record import RunRequest
from ipfs_execute_magic.result import RunResult
from ipfs_execute_magic.runner import Runner
from ipfs_execute_magic.settings import Settings
from ipfs_execute_magic.staging_cache import disk_usage
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
        # The input is staged as a scripted base: the data, with the script bound over it.
        assert cache.entries("scripted") == [first] and cache.entries("rootfs") == [busybox]
        result = runner.run(RunRequest(busybox, second, script="cat /input/b > /output/out"))
        assert runner.store.cat(f"{result}/out") == b"second\n"
        # The second run's fill evicted the first input (not in use); its own trees stayed.
        assert cache.entries("scripted") == [second] and cache.entries("rootfs") == [busybox]
        assert {entry.key for entry in cache.usage()} == {busybox, second}
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
        assert {entry.kind for entry in held_usage.staging} == {"rootfs", "scripted"}
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


def _disk_bytes(path: Path) -> int:
    return path.lstat().st_blocks * 512


def _on_its_own_file_system(result: RunResult) -> bool:
    """Whether the run's /output was a copy of a template (root: an ext4 image of its own)."""
    return "own ext4 file system" in result.record.limits_enforced["output_bytes"]


def test_du_and_gc_count_output_templates_and_images(own_home: Settings) -> None:
    """du lists the /output templates runs copy and the example images' tarballs with their
    sizes on disk; gc deletes the templates (the next run makes its own again) and the
    tarballs only with images=True (the next use builds them again, to the same CID)."""
    settings = own_home.with_changes(staging_limit_bytes=20 * 1024**3)
    with Runner(settings) as runner:
        busybox = catalog.ensure("busybox", settings, runner.store)
        result = runner.run(RunRequest(busybox, None, script="echo one > /output/out"))
        assert _on_its_own_file_system(result)
    templates = settings.output_templates_dir
    [template] = templates.iterdir()
    tarball = settings.home / "images" / "busybox.tar.gz"
    record = settings.home / "images" / "busybox.json"

    held = usage(settings)
    assert held.output_templates == [PathUsage(template, _disk_bytes(template))]
    # Sparse: what the disk holds of a 10 GiB image, not its length.
    assert 0 < held.output_templates_bytes < 16 * 1024**2 < template.stat().st_size
    assert held.images == [PathUsage(tarball, _disk_bytes(tarball) + _disk_bytes(record))]
    assert held.images[0].bytes > 500_000  # busybox, gzipped
    assert held.images[0].bytes <= held.images_bytes < held.images[0].bytes + 64 * 1024
    text = str(held)
    assert "output templates: 1 (formatted /output images" in text
    assert "images: busybox built (gc --images deletes them" in text
    # Every part counted: what is left over is directories, keys and small files.
    assert 0 <= disk_usage(settings.home) - held.total_bytes < 2 * 1024**2

    with Store.connect(settings) as store:
        report = collect(settings, store)
    assert report.output_templates == 1
    assert report.output_templates_bytes == held.output_templates_bytes
    assert report.images == [] and report.images_bytes == 0 and report.images_left == ["busybox"]
    assert "images: none deleted, busybox kept (--images deletes them)" in str(report)
    assert templates.is_dir() and list(templates.iterdir()) == []
    assert tarball.is_file() and record.is_file()
    after = usage(settings)
    assert after.output_templates == [] and after.images == held.images

    # The next run makes its template again.
    with Runner(settings) as runner:
        result = runner.run(RunRequest(busybox, None, script="echo two > /output/out"))
        assert _on_its_own_file_system(result)
    assert [path.name for path in templates.iterdir()] == [template.name]

    with Store.connect(settings) as store:
        report = collect(settings, store, images=True)
        assert report.images == ["busybox"] and report.images_left == []
        assert report.images_bytes == held.images[0].bytes
        assert "images: busybox deleted" in str(report)
        assert not tarball.exists() and not record.exists()
        assert usage(settings).images == []
        assert store.is_pinned(busybox)  # runs that name the image keep working
        said: list[str] = []
        assert catalog.ensure("busybox", settings, store, on_progress=said.append) == busybox
        assert any("building" in line for line in said) and tarball.is_file()


def _flock_waiting(directory: Path) -> bool:
    """Whether some process waits for a shared flock on `directory` (/proc/locks: `->`)."""
    info = directory.stat()
    where = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and "FLOCK" in fields and "READ" in fields and where in fields:
            return True
    return False


def test_gc_never_deletes_a_template_a_run_is_taking(
    own_home: Settings, busybox_tarball: Path
) -> None:
    templates = own_home.output_templates_dir
    with Runner(own_home) as runner:
        busybox = runner.store.add_path(busybox_tarball)
        assert _on_its_own_file_system(
            runner.run(RunRequest(busybox, None, script="echo a > /output/a"))
        )
        [template] = templates.iterdir()

        outcome: dict[str, RunResult] = {}

        def run_b() -> None:
            outcome["b"] = runner.run(RunRequest(busybox, None, script="echo b > /output/b"))

        thread = threading.Thread(target=run_b)
        held = os.open(templates, os.O_RDONLY | os.O_DIRECTORY)
        try:
            # As a run holds the directory while it takes its template: gc leaves them.
            fcntl.flock(held, fcntl.LOCK_SH)
            report = collect(own_home, None)
            assert report.output_templates is None and report.output_templates_bytes == 0
            assert "output templates: a run was using them, left" in str(report)
            assert template.is_file()

            # As gc holds it while it deletes them: a run waits for it, then goes on.
            fcntl.flock(held, fcntl.LOCK_EX)
            thread.start()
            deadline = time.monotonic() + 60
            while not _flock_waiting(templates) and thread.is_alive():
                assert time.monotonic() < deadline, "the run never waited for the templates"
                time.sleep(0.01)
            assert thread.is_alive() and "b" not in outcome
        finally:
            os.close(held)
        thread.join(timeout=120)
    assert _on_its_own_file_system(outcome["b"])
    assert [path.name for path in templates.iterdir()] == [template.name]


def test_cli_gc_images_and_the_next_build_gives_the_same_cid(own_home: Settings) -> None:
    env = dict(os.environ, IPFS_EXECUTE_HOME=str(own_home.home))
    tarball = own_home.home / "images" / "busybox.tar.gz"

    def cli(*words: str) -> str:
        return subprocess.run(
            [CLI, *words], env=env, capture_output=True, text=True, check=True
        ).stdout

    cid = cli("image", "build", "busybox").strip()
    du = cli("du")
    assert "images: busybox built" in du and "output templates: 0" in du
    gc = cli("gc")
    assert "images: none deleted, busybox kept (--images deletes them)" in gc
    assert tarball.is_file()
    gc = cli("gc", "--images")
    assert "images: busybox deleted" in gc and not tarball.exists()
    assert "images: none built" in cli("du")
    assert cli("image", "build", "busybox").strip() == cid and tarball.is_file()


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
        ip.run_line_magic("ipfs_gc", "--images")
        assert "images: none deleted" in capsys.readouterr().out
    finally:
        ip.run_line_magic("config", "IpfsExecuteMagics.staging_limit = None")
        ip.run_line_magic("config", f"IpfsExecuteMagics.home = {str(home)!r}")
    assert ie.default_runner().settings.home == home
