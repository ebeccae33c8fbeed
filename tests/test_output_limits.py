"""/output's byte and file-count limits, with the real bwrap, mount and Kubo node.

As root /output is a loop-mounted ext4 image of its own; otherwise a watched directory. Both
end a run that passes a limit, and the run's record says which limit it was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import ipfs_execute, left_run_dirs, wait_for

from ipfs_execute_magic.record import RunRecord
from ipfs_execute_magic.sandbox import SandboxSpec, create_output_area, run_sandbox
from ipfs_execute_magic.sandbox.output_area import (
    OutputWatch,
    image_size,
    loop_mount_problem,
    template_path,
)
from ipfs_execute_magic.settings import Limits

MiB = 1024**2
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="only root mounts /output's image")


@pytest.fixture
def base_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="iex-output-limits-"))
    root = base / "rootfs"
    for name in ("bin", "sbin", "input", "output", "tmp", "proc", "dev"):
        (root / name).mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    for applet in ("sh", "head", "touch", "echo", "sync", "ls", "stat", "cat"):
        (root / "bin" / applet).symlink_to("busybox")
    (root / "sbin" / "init").write_text('#!/bin/busybox sh\nexec "$@"\n')
    (root / "sbin" / "init").chmod(0o755)
    (base / "input").mkdir()
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _loop_mounts_of(path: Path) -> list[str]:
    return [
        line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(path) in line
    ]


def _loop_devices_of(path: Path) -> list[str]:
    listing = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True)
    return [line for line in listing.stdout.splitlines() if str(path) in line]


def _run(base: Path, script: str, limits: Limits):
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    area = create_output_area(run_dir / "output", limits)
    spec = SandboxSpec(
        rootfs=base / "rootfs",
        input_dir=base / "input",
        output_dir=area.path,
        argv=("/sbin/init", "sh", "-c", script),
        limits=limits,
    )
    return area, run_sandbox(spec)


# --- pure -----------------------------------------------------------------------------------


def test_limits_come_from_every_front_end_through_with_overrides() -> None:
    limits = Limits().with_overrides(output_size="1G", output_files="5000")
    assert (limits.output_bytes, limits.output_files) == (1024**3, 5000)
    assert (Limits().output_bytes, Limits().output_files) == (10 * 1024**3, 1_000_000)
    with pytest.raises(Exception, match="positive"):
        Limits(output_files=0)


def test_records_name_the_output_limit_that_ended_a_run() -> None:
    record = RunRecord.from_json(
        json.dumps(
            {
                "format": "ipfs-execute/run-record/1",
                "rootfs": "r",
                "input": "i",
                "output": "o",
                "args": [],
                "exit_status": 0,
                "timed_out": False,
                "started_at": "",
                "durations": {},
                "limits": {"output_bytes": 10 * 1024**3, "output_files": 1_000_000},
                "limits_enforced": {},
                "versions": {},
                "staged_from_cache": {},
                "killed_by": "output_bytes",
            }
        )
    )
    assert record.killed_text() == "killed: output exceeded 10 GiB"
    assert not record.succeeded  # even though the payload exited 0: its output is cut short
    files = dataclasses.replace(record, killed_by="output_files")
    assert files.killed_text() == "killed: output exceeded 1000000 files"


def test_the_watch_measures_a_plain_directory(tmp_path: Path) -> None:
    watch = OutputWatch(tmp_path, Limits(output_bytes=64 * 1024, output_files=3))
    assert not watch.own_file_system and watch.check() is None
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a").write_bytes(b"x" * 1000)
    (tmp_path / "link").symlink_to("/usr")  # counted, never followed
    assert watch.usage()[1] == 3 and watch.check() is None
    (tmp_path / "b").write_bytes(b"y")
    assert watch.check() == "output_files"
    big = OutputWatch(tmp_path, Limits(output_bytes=64 * 1024))
    (tmp_path / "big").write_bytes(os.urandom(100 * 1024))
    assert big.check() == "output_bytes"


# --- as root: a file system of its own --------------------------------------------------------


@needs_root
def test_output_size_limit_ends_the_run_and_bounds_the_disk(base_dir: Path) -> None:
    assert loop_mount_problem() is None
    limits = Limits(timeout=60, output_bytes=8 * MiB)
    # Tries to write 200 MiB; then checks that /output is really full (ENOSPC), not just
    # watched, if it is still alive by then.
    area, result = _run(base_dir, "head -c 209715200 /dev/zero > /output/big; sync", limits)
    try:
        assert area.image is not None
        assert result.killed_by == "output_bytes"
        assert "ext4" in result.limits_enforced["output_bytes"]
        os.sync()
        on_disk = area.image.stat().st_blocks * 512
        written = (area.path / "big").stat().st_size
        # What the host disk holds of it: never more than the image can take, the limit plus
        # metadata (inode tables are only written as files are made: here almost none).
        assert written < image_size(limits) and on_disk <= image_size(limits)
        assert written <= on_disk <= limits.output_bytes + 17 * MiB
    finally:
        area.release()
    assert not area.path.exists() or not _loop_mounts_of(area.path)
    assert not (area.path.parent / "output.img").exists()


@needs_root
def test_output_file_limit_ends_the_run(base_dir: Path) -> None:
    limits = Limits(timeout=60, output_files=50)
    area, result = _run(base_dir, "i=0; while touch /output/f$i; do i=$((i+1)); done", limits)
    try:
        assert result.killed_by == "output_files"
        assert result.exit_status == 137  # killed, not stopped by itself
        assert len(os.listdir(area.path)) > 50
    finally:
        area.release()


@needs_root
def test_a_run_within_its_limits_sees_an_ordinary_empty_output(base_dir: Path) -> None:
    area, result = _run(
        base_dir,
        "stat -c %a,%u,%Y /output > /tmp/seen; ls -a /output >> /tmp/seen; "
        "cat /tmp/seen > /output/seen",
        Limits(timeout=60),
    )
    try:
        assert result.exit_status == 0 and result.killed_by is None
        assert (area.path / "seen").read_text() == "755,0,315532800\n.\n..\n"
    finally:
        area.release()


# --- through the CLI ----------------------------------------------------------------------


def test_cli_reports_an_output_over_its_size(home: Path, busybox_cid: str, empty_cid: str) -> None:
    done = ipfs_execute(
        home,
        "--no-cache",
        "--json",
        "--output-size",
        "4M",
        busybox_cid,
        empty_cid,
        "sh",
        "-c",
        "head -c 104857600 /dev/zero > /output/big",
    )
    assert done.returncode != 0, done.stderr
    assert "output exceeded 4 MiB" in done.stderr
    assert "--output-size" in done.stderr
    record = json.loads(done.stdout)
    assert record["killed_by"] == "output_bytes"
    assert record["limits"]["output_bytes"] == 4 * MiB
    assert record["output"]  # what it wrote until then is in IPFS
    # Nothing of the run is left: no run directory, so no image and no mount. (One held by a
    # runner of this process, made for its next run, may be there: it is not this run's.)
    assert left_run_dirs(home) == []
    held = list((home / "runs").iterdir())
    assert all(any(str(run) in mount for run in held) for mount in _loop_mounts_of(home))


@needs_root
def test_unprivileged_runs_are_watched(base_dir: Path) -> None:
    # As an ordinary user no file system can be mounted: /output is a plain directory,
    # walked while the payload runs.
    user = 1000
    for path in [base_dir, *base_dir.rglob("*")]:
        os.lchown(path, user, user)
    code = f"""
