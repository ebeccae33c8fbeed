"""/output areas made ahead and released in the background (sandbox/output_pool.py), with real
images, loop devices and mounts when run as root, and through a real Runner and node."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from helpers import wait_for

from ipfs_execute_magic.sandbox.output_area import UNUSED_MARKER, loop_mount_problem
from ipfs_execute_magic.sandbox.output_pool import OutputAreaPool
from ipfs_execute_magic.settings import Limits

MiB = 1024**2
LIMITS = Limits(output_bytes=16 * MiB, output_files=100)
OTHER_LIMITS = Limits(output_bytes=32 * MiB, output_files=100)


def _mounts_under(path: Path) -> list[str]:
    return [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4].startswith(str(path))
    ]


class _Dirs:
    """Run directories under one parent, as the runner makes them; counts what was made."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made = 0
        root.mkdir()

    def new(self) -> Path:
        self.made += 1
        path = self.root / f"run-{self.made}"
        path.mkdir()
        return path

    def present(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir())


@pytest.fixture
def dirs(tmp_path: Path) -> _Dirs:
    return _Dirs(tmp_path / "runs")


def _pool(dirs: _Dirs, tmp_path: Path, **timing: float) -> OutputAreaPool:
    return OutputAreaPool(dirs.new, shutil.rmtree, tmp_path / "templates", **timing)


def test_a_first_run_makes_and_releases_its_area_itself(dirs: _Dirs, tmp_path: Path) -> None:
    pool = _pool(dirs, tmp_path)
    area = pool.take(LIMITS)
    assert area.path.is_dir() and not any(area.path.iterdir())
    if loop_mount_problem() is None:
        assert os.path.ismount(area.path)  # its own size-limited file system
    pool.give_back(area, LIMITS)
    # Synchronously: a one-off run (the CLI) leaves nothing for a thread to finish.
    assert dirs.present() == [] and _mounts_under(dirs.root) == []
    assert pool._worker is None
    pool.close()


def test_from_the_second_run_the_next_area_is_made_while_idle_and_taken(
    dirs: _Dirs, tmp_path: Path
) -> None:
    pool = _pool(dirs, tmp_path, settle_s=0.01)
    for _ in range(2):
        area = pool.take(LIMITS)
        (area.path / "out.txt").write_text("an output, saved")
        pool.give_back(area, LIMITS)
    # Once idle, the used area is gone and one for the next run waits, empty.
    assert wait_for(lambda: dirs.present() == ["run-3"]), dirs.present()
    assert wait_for(lambda: pool._waiting is not None and pool._waiting.done.is_set())
    waiting = dirs.root / "run-3" / "output"
    if loop_mount_problem() is None:
        assert _mounts_under(dirs.root) == [str(waiting)]
    # Whoever finds it once its process is dead removes it.
    assert (waiting.parent / UNUSED_MARKER).exists()
    area = pool.take(LIMITS)
    assert area.path == waiting and not any(area.path.iterdir())
    assert dirs.made == 3  # taken, not made again
    # A run's now: what it writes stays should the process die.
    assert not (waiting.parent / UNUSED_MARKER).exists()
    pool.give_back(area, LIMITS)
    pool.close()
    assert dirs.present() == [] and _mounts_under(dirs.root) == []


def test_runs_that_come_too_fast_do_the_work_themselves(dirs: _Dirs, tmp_path: Path) -> None:
    # The background never gets a quiet moment: every area is made and released by its run.
    pool = _pool(dirs, tmp_path, settle_s=60)
    for _ in range(5):
        area = pool.take(LIMITS)
        pool.give_back(area, LIMITS)
        # At most the last run's area is left for the background; nothing piles up.
        assert len(dirs.present()) <= 1
    assert dirs.made == 5
    pool.close()
    assert dirs.present() == [] and _mounts_under(dirs.root) == []


def test_an_area_nobody_comes_for_is_released(dirs: _Dirs, tmp_path: Path) -> None:
    pool = _pool(dirs, tmp_path, settle_s=0.01, idle_s=0.3)
    for _ in range(2):
        pool.give_back(pool.take(LIMITS), LIMITS)
    assert wait_for(lambda: dirs.present() == ["run-3"])
    assert wait_for(lambda: dirs.present() == [] and _mounts_under(dirs.root) == [], 5)
    # And the next run still gets an area.
    area = pool.take(LIMITS)
    assert area.path.is_dir()
    pool.give_back(area, LIMITS)
    pool.close()
    assert dirs.present() == []


