"""/output with a byte and a file-count limit (`Limits.output_bytes`, `Limits.output_files`).

Two mechanisms, by what the caller may do:

- Run by root with loop devices (`OutputArea`): each run's /output is a file system of its
  own, a sparse ext4 image in the run directory made for the limits (`mkfs.ext4 -N`, no
  reserved blocks, no journal), loop-mounted before bwrap starts and unmounted once the output
  is in IPFS. The host disk never holds more of an output than the image can take: the limit
  plus ext4's metadata (`image_size`), whatever the payload does.
- Otherwise /output is a plain directory, and RLIMIT_FSIZE bounds each file.

Either way `OutputWatch` measures /output while the payload runs (statvfs of its own file
system, ten times a second; else a walk, at most a tenth of the time) and kills the sandbox
once it passes a limit; the run records which one.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import shutil
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SandboxError
from ..settings import Limits

# Bytes of every inode (mkfs -I) and of the file system's other metadata, as measured with
# mkfs.ext4 1.47 from 1 MiB / 10 files to 100 GiB / 50 million files: what must be added to
# the limit so that the payload can really use all of it.
_INODE_BYTES = 256
_INODE_OVERHEAD = 264
_BASE_OVERHEAD = 16 * 1024**2
_SPARE_INODES = 16  # the root, lost+found and the kernel's reserved ones

# A throwaway file system: no journal to write, nothing to grow, no backup superblocks, and
# its metadata packed at the start (fewer extents: the image is deleted faster).
_EXT4_FEATURES = "^has_journal,^resize_inode,sparse_super2"
_EXT4_EXTENDED = "packed_meta_blocks=1,num_backup_sb=0,lazy_itable_init=1,nodiscard,root_owner=0:0"


def image_size(limits: Limits) -> int:
    """Size of the image for `limits`: the limit plus metadata (about 0.4% and 16 MiB)."""
    assert limits.output_bytes is not None
    inodes = (limits.output_files or limits.output_bytes // 16384) + _SPARE_INODES
    size = limits.output_bytes + inodes * _INODE_OVERHEAD + limits.output_bytes // 256
    return -(-(size + _BASE_OVERHEAD) // 4096) * 4096


@functools.cache
def loop_mount_problem() -> str | None:
    """Why /output cannot be a file system of its own here, or None."""
    if os.geteuid() != 0:
        return "only root may mount a file system"
    try:
        identity = Path("/proc/self/uid_map").read_text().split() == ["0", "0", "4294967295"]
    except OSError:
        identity = False
    if not identity:
        return "root of a user namespace, which may not mount ext4"
    missing = [tool for tool in ("mkfs.ext4", "mount", "umount") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (Debian: e2fsprogs, mount)"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices here (/dev/loop-control is missing)"
    return None


@dataclass
class OutputArea:
    """One run's output directory at `path`, and the image behind it when it has one.

    Made with `create`; `release` undoes whatever `create` got to (also after an interrupt
    halfway), so a caller holds the object from before `create` to after `release`. The run
    directory (`path`'s parent) is flock'ed meanwhile: an image still mounted under a run
    directory nobody holds belongs to a process that died (`release_stale`).
    """

    path: Path
    image: Path | None = None
    _lock: int | None = field(default=None, init=False, repr=False)

    def create(self, limits: Limits) -> None:
        """A new, empty directory at `path`; size-limited when root may make it so. Where the
        image cannot be made or mounted (no free loop device, say), a plain directory: the
        watch still enforces the limits, and the record says how."""
        self._lock = _lock_run_dir(self.path.parent)
        self.path.mkdir(mode=0o700)
        if limits.output_bytes is None or loop_mount_problem() is not None:
            return
        self.image = self.path.with_name(f"{self.path.name}.img")
        try:
            _make_image(self.image, limits)
            _mount(self.image, self.path)
            (self.path / "lost+found").rmdir()  # the payload's /output starts empty
        except (SandboxError, OSError):
            self._drop_image()
        except BaseException:
            self._drop_image()
            raise

    def _drop_image(self) -> None:
        if self.image is None:
            return
        _unmount(self.path)
        if not os.path.ismount(self.path):  # else kept: it still holds the output
            self.image.unlink(missing_ok=True)
            self.image = None

    def release(self) -> None:
        """Unmount and delete the image; the output must have been saved or copied first."""
        self._drop_image()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def keep(self, destination: Path) -> None:
        """Move the output to `destination` (a copy, from an image, which then goes)."""
        if self.image is None:
            shutil.move(str(self.path), destination)
            return
        try:
            shutil.copytree(self.path, destination, symlinks=True)
        except shutil.Error as error:
            # Only FIFOs and sockets may fail to copy: IPFS could not hold them either.
            if any(_copyable(source) for source, _target, _why in error.args[0]):
                raise
        self._drop_image()


def _copyable(path: str) -> bool:
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return True
    return stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)


def create_output_area(path: Path, limits: Limits) -> OutputArea:
    """`OutputArea(path)`, created (for callers with nothing to undo when it fails)."""
    area = OutputArea(path)
    try:
        area.create(limits)
    except BaseException:
        area.release()
        raise
    return area


def _lock_run_dir(run_dir: Path) -> int:
    fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new directory: nobody else has it
    except BaseException:
        os.close(fd)
        raise
    return fd


def release_stale(runs_dir: Path) -> None:
    """Unmount the /output images of runs whose process died before it could (kill -9): a
    mount and a loop device each, otherwise kept until reboot. Their images stay, with what
    the payload wrote, like the output directories of such runs always did."""
    try:
        run_dirs = list(runs_dir.iterdir())
    except OSError:
        return
    for run_dir in run_dirs:
        output = run_dir / "output"
        if not os.path.ismount(output):
            continue
        try:
            fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _unmount(output)
        except OSError:
            continue  # held: its run is alive
        finally:
            os.close(fd)


def _run_tool(argv: list[str], what: str) -> None:
    try:
        subprocess.run(
            argv,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C"},
        )
    except subprocess.CalledProcessError as exc:
        message = (exc.stderr or exc.stdout or "").strip().splitlines()
        raise SandboxError(
            f"cannot {what}: {argv[0]} failed ({message[-1] if message else exc.returncode}); "
            "check free disk space and loop devices (losetup -f)"
        ) from None
    except (OSError, subprocess.SubprocessError) as exc:
        raise SandboxError(f"cannot {what}: {exc}") from None


def _make_image(image: Path, limits: Limits) -> None:
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, image_size(limits))  # sparse: disk is used as the payload writes
    finally:
        os.close(fd)
    inodes = ["-N", str(limits.output_files + _SPARE_INODES)] if limits.output_files else []
    _run_tool(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-m",
            "0",  # the payload is not root inside: reserved blocks would be lost to it
            "-b",
            "4096",
            "-I",
            str(_INODE_BYTES),
            *inodes,
            "-O",
            _EXT4_FEATURES,
            "-E",
            _EXT4_EXTENDED,
            str(image),
        ],
        f"make the size-limited /output image {image}",
    )


def _mount(image: Path, path: Path) -> None:
    _run_tool(
        ["mount", "-t", "ext4", "-o", "loop,nosuid,nodev", str(image), str(path)],
        f"mount the size-limited /output image {image} at {path}",
    )


def _unmount(path: Path) -> None:
    # Lazily if still busy: the loop device is freed once the last user has gone (autoclear).
    for lazy in ([], ["-l"]):
        if not os.path.ismount(path):
            return
        with contextlib.suppress(SandboxError):
            _run_tool(["umount", *lazy, str(path)], f"unmount the /output at {path}")


# --- watching ---------------------------------------------------------------------------------


def _walk_usage(root: Path) -> tuple[int, int]:
    """Disk bytes (as du counts them) and entries under `root`, never following a symlink."""
    used_bytes = used_files = 0
    pending = [str(root)]
    while pending:
        try:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    with contextlib.suppress(OSError):
                        info = entry.stat(follow_symlinks=False)
                        used_bytes += info.st_blocks * 512
                        used_files += 1
                        if stat.S_ISDIR(info.st_mode):
                            pending.append(entry.path)
        except OSError:
            continue  # removed meanwhile, or made unreadable by the payload
    return used_bytes, used_files


class OutputWatch:
    """How much the payload has put in /output, and which limit it passed, if any."""

    def __init__(self, path: Path, limits: Limits) -> None:
        self.path = path
        self.max_bytes = limits.output_bytes
        self.max_files = limits.output_files
        self.own_file_system = os.path.ismount(path)
        self._base = self._file_system_usage() if self.own_file_system else (0, 0)
        self.interval = 0.1 if self.own_file_system else 0.5
        self.exceeded: str | None = None  # "output_bytes" or "output_files", the Limits field

    @property
    def active(self) -> bool:
        return self.max_bytes is not None or self.max_files is not None

    def _file_system_usage(self) -> tuple[int, int]:
        info = os.statvfs(self.path)
        return (info.f_blocks - info.f_bfree) * info.f_frsize, info.f_files - info.f_ffree

    def usage(self) -> tuple[int, int]:
        """(bytes, entries) the payload has put in /output so far."""
        if not self.own_file_system:
            return _walk_usage(self.path)
        used_bytes, used_files = self._file_system_usage()
        return used_bytes - self._base[0], used_files - self._base[1]

    def check(self) -> str | None:
        """The limit passed (remembered once seen), or None."""
        if self.exceeded is None and self.active:
            used_bytes, used_files = self.usage()
            if self.max_bytes is not None and used_bytes > self.max_bytes:
                self.exceeded = "output_bytes"
            elif self.max_files is not None and used_files > self.max_files:
                self.exceeded = "output_files"
        return self.exceeded

    def enforced(self) -> dict[str, str]:
        """What the run's record says about these limits."""
        how = (
            "its own ext4 file system of that size (loop-mounted image), watched"
            if self.own_file_system
            else "a watch of /output (walked every so often), the sandbox killed when passed"
        )
        return {
            name: f"{value} {unit} in /output ({how})"
            for name, value, unit in (
                ("output_bytes", self.max_bytes, "bytes"),
                ("output_files", self.max_files, "entries"),
            )
            if value is not None
        }

    @contextlib.contextmanager
    def watching(self, pidfd: int) -> Iterator[None]:
        """Check while the body runs; kill the process behind `pidfd` (bwrap, whose pid 1 and
        its whole pid namespace die with it) once a limit is passed."""
        if not self.active:
            yield
            return
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(self.interval):
                started = time.monotonic()
                if self.check() is not None:
                    with contextlib.suppress(OSError):
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    return
                if not self.own_file_system:
                    # A walk costs in proportion to the files: at most a tenth of the time.
                    self.interval = max(0.5, 10 * (time.monotonic() - started))

        thread = threading.Thread(target=loop, name="ipfs-execute-output-watch", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


__all__ = [
    "OutputArea",
    "OutputWatch",
    "create_output_area",
    "image_size",
    "loop_mount_problem",
    "release_stale",
]