import json
from pathlib import Path
from ipfs_execute_magic.sandbox import SandboxSpec, create_output_area, run_sandbox
from ipfs_execute_magic.settings import Limits
base = Path({str(base_dir)!r})
limits = Limits(timeout=60, output_files=200)
area = create_output_area(base / "output", limits)
result = run_sandbox(SandboxSpec(rootfs=base / "rootfs", input_dir=base / "input",
    output_dir=area.path, limits=limits,
    argv=("/sbin/init", "sh", "-c", "i=0; while touch /output/f$i; do i=$((i+1)); done")))
print(json.dumps([area.image is None, result.killed_by, result.exit_status,
    result.limits_enforced["output_files"]]))
"""
    done = subprocess.run(
        [
            "setpriv",
            f"--reuid={user}",
            f"--regid={user}",
            "--clear-groups",
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    assert done.returncode == 0, done.stderr
    plain, killed_by, status, how = json.loads(done.stdout.splitlines()[-1])
    assert plain and killed_by == "output_files" and status == 137
    assert "watch" in how


@pytest.mark.slow  # real loop devices and mounts
@needs_root
def test_an_image_left_mounted_by_a_killed_run_is_unmounted_by_the_next(tmp_path: Path) -> None:
    from ipfs_execute_magic.sandbox import release_stale_outputs

    runs = tmp_path / "runs"
    (runs / "dead").mkdir(parents=True)
    (runs / "alive").mkdir()
    alive = create_output_area(runs / "alive" / "output", Limits(output_bytes=MiB))
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child: mounts, then dies without cleaning up
        try:
            create_output_area(runs / "dead" / "output", Limits(output_bytes=MiB))
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    try:
        assert os.path.ismount(runs / "dead" / "output")
        release_stale_outputs(runs)
        assert not os.path.ismount(runs / "dead" / "output")
        assert (runs / "dead" / "output.img").exists()  # what it wrote is not thrown away
        assert os.path.ismount(runs / "alive" / "output")  # a live run's is left alone
    finally:
        alive.release()
        subprocess.run(["umount", "-l", str(runs / "dead" / "output")], capture_output=True)
    assert not _loop_mounts_of(tmp_path) and not _loop_devices_of(tmp_path)


# --- templates and the syscall path -------------------------------------------------------


def _new_area(parent: Path, limits: Limits, templates: Path):
    parent.mkdir(parents=True)
    return create_output_area(parent / "output", limits, templates)


@pytest.mark.slow  # real loop devices and mounts
@needs_root
def test_output_images_are_copies_of_one_template_made_once(tmp_path: Path) -> None:
    limits = Limits(output_bytes=64 * MiB, output_files=1000)
    templates = tmp_path / "templates"
    # Four runs at once, none of them finding a template: each sees a whole one (or makes its
    # own), and each attaches a loop device of its own (some lose a race for a free one).
    with ThreadPoolExecutor(4) as pool:
        areas = list(pool.map(lambda name: _new_area(tmp_path / name, limits, templates), "abcd"))
    template = template_path(templates, limits)
    made = template.stat()
    try:
        # Four file systems from one template mounted at once (one UUID four times).
        for area in areas:
            assert area.image is not None
            assert os.listdir(area.path) == []  # lost+found gone
            info = os.stat(area.path)
            assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o755, 0, 0)
            (line,) = _loop_mounts_of(area.path)
            options = line.split()[5].split(",")
            assert "nosuid" in options and "nodev" in options, line
            space = os.statvfs(area.path)
            assert limits.output_bytes <= space.f_blocks * space.f_frsize <= image_size(limits)
            assert 1000 <= space.f_ffree < 1000 + 64
        for index, area in enumerate(areas):
            (area.path / f"f{index}").write_bytes(b"1" * MiB)
        assert [os.listdir(area.path) for area in areas] == [["f0"], ["f1"], ["f2"], ["f3"]]
        assert len(_loop_devices_of(tmp_path)) == 4
    finally:
        for area in areas:
            area.release()
    _new_area(tmp_path / "e", limits, templates).release()
    again = template.stat()
    assert (again.st_ino, again.st_mtime_ns) == (made.st_ino, made.st_mtime_ns)  # reused
    assert [path.name for path in templates.iterdir()] == [template.name]  # nothing partial
    assert again.st_blocks * 512 < MiB  # sparse, like the images copied from it
    assert not _loop_mounts_of(tmp_path) and not _loop_devices_of(tmp_path)
    assert not list(tmp_path.glob("*/output.img"))


def _truncate(template: Path) -> None:
    os.truncate(template, template.stat().st_size // 2)


def _zero_superblock(template: Path) -> None:
    with template.open("r+b") as file:
        file.seek(1024)
        file.write(bytes(1024))


def _garble_group_descriptors(template: Path) -> None:
    # The superblock still looks right: only mount(2) finds the damage.
    with template.open("r+b") as file:
        file.seek(4096)
        file.write(b"\xa5" * 4096)


def _head(template: Path) -> bytes:
    with template.open("rb") as file:
        return file.read(8192)


@pytest.mark.slow  # real loop devices and mounts
@needs_root
@pytest.mark.parametrize("damage", [_truncate, _zero_superblock, _garble_group_descriptors])
def test_a_damaged_template_is_made_anew(tmp_path: Path, damage) -> None:
    limits = Limits(output_bytes=16 * MiB, output_files=100)
    templates = tmp_path / "templates"
    _new_area(tmp_path / "a", limits, templates).release()
    template = template_path(templates, limits)
    damage(template)
    damaged = _head(template)
    area = _new_area(tmp_path / "b", limits, templates)
    try:
        assert area.image is not None and os.path.ismount(area.path)
        assert os.listdir(area.path) == []
    finally:
        area.release()
    assert _head(template) != damaged and template.stat().st_size == image_size(limits)
    assert not _loop_mounts_of(tmp_path) and not _loop_devices_of(tmp_path)


@pytest.mark.slow  # real loop devices and mounts
@needs_root
def test_without_a_usable_template_output_is_a_watched_directory(tmp_path: Path) -> None:
    limits = Limits(output_bytes=16 * MiB)
    templates = tmp_path / "not-a-directory"
    templates.write_text("")
    area = _new_area(tmp_path / "a", limits, templates)
    try:
        assert area.image is None and area.path.is_dir() and not os.path.ismount(area.path)
        assert "watch" in OutputWatch(area.path, limits).enforced()["output_bytes"]
    finally:
        area.release()
    assert not _loop_mounts_of(tmp_path) and not _loop_devices_of(tmp_path)
    assert not list(tmp_path.glob("*/output.img"))


_INTERRUPTED_RUN = """
import sys
from pathlib import Path
from ipfs_execute_magic.sandbox import OutputArea, SandboxSpec, run_sandbox
from ipfs_execute_magic.settings import Limits
base, run_dir = Path(sys.argv[1]), Path(sys.argv[2])
limits = Limits(timeout=120)
area = OutputArea(run_dir / "output", base / "templates")
try:
    area.create(limits)
    run_sandbox(SandboxSpec(rootfs=base / "rootfs", input_dir=base / "input",
        output_dir=area.path, limits=limits,
        argv=("/sbin/init", "sh", "-c", "touch /output/started; exec sleep 100")))