def test_other_limits_get_their_own_area(dirs: _Dirs, tmp_path: Path) -> None:
    pool = _pool(dirs, tmp_path, settle_s=0.01)
    for _ in range(2):
        pool.give_back(pool.take(LIMITS), LIMITS)
    assert wait_for(lambda: pool._waiting is not None and pool._waiting.done.is_set())
    waiting = pool._waiting.area
    assert waiting is not None
    area = pool.take(OTHER_LIMITS)
    assert area.path != waiting.path  # not the one made for other limits
    if loop_mount_problem() is None:
        assert os.statvfs(area.path).f_blocks * os.statvfs(area.path).f_frsize > 24 * MiB
    pool.give_back(area, OTHER_LIMITS)  # the next one is made for these limits instead
    assert not waiting.path.exists()
    pool.close()
    assert dirs.present() == [] and _mounts_under(dirs.root) == []


def test_concurrent_runs_each_get_an_area_of_their_own(dirs: _Dirs, tmp_path: Path) -> None:
    pool = _pool(dirs, tmp_path, settle_s=0.001)
    for _ in range(2):
        pool.give_back(pool.take(LIMITS), LIMITS)
    taken: list[Path] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for _ in range(5):
                area = pool.take(LIMITS)
                taken.append(area.path)
                (area.path / "mine").write_text(str(area.path))
                time.sleep(0.005)
                assert (area.path / "mine").read_text() == str(area.path)
                pool.give_back(area, LIMITS)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(taken) == len(set(taken)) == 20  # never one area for two runs
    pool.close()
    assert dirs.present() == [] and _mounts_under(dirs.root) == []


@pytest.mark.slow  # a real node and runs
def test_a_runner_leaves_no_run_directory_or_mount_behind(
    tmp_path: Path, store, busybox_cid
) -> None:
    from ipfs_execute_magic.record import RunRequest
    from ipfs_execute_magic.runner import RunConditions, Runner
    from ipfs_execute_magic.settings import Settings

    # A data directory of its own (on the session's node): nobody else's runs in it.
    settings = Settings(home=tmp_path / "home", api=store.api)
    runner = Runner(settings)
    request = RunRequest(rootfs=busybox_cid, input=None, args=("true",))
    for _ in range(3):
        assert runner.run(request, RunConditions(use_cache=False)).record.exit_status == 0
    # The area for a fourth run waits (a run directory of its own, held by this process) ...
    assert wait_for(lambda: len(list(settings.runs_dir.iterdir())) == 1)
    runner.close()
    # ... and goes with the runner.
    assert list(settings.runs_dir.iterdir()) == []
    assert _mounts_under(settings.runs_dir) == []


def _runs_in_a_process(settings, store, busybox_cid: str, then: str) -> subprocess.CompletedProcess:
    """Three runs in a process of their own, a pause (the next run's area is made by then),
    and `then` (Python, with os, signal and the runner imported)."""
    script = textwrap.dedent(
        f"""
        import os, signal, time
        from ipfs_execute_magic.record import RunRequest
        from ipfs_execute_magic.runner import RunConditions, Runner
        from ipfs_execute_magic.settings import Settings
        runner = Runner(Settings(home={str(settings.home)!r}, api={store.api!r}))
        request = RunRequest(rootfs={busybox_cid!r}, input=None, args=("true",))
        for _ in range(3):
            runner.run(request, RunConditions(use_cache=False))
        time.sleep(0.5)
        """
    )
    return subprocess.run(
        [sys.executable, "-c", script + then],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )


@pytest.mark.slow  # a real node and runs, in a process of their own
def test_a_process_that_exits_without_closing_its_runner_releases_the_area(
    tmp_path: Path, store, busybox_cid
) -> None:
    from ipfs_execute_magic.settings import Settings

    settings = Settings(home=tmp_path / "home", api=store.api)
    done = _runs_in_a_process(
        settings, store, busybox_cid, "print(len(list(runner.settings.runs_dir.iterdir())))\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1"]  # it was there
    assert list(settings.runs_dir.iterdir()) == []  # and the exit released it
    assert _mounts_under(settings.runs_dir) == []


@pytest.mark.slow  # a real node and runs, in a process of their own
def test_an_area_made_ahead_by_a_killed_process_is_removed_by_the_next_run(
    tmp_path: Path, store, busybox_cid
) -> None:
    from ipfs_execute_magic.sandbox import release_stale_outputs
    from ipfs_execute_magic.settings import Settings

    settings = Settings(home=tmp_path / "home", api=store.api)
    # No exit handler runs: as a kernel shut down at once.
    done = _runs_in_a_process(
        settings, store, busybox_cid, "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert done.returncode == -9, done.stderr
    (left,) = list(settings.runs_dir.iterdir())
    assert (left / UNUSED_MARKER).exists()
    if loop_mount_problem() is None:
        assert _mounts_under(settings.runs_dir) == [str(left / "output")]
    release_stale_outputs(settings.runs_dir)  # what the next run (or gc) does first
    assert list(settings.runs_dir.iterdir()) == [] and _mounts_under(settings.runs_dir) == []
