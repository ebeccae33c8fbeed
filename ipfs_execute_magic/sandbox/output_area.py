"""/output with a byte and a file-count limit (`Limits.output_bytes`, `Limits.output_files`).

Two mechanisms, by what the caller may do:

- Run by root with loop devices (`OutputArea`): each run's /output is a file system of its
  own, a sparse ext4 image in the run directory made for the limits (`mkfs.ext4 -N`, no
  reserved blocks, no journal), loop-mounted before bwrap starts and unmounted once the output
  is in IPFS. The host disk never holds more of an output than the image can take: the limit
  plus ext4's metadata (`image_size`), whatever the payload does. Given a template directory,
  mkfs runs once per (size, file count): each run copies that template (holes stay holes), and
  attaches and mounts it with ioctls and mount(2) rather than mount(8) and umount(8). A run
  holds a shared flock on the template directory while it takes its template; `gc` deletes
  the templates only when it gets that flock exclusively (`remove_templates`).
- Otherwise /output is a plain directory, and RLIMIT_FSIZE bounds each file.

Either way `OutputWatch` measures /output while the payload runs (statvfs of its own file
system, ten times a second; else a walk, at most a tenth of the time) and kills the sandbox
once it passes a limit; the run records which one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import os
import random
import secrets
import shutil
import signal
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SandboxError
from ..settings import Limits
from .child import libc_mount

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

# linux/loop.h, linux/fs.h and linux/mount.h.
_LOOP_SET_FD, _LOOP_CLR_FD, _LOOP_SET_STATUS64 = 0x4C00, 0x4C01, 0x4C04
_LOOP_CONFIGURE = 0x4C0A  # Linux 5.8
_LOOP_CTL_GET_FREE = 0x4C82
_LO_FLAGS_AUTOCLEAR = 4  # the kernel frees the device once its last user (the mount) is gone
_LOOP_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")  # struct loop_info64
# The free device the kernel names may be claimed by another process before we configure it
# (EBUSY): ask again, after a short random pause so that racing processes spread out.
_LOOP_ATTEMPTS = 64
_attach_lock = threading.Lock()  # this process's runs never race each other for a device
_FICLONE = 0x40049409
_MS_NOSUID, _MS_NODEV = 0x2, 0x4
_MNT_DETACH = 2
# The image is thrown away after the run: flushing it to the host disk (every sync and the
# unmount would, through the loop device) costs milliseconds and protects nothing.
_MOUNT_DATA = b"nobarrier"
_EXT4_MAGIC = 0xEF53
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


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
    if shutil.which("mkfs.ext4") is None:
        return "mkfs.ext4 not installed (Debian: e2fsprogs)"
    if libc_mount() is None or _libc_umount2() is None:
        return "the C library has no mount or umount2"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices here (/dev/loop-control is missing)"
    return None


@functools.cache
def _libc_umount2() -> Callable[[bytes, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).umount2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_char_p, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


@dataclass
class OutputArea:
    """One run's output directory at `path`, and the image behind it when it has one.

    Made with `create`; `release` undoes whatever `create` got to (also after an interrupt
    halfway), so a caller holds the object from before `create` to after `release`. The run
    directory (`path`'s parent) is flock'ed meanwhile: an image still mounted under a run
    directory nobody holds belongs to a process that died (`release_stale`).
    """

    path: Path
    # Where formatted images are kept, one per (size, file count), copied for each run; None:
    # mkfs.ext4 for every run.
    template_dir: Path | None = None
    image: Path | None = field(default=None, init=False)
    # The file name in `script_dir`, once made (the pool makes the next run's alike).
    script_name: str | None = field(default=None, init=False)
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
            self._make_and_mount(self.image, limits)
            with contextlib.suppress(FileNotFoundError):  # templates have none
                (self.path / "lost+found").rmdir()  # the payload's /output starts empty
        except (SandboxError, OSError):
            self._drop_image()
        except BaseException:
            self._drop_image()
            raise

    @property
    def script_dir(self) -> Path:
        """The directory beside `path` that holds the cell's script (`write_script`)."""
        return self.path.with_name("script")

    def prepare_script(self, name: str) -> None:
        """Make `script_dir` with an empty file `name`, ahead of the run (the pool does, while
        idle): on many disks creating a file costs ten times what writing one does, and a
        cell's edit is the loop to keep short."""
        self.script_dir.mkdir(mode=0o755)
        os.close(os.open(self.script_dir / name, _NEW_FILE, 0o644))
        self.script_name = name

    def write_script(self, name: str, data: bytes, mtime: int) -> Path:
        """`script_dir` holding only the file `name` with `data`, both with modes 0755 and
        0644 and the times `mtime` whatever the umask: what a staged directory holding that
        one file is, for the caller to bind in its place."""
        file = self.script_dir / name
        if self.script_name != name:
            self.prepare_script(name)
        fd = os.open(file, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fchmod(fd, 0o644)
            os.utime(fd, (mtime, mtime))
        finally:
            os.close(fd)
        os.chmod(self.script_dir, 0o755)
        os.utime(self.script_dir, (mtime, mtime))
        return self.script_dir

    def _make_and_mount(self, image: Path, limits: Limits) -> None:
        if self.template_dir is None:
            _make_image(image, limits)
            _mount(image, self.path)
            return
        for attempt in range(2):
            with _templates_in_use(self.template_dir):
                template = _template(self.template_dir, limits)
                _copy_sparse(template, image)
            try:
                _mount(image, self.path)
                return
            except _BadImage:
                # Damaged past what `_template` checks: made anew, once.
                image.unlink()
                template.unlink(missing_ok=True)
                if attempt:
                    raise

    def _drop_image(self) -> None:
        if self.image is None:
            return
        _unmount(self.path)
        if not os.path.ismount(self.path):  # else kept: it still holds the output
            self.image.unlink(missing_ok=True)
            self.image = None

    def release(self, remove_run_dir: Callable[[Path], None] | None = None) -> None:
        """Unmount and delete the image; the output must have been saved or copied first.
        With `remove_run_dir`, the run directory goes too, before its flock is let go: at no
        moment does it look like the directory of a dead run."""
        self._drop_image()
        if remove_run_dir is not None:
            remove_run_dir(self.path.parent)
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


def create_output_area(path: Path, limits: Limits, template_dir: Path | None = None) -> OutputArea:
    """`OutputArea(path, template_dir)`, created (for callers with nothing to undo when it
    fails)."""
    area = OutputArea(path, template_dir)
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


# In a run directory made ahead for a run to come (output_pool.py) until a run takes it.
UNUSED_MARKER = "unused"


def release_stale(runs_dir: Path) -> None:
    """Unmount the /output images of runs whose process died before it could (kill -9): a
    mount and a loop device each, otherwise kept until reboot. Their images stay, with what
    the payload wrote, like the output directories of such runs always did; a directory
    made ahead for a run that never came (UNUSED_MARKER) holds nothing and goes whole."""
    try:
        run_dirs = list(runs_dir.iterdir())
    except OSError:
        return
    for run_dir in run_dirs:
        output = run_dir / "output"
        unused = os.path.lexists(run_dir / UNUSED_MARKER)
        if not unused and not os.path.ismount(output):
            continue
        try:
            fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _unmount(output)
            if unused and not os.path.ismount(output):
                shutil.rmtree(run_dir, ignore_errors=True)
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


def _mkfs_options(limits: Limits) -> list[str]:
    inodes = ["-N", str(limits.output_files + _SPARE_INODES)] if limits.output_files else []
    return [
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
    ]


def _make_image(image: Path, limits: Limits) -> None:
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, image_size(limits))  # sparse: disk is used as the payload writes
    finally:
        os.close(fd)
    _run_tool(
        ["mkfs.ext4", *_mkfs_options(limits), str(image)],
        f"make the size-limited /output image {image}",
    )


def template_path(template_dir: Path, limits: Limits) -> Path:
    """Where the formatted image for `limits` is kept: named by its size and a digest of the
    mkfs options, so that changed options never pick up an old template."""
    options = "\0".join(_mkfs_options(limits)).encode()
    return (
        template_dir / f"ext4-{image_size(limits)}-{hashlib.sha256(options).hexdigest()[:16]}.img"
    )


def _template_ok(template: Path, limits: Limits) -> bool:
    """Whether `template` is a whole, clean, never mounted ext4 image of the right geometry
    (its size and superblock, read in one pread: cheap enough for every run)."""
    try:
        fd = os.open(template, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        superblock = os.pread(fd, 1024, 1024)
    except OSError:
        return False
    finally:
        os.close(fd)
    size = image_size(limits)
    if not stat.S_ISREG(info.st_mode) or info.st_size != size or len(superblock) != 1024:
        return False
    inodes, blocks_lo = struct.unpack_from("<2I", superblock, 0)
    (log_block_size,) = struct.unpack_from("<I", superblock, 24)
    mounts, magic, state = struct.unpack_from("<H2xHH", superblock, 52)
    (blocks_hi,) = struct.unpack_from("<I", superblock, 0x150)
    blocks = blocks_lo | blocks_hi << 32
    return bool(
        magic == _EXT4_MAGIC
        and log_block_size == 2  # 4 KiB
        and blocks * 4096 == size
        and state == 1  # cleanly unmounted (here: never mounted), no errors recorded
        and mounts == 0
        and inodes >= (limits.output_files or 0) + _SPARE_INODES
    )


def _template(template_dir: Path, limits: Limits) -> Path:
    """The template for `limits`, made (mkfs.ext4, then a rename: a concurrent run sees the
    whole image or none) when it is missing or damaged."""
    template = template_path(template_dir, limits)
    if _template_ok(template, limits):
        return template
    template_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in template_dir.glob(".*.partial"):  # of processes killed while making one
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > 600:
                stale.unlink()
    partial = template.with_name(f".{template.name}.{secrets.token_hex(4)}.partial")
    try:
        _make_image(partial, limits)
        # Removed once here rather than by every run (else each run's rmdir does it).
        with contextlib.suppress(SandboxError):
            _run_tool(["debugfs", "-w", "-R", "rmdir lost+found", str(partial)], "empty it")
        fd = os.open(partial, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)  # before the rename: a host crash never leaves a zeroed template
        finally:
            os.close(fd)
        os.rename(partial, template)
    finally:
        partial.unlink(missing_ok=True)
    return template


@contextlib.contextmanager
def _templates_in_use(template_dir: Path) -> Iterator[None]:
    """A shared flock on the templates directory while a run checks, makes or copies its
    template: `remove_templates` takes it exclusively, so it never deletes one mid-copy."""
    try:
        fd = os.open(template_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        template_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(template_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a gc deletes the templates
        yield
    finally:
        os.close(fd)


def remove_templates(template_dir: Path) -> tuple[int, int] | None:
    """Delete every /output template (the next run that needs one makes it again): how many
    files and their bytes on disk, or None when a run is using one right now (left alone)."""
    try:
        fd = os.open(template_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return 0, 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        removed = removed_bytes = 0
        # The directory itself stays: runs lock it.
        for path in template_dir.iterdir():
            with contextlib.suppress(OSError):
                size = path.lstat().st_blocks * 512  # sparse: what the disk really holds
                path.unlink()
                removed += 1
                removed_bytes += size
        return removed, removed_bytes
    finally:
        os.close(fd)


def _copy_sparse(source: Path, target: Path) -> None:
    """A new file `target` with `source`'s content, its holes kept holes: a clone where the
    file system shares extents, else its few data extents copied in the kernel."""
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.ioctl(dst, _FICLONE, src)  # btrfs, XFS: no data copied at all
                return
            except OSError:
                pass
            position, size = 0, os.fstat(src).st_size
            while position < size:
                try:
                    data = os.lseek(src, position, os.SEEK_DATA)
                except OSError as error:
                    if error.errno == errno.ENXIO:  # only a hole is left
                        break
                    raise
                position = os.lseek(src, data, os.SEEK_HOLE)
                _copy_range(src, dst, data, position)
            os.ftruncate(dst, size)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    while start < end:
        try:
            copied = os.copy_file_range(src, dst, end - start, start, start)
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            chunk = os.pread(src, min(end - start, 1024**2), start)
            copied = os.pwrite(dst, chunk, start) if chunk else 0
        if copied == 0:
            raise SandboxError(f"cannot copy the /output template: it ended at {start} bytes")
        start += copied


class _BadImage(SandboxError):
    """mount(2) refused the image's file system."""


def _attach(image: Path) -> tuple[int, int]:
    """A free loop device backed by `image`: its number and an open fd. Freed by the kernel
    once its last user has gone (autoclear): the mount, or this fd when no mount happens."""
    name = os.fsencode(image)[:63]
    info = _LOOP_INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, _LO_FLAGS_AUTOCLEAR, name, b"", b"", 0, 0)
    control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        backing = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        try:
            for _ in range(_LOOP_ATTEMPTS):
                with _attach_lock:
                    number = fcntl.ioctl(control, _LOOP_CTL_GET_FREE)
                    try:
                        device = os.open(f"/dev/loop{number}", os.O_RDWR | os.O_CLOEXEC)
                    except FileNotFoundError:  # its node not made yet
                        device = -1
                    if device >= 0:
                        try:
                            _configure(device, backing, info)
                            return number, device
                        except OSError as error:
                            os.close(device)
                            if error.errno != errno.EBUSY:
                                raise
                        except BaseException:
                            os.close(device)
                            raise
                time.sleep(random.uniform(0, 0.002))
        finally:
            os.close(backing)
    finally:
        os.close(control)
    raise SandboxError(
        f"cannot attach the /output image {image} to a loop device: "
        f"the free ones were taken by other processes first, {_LOOP_ATTEMPTS} times; try again"
    )


def _configure(device: int, backing: int, info: bytes) -> None:
    config = struct.pack("=II", backing, 0) + info + bytes(64)  # struct loop_config
    try:
        fcntl.ioctl(device, _LOOP_CONFIGURE, config)
        return
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTTY):
            raise
    # Before Linux 5.8: in two steps.
    fcntl.ioctl(device, _LOOP_SET_FD, backing)
    try:
        fcntl.ioctl(device, _LOOP_SET_STATUS64, info)
    except BaseException:
        with contextlib.suppress(OSError):
            fcntl.ioctl(device, _LOOP_CLR_FD)
        raise


def _mount(image: Path, path: Path) -> None:
    mount = libc_mount()
    if mount is None:
        raise SandboxError("cannot mount the /output image: the C library has no mount")
    try:
        number, device = _attach(image)
    except OSError as error:
        raise SandboxError(
            f"cannot attach the /output image {image} to a loop device: {error.strerror}; "
            "check free loop devices (losetup -f)"
        ) from None
    try:
        source = f"/dev/loop{number}".encode()
        if mount(source, os.fsencode(path), b"ext4", _MS_NOSUID | _MS_NODEV, _MOUNT_DATA) != 0:
            code = ctypes.get_errno()
            if code in (errno.EINVAL, errno.EUCLEAN, errno.EIO, errno.EBADMSG):
                raise _BadImage(
                    f"cannot mount the /output image {image}: {os.strerror(code)}; "
                    "its template is damaged and is made anew"
                )
            raise SandboxError(
                f"cannot mount the /output image {image} at {path}: {os.strerror(code)}; "
                "check free loop devices (losetup -f)"
            )
    finally:
        os.close(device)  # the mount holds the device now; without one, it is freed here


def _unmount(path: Path) -> None:
    # Lazily if still busy: the loop device is freed once the last user has gone (autoclear).
    umount2 = _libc_umount2()
    for flags in (0, _MNT_DETACH):
        if umount2 is None or not os.path.ismount(path):
            return
        umount2(os.fsencode(path), flags)


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
    "remove_templates",
    "template_path",
]