finally:
    area.release()
"""


@pytest.mark.slow  # real loop devices and mounts
@needs_root
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_runs_leave_no_mount_or_loop_device_behind(base_dir: Path, how) -> None:
    from ipfs_execute_magic.sandbox import release_stale_outputs

    def left_behind() -> tuple[list[str], list[str]]:
        return _loop_mounts_of(base_dir), _loop_devices_of(base_dir)

    runs = base_dir / "runs"
    # A run that ends normally first, from the same template.
    area, result = _run_with_template(base_dir, runs / "ended")
    assert result.exit_status == 0 and area.image is not None
    area.release()
    assert left_behind() == ([], [])

    run_dir = runs / "interrupted"
    run_dir.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTED_RUN, str(base_dir), str(run_dir)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    try:
        assert wait_for(lambda: (run_dir / "output" / "started").exists(), 30)
        mounts, devices = left_behind()
        assert len(mounts) == 1 and len(devices) == 1
        process.send_signal(how)
        process.wait(timeout=60)
    finally:
        process.kill()
        process.wait()
    if how == signal.SIGKILL:
        # Nothing could unmount: the next run does (its run directory is no longer locked).
        release_stale_outputs(runs)
        assert (run_dir / "output.img").exists()  # what it wrote is kept
    # The loop device goes with its last user: the payload, killed with its parent.
    assert wait_for(lambda: left_behind() == ([], []), 10), left_behind()


def _run_with_template(base: Path, run_dir: Path):
    run_dir.mkdir(parents=True)
    limits = Limits(timeout=60)
    area = create_output_area(run_dir / "output", limits, base / "templates")
    spec = SandboxSpec(
        rootfs=base / "rootfs",
        input_dir=base / "input",
        output_dir=area.path,
        argv=("/sbin/init", "sh", "-c", "ls -a /output > /tmp/seen; cat /tmp/seen > /output/seen"),
        limits=limits,
    )
    result = run_sandbox(spec)
    assert (area.path / "seen").read_text() == ".\n..\n"
    return area, result


def test_the_magic_takes_the_output_limits_as_options_and_config(ip) -> None:
    import ipfs_execute_magic as ie

    cell = ip.run_cell(
        "%%ipfs_execute $busybox --output-size 4M -o big\nhead -c 52428800 /dev/zero > /output/big"
    )
    error = str(cell.error_in_exec)
    assert "killed: output exceeded 4 MiB" in error and "--output-size" in error, error
    assert ip.user_ns["big"].record.killed_by == "output_bytes"
    ip.run_line_magic("config", "IpfsExecuteMagics.output_files = 20")
    ip.run_line_magic("config", "IpfsExecuteMagics.output_size = '1G'")
    try:
        limits = ie.default_runner().settings.limits
        assert (limits.output_bytes, limits.output_files) == (1024**3, 20)
    finally:
        ip.run_line_magic("config", "IpfsExecuteMagics.output_files = None")
        ip.run_line_magic("config", "IpfsExecuteMagics.output_size = None")
    assert ie.default_runner().settings.limits.output_files == 1_000_000
