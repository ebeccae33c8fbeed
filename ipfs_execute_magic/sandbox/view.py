"""What the payload sees of the sandbox, as one frozen value.

Everything the payload can observe beyond the content of its rootfs and input is a field of
PayloadView: the mount layout, its ids, hostname, umask, working directory and environment,
what the run fixes around bwrap (CPU count, clock start, rlimits, ASLR, file times) and the
system calls its seccomp filter denies. The same fields make the bwrap options of a run
(`options`) and the profile that goes into the result-cache key (`profile`), so the key
changes whenever what the payload sees does.
"""

from __future__ import annotations

import stat as stat_module
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

from ..errors import SandboxError
from ..settings import Limits
from .determinism import CLOCK_START_S, SANDBOX_CPUS, SOURCE_DATE_EPOCH, synthetic_proc_stat
from .options import (
    CLEAR_ENV,
    DIE_WITH_PARENT,
    DISABLE_USERNS,
    NEW_SESSION,
    UNSHARE_ALL,
    UNSHARE_USER,
    Bind,
    BwrapOption,
    CapDrop,
    Chdir,
    Dev,
    Gid,
    Hostname,
    Proc,
    RemountRo,
    RoBind,
    RoBindData,
    Seccomp,
    SetEnv,
    Tmpfs,
    Uid,
)
from .rlimits import FIXED_RLIMITS, rlimit_text
from .seccomp import SANDBOX_POLICY, SeccompPolicy

DEFAULT_ENV: Mapping[str, str] = MappingProxyType(
    {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/tmp",
        "LANG": "C.UTF-8",
        "TZ": "UTC",
        "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH),
        # Python payloads print as they go, so output streams into a notebook cell live.
        "PYTHONUNBUFFERED": "1",
        # No per-process hash seed: set and dict-of-str orders are the same in every run.
        "PYTHONHASHSEED": "0",
    }
)

HOSTNAME = "sandbox"
SANDBOX_UMASK = 0o022


# --- the mount layout -------------------------------------------------------------------------
# Mounts as the payload sees them: where, and what, without the host paths of the run.

RunDirName = Literal["rootfs", "input", "output"]


class RunDir(NamedTuple):
    """One of the run's own directories (the staged rootfs or input, the fresh output)."""

    name: RunDirName
    dest: str
    writable: bool = False

    def option(self, src: Path) -> BwrapOption:
        return Bind(src, self.dest) if self.writable else RoBind(src, self.dest)

    def describe(self) -> str:
        return f"{'--bind' if self.writable else '--ro-bind'} <{self.name}> {self.dest}"


class SizedTmpfs(NamedTuple):
    """A fresh tmpfs of the view's `tmp_bytes` (always sized: its pages are memory)."""

    dest: str
    perms: int = 0o1777

    def option(self, size_bytes: int) -> BwrapOption:
        return Tmpfs(self.dest, size_bytes, self.perms)

    def describe(self) -> str:
        return f"--perms {self.perms:o} --size <tmp_bytes> --tmpfs {self.dest}"


class ProcStat(NamedTuple):
    """The view's synthetic /proc/stat, read-only, over the fresh /proc."""

    dest: str = "/proc/stat"
    perms: int = 0o444

    def option(self, fd: int) -> BwrapOption:
        return RoBindData(fd, self.dest, self.perms)

    def describe(self) -> str:
        return f"--perms {self.perms:o} --ro-bind-data <proc_stat> {self.dest}"


class Unopenable(NamedTuple):
    """A file of the fresh /proc covered by a read-only bind of /dev/null, which bwrap mounts
    nodev: it can no longer be opened. For pid 1's memory: bwrap's init has the payload's uid
    and no seccomp filter, and writing its memory would run code outside the filter."""

    dest: str

    def args(self) -> tuple[str, ...]:
        return ("--ro-bind", "/dev/null", self.dest)


# Host-independent bwrap options serve as mounts as they are.
Mount = RunDir | SizedTmpfs | ProcStat | Unopenable | Proc | Dev | RemountRo

# In mount order: later mounts land on top of earlier ones.
LAYOUT: tuple[Mount, ...] = (
    RunDir("rootfs", "/"),
    RunDir("input", "/input"),
    RunDir("output", "/output", writable=True),
    SizedTmpfs("/tmp"),
    Proc("/proc"),
    ProcStat("/proc/stat"),
    Unopenable("/proc/1/mem"),
    Unopenable("/proc/1/task/1/mem"),
    Dev("/dev"),
    # --dev leaves /dev a writable, unsized tmpfs: size /dev/shm and freeze the rest.
    SizedTmpfs("/dev/shm"),
    RemountRo("/dev"),
)

# No network, own pid tree and mounts, no capabilities, no nested user namespaces, no
# controlling terminal (TIOCSTI cannot inject input), gone with its parent.
ISOLATION: tuple[BwrapOption, ...] = (
    UNSHARE_ALL,
    UNSHARE_USER,
    DISABLE_USERNS,
    DIE_WITH_PARENT,
    NEW_SESSION,
    CapDrop("ALL"),
)


def mount_points(mounts: Iterable[Mount]) -> tuple[str, ...]:
    """The directories the rootfs itself must have, relative to it: where a mount lands that
    is not inside one the sandbox made before it (a fresh /proc, /dev, tmpfs or a bound dir)."""
    made: list[str] = []
    points: list[str] = []
    for mount in mounts:
        if isinstance(mount, RemountRo) or mount.dest == "/":
            continue  # a remount creates nothing; "/" is the rootfs itself
        if not any(mount.dest.startswith(f"{parent}/") for parent in made):
            points.append(mount.dest.lstrip("/"))
        made.append(mount.dest.rstrip("/"))
    return tuple(dict.fromkeys(points))


# They must already exist in the rootfs as real directories, otherwise bwrap 0.8 would create
# them, following symlinks onto the host.
MOUNT_POINTS = mount_points(LAYOUT)


def mount_point_problem(
    root: Path, points: Iterable[str] = MOUNT_POINTS, *, create_missing: bool = False
) -> tuple[str, str] | None:
    """The first mount point of `root` that is not a real directory, and what it is instead
    ("missing", "a symlink", "not a directory"); None when all are fine.

    Staging passes `create_missing` (it prepares the tree); the sandbox checks again before
    bwrap starts, since the tree may have changed on disk since.
    """
    for name in points:
        path = root / name
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            if create_missing:
                path.mkdir(mode=0o755)
                continue
            return name, "missing"
        if stat_module.S_ISLNK(mode):
            return name, "a symlink"
        if not stat_module.S_ISDIR(mode):
            return name, "not a directory"
    return None


# --- the view ---------------------------------------------------------------------------------


def _octal(value: int) -> str:
    return f"{value:04o}"


def _rlimit_table(rlimits: Mapping[str, tuple[int, int]]) -> dict[str, list[str]]:
    return {
        name: [rlimit_text(soft), rlimit_text(hard)]
        for name, (soft, hard) in sorted(rlimits.items())
    }


def _render(value: object) -> Any:
    """A field as deterministic JSON: no host path, no fd, no object identity."""
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(key): _render(item) for key, item in sorted(value.items())}
    # Mounts and bwrap options are NamedTuples: looked at before the tuples.
    if isinstance(value, RunDir | SizedTmpfs | ProcStat):
        return value.describe()
    if hasattr(value, "args"):
        return " ".join(value.args())
    if isinstance(value, tuple | list):
        return [_render(item) for item in value]
    raise TypeError(f"cannot put {value!r} into the sandbox profile")


@dataclass(frozen=True)
class PayloadView:
    """Everything the payload can observe of the sandbox beyond its rootfs and input."""

    tmp_bytes: int  # size of every SizedTmpfs (/tmp, /dev/shm): the run's Limits.tmp_bytes
    mounts: tuple[Mount, ...] = LAYOUT
    isolation: tuple[BwrapOption, ...] = ISOLATION
    hostname: str = HOSTNAME
    uid: int = 0  # inside its own user namespace (the host uid is the caller's, or nobody)
    gid: int = 0
    umask: int = field(default=SANDBOX_UMASK, metadata={"profile": _octal})
    cwd: str = "/"
    # All of it: bwrap adds only PWD (= cwd).
    env: Mapping[str, str] = field(default_factory=lambda: DEFAULT_ENV)
    output_mode: int = field(default=0o755, metadata={"profile": _octal})
    cpu_count: int = SANDBOX_CPUS
    clock_start_s: float = CLOCK_START_S  # monotonic and boot clocks, where a run can fix them
    # Every rlimit that the run's Limits do not set (those are not in the view: a run that
    # succeeded within its limits gives the same output under others).
    rlimits: Mapping[str, tuple[int, int]] = field(
        default_factory=lambda: FIXED_RLIMITS, metadata={"profile": _rlimit_table}
    )
    aslr: bool = False
    # The system calls it may not make (by name and digest: the rules are in seccomp.py).
    seccomp: SeccompPolicy = field(
        default=SANDBOX_POLICY, metadata={"profile": SeccompPolicy.describe}
    )
    # mtime of /output, boot time in /proc/stat; staged files carry SOURCE_DATE_EPOCH, its
    # default (staging.set_tree_mtimes)
    mtime: int = SOURCE_DATE_EPOCH

    def __post_init__(self) -> None:
        if not 0 <= self.clock_start_s < 2**31:
            raise SandboxError(f"clock start {self.clock_start_s} s is out of range")
        for name, value in self.env.items():
            if not name or "=" in name or "\0" in name or "\0" in value:
                raise SandboxError(f"invalid sandbox environment variable {name!r}")

    @property
    def mount_points(self) -> tuple[str, ...]:
        return mount_points(self.mounts)

    def dest_of(self, name: RunDirName) -> str:
        """Where the run's `name` directory appears."""
        return next(m.dest for m in self.mounts if isinstance(m, RunDir) and m.name == name)

    def proc_stat(self) -> bytes:
        return synthetic_proc_stat(self.cpu_count, self.mtime)

    def options(
        self,
        rootfs: Path,
        input_dir: Path,
        output_dir: Path,
        *,
        input_parts: Sequence[tuple[str, Path]] = (),
        proc_stat_fd: int | None = None,
        seccomp_fd: int | None = None,
    ) -> list[BwrapOption]:
        """The bwrap options that show the payload this view of a run's directories, in
        order. The synthetic /proc/stat is bound, and the seccomp filter (`seccomp.bpf()`)
        loaded, only when their fds are given. `input_parts` are bound over their mount
        points in the input, right after it."""
        dirs = {"rootfs": rootfs, "input": input_dir, "output": output_dir}
        mounts: list[BwrapOption] = []
        for mount in self.mounts:
            if isinstance(mount, RunDir):
                mounts.append(mount.option(dirs[mount.name]))
                if mount.name == "input":
                    mounts.extend(
                        RoBind(path, f"{mount.dest}/{name}") for name, path in input_parts
                    )
            elif isinstance(mount, SizedTmpfs):
                mounts.append(mount.option(self.tmp_bytes))
            elif isinstance(mount, ProcStat):
                if proc_stat_fd is not None:
                    mounts.append(mount.option(proc_stat_fd))
            else:
                mounts.append(mount)
        return [
            *self.isolation,
            *(() if seccomp_fd is None else (Seccomp(seccomp_fd),)),
            Hostname(self.hostname),
            Uid(self.uid),
            Gid(self.gid),
            CLEAR_ENV,
            *(SetEnv(name, value) for name, value in sorted(self.env.items())),
            *mounts,
            Chdir(self.cwd),
        ]

    def profile(self) -> dict[str, Any]:
        """Every field as deterministic JSON, for the result-cache key and the run record;
        plus the content of /proc/stat, which is made from the fields."""
        profile = {
            f.name: f.metadata.get("profile", _render)(getattr(self, f.name)) for f in fields(self)
        }
        profile["proc_stat"] = self.proc_stat().decode()
        return profile


def payload_view(limits: Limits) -> PayloadView:
    """What the payload of a run with `limits` sees (only the /tmp size depends on them)."""
    return PayloadView(tmp_bytes=limits.tmp_bytes)
