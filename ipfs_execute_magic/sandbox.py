"""Run one pure computation in a bubblewrap sandbox.

The payload sees a read-only root, read-only /input, writable /output, a size-limited /tmp,
no network, no capabilities, a fixed environment and hostname. Limits come from
`settings.Limits`; each run reports which of them were really enforced and how, because that
depends on the machine (cgroup v1 or v2, root or not).

Determinism: beyond the environment and hostname, every run fixes its umask, ids, cwd, every
rlimit, ASLR (off), the CPU count (one) and, where the caller may create a time namespace,
the monotonic and boot clocks. Each run reports which sources it fixed and which it could not
(`SandboxResult.determinism`, `.determinism_not_fixed`); `UNFIXABLE_SOURCES` lists what no run
can fix.

This module knows nothing of IPFS or notebooks: it takes staged directories and an argv.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import json
import os
import resource
import secrets
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal, Protocol

from .errors import SandboxError, SandboxUnavailableError
from .settings import SANDBOX_GID, SANDBOX_UID, Limits

# 1980-01-01, the earliest date zip can store: tools that honour it build reproducibly. Staged
# trees carry it as every mtime (staging.py), and the synthetic /proc/stat as boot time.
SOURCE_DATE_EPOCH = 315532800

DEFAULT_ENV: Mapping[str, str] = MappingProxyType({
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/tmp",
    "LANG": "C.UTF-8",
    "TZ": "UTC",
    "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH),
    # Python payloads print as they go, so output streams into a notebook cell live.
    "PYTHONUNBUFFERED": "1",
    # No per-process hash seed: set and dict-of-str orders are the same in every run.
    "PYTHONHASHSEED": "0",
})

HOSTNAME = "sandbox"
SANDBOX_UMASK = 0o022
# Directories the sandbox mounts over; they must already exist in the rootfs as real
# directories, otherwise bwrap 0.8 would create them, following symlinks onto the host.
MOUNT_POINTS = ("input", "output", "tmp", "proc", "dev")

# The payload's CLOCK_MONOTONIC and CLOCK_BOOTTIME (and /proc/uptime) start here, as on a
# freshly booted machine, when a time namespace can be made (the caller needs CAP_SYS_ADMIN).
CLOCK_START_S = 1.0
# The payload runs on exactly this many CPUs (sched_setaffinity): the count is what programs
# size their thread pools by, so it must not depend on the host.
SANDBOX_CPUS = 1

# Fixed soft and hard values of the rlimits that Limits does not set (those it leaves at None
# are unlimited), so that `ulimit -a` is the same on every host: several kernel defaults scale
# with the host's RAM. Values a non-root caller cannot reach are reported, never faked.
_INF = resource.RLIM_INFINITY
FIXED_RLIMITS: Mapping[str, tuple[int, int]] = MappingProxyType({
    "RLIMIT_STACK": (8 * 1024**2, _INF),
    "RLIMIT_DATA": (_INF, _INF),
    "RLIMIT_RSS": (_INF, _INF),
    "RLIMIT_MEMLOCK": (8 * 1024**2, 8 * 1024**2),  # the kernel's default since 5.16
    "RLIMIT_MSGQUEUE": (819200, 819200),  # the kernel's default (MQ_BYTES_MAX)
    # The default is the host's RAM / 256 KiB: 1024 is below it on any host with 256 MiB or
    # more, and lowering is always allowed.
    "RLIMIT_SIGPENDING": (1024, 1024),
    "RLIMIT_NICE": (0, 0),
    "RLIMIT_RTPRIO": (0, 0),
    "RLIMIT_RTTIME": (_INF, _INF),
    "RLIMIT_LOCKS": (_INF, _INF),
})
# Linux numbers of the rlimits Python's resource module does not name.
_UNNAMED_RLIMITS = {"RLIMIT_LOCKS": 10}

# Bound over /proc/stat: glibc counts its cpuN lines for sysconf(_SC_NPROCESSORS_ONLN/CONF)
# (Python's os.cpu_count) when /sys is absent, as it is here. Its real content (counters since
# boot, boot time) differs on every read anyway; /proc/cpuinfo, which describes the hardware
# and which software reads to choose code paths, stays real.
PROC_STAT = (
    "cpu  0 0 0 0 0 0 0 0 0 0\n"
    "cpu0 0 0 0 0 0 0 0 0 0 0\n"
    "intr 0\n"
    "ctxt 0\n"
    f"btime {SOURCE_DATE_EPOCH}\n"
    "processes 0\n"
    "procs_running 1\n"
    "procs_blocked 0\n"
    "softirq 0 0 0 0 0 0 0 0 0 0 0\n"
).encode()

# What every run fixes, and how: a constant, so it can go into a result-cache key as is.
DETERMINISM_PROFILE: Mapping[str, str] = MappingProxyType({
    "cpus": str(SANDBOX_CPUS),
    "clock_start_s": f"{CLOCK_START_S:g}",
    "proc_stat": "synthetic/1",
    "rlimits": "fixed/1",
    "aslr": "off",
    "staged_mtimes": str(SOURCE_DATE_EPOCH),
})

# Sources of nondeterminism that no run fixes (for the README and for run records).
UNFIXABLE_SOURCES: Mapping[str, str] = MappingProxyType({
    "wall_clock": "CLOCK_REALTIME (date, times of files the payload creates, mtimes of /tmp, "
                  "/dev, /proc and /output): namespaces cannot offset it",
    "randomness": "getrandom(), /dev/urandom, AT_RANDOM, /proc/sys/kernel/random/uuid",
    "timing": "how far the clocks advance, thread and process scheduling order, races; "
              "/proc/self/timens_offsets shows the host's uptime",
    "cpu_model": "/proc/cpuinfo and CPUID (model, flags, MHz): code may pick other paths (e.g. "
                 "SIMD, hence other floating-point results) on another host",
    "cpu_number": "which CPU the run is pinned to (Cpus_allowed in /proc/self/status, getcpu)",
    "host_counters": "/proc/meminfo, /proc/loadavg, /proc/uptime's idle field, /proc/vmstat, "
                     "sysinfo(), getrusage(): host memory and load",
    "kernel": "uname -r/-v, /proc/version, /proc/sys/*, boot_id, /proc/self/cgroup (the "
              "host's cgroup version and controllers)",
    "mountinfo": "/proc/self/mountinfo names the host paths of the staged trees and the "
                 "per-run output directory (a bind mount shows its path within the source "
                 "file system, whatever path it is bound from), host-wide mount ids and device "
                 "numbers, and the host file system's options; df shows its free space",
    "file_identity": "inode and device numbers, st_blocks, directory sizes and link counts: "
                     "they depend on the host file system and on staging",
    "namespace_ids": "inode numbers of /proc/self/ns/*",
    "readdir_order": "the order of directory entries (ext4 hash order, tmpfs reverse creation "
                     "order); staging.shuffled_view exposes code that depends on it",
    "file_owner": "staged files show as owned by nobody (65534) when the tool runs as root, "
                  "by root (0) otherwise",
    "scheduling": "nice value, scheduling policy and I/O priority come from the caller (so "
                  "that `nice ipfs-execute ...` works)",
})

_ADDR_NO_RANDOMIZE = 0x0040000
_PERSONALITY_QUERY = 0xFFFFFFFF
_CLONE_NEWTIME = 0x80
_READ_CHUNK = 65536
_STDERR_TAIL_BYTES = 8192
_KILL_GRACE_S = 2.0  # how long teardown waits for killed processes to vanish
_CGROUP_PARENT = "ipfs-execute"


# --- bwrap options as small typed objects -------------------------------------------------

class BwrapOption(Protocol):
    def args(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class Flag:
    name: str  # e.g. "--unshare-all"

    def args(self) -> tuple[str, ...]:
        return (self.name,)


UNSHARE_ALL = Flag("--unshare-all")  # every namespace: no network, own pid tree, own mounts
# --unshare-all only *tries* a user namespace; demand one (and it is what --disable-userns needs).
UNSHARE_USER = Flag("--unshare-user")
DISABLE_USERNS = Flag("--disable-userns")  # no nested user namespaces: less kernel surface
DIE_WITH_PARENT = Flag("--die-with-parent")
NEW_SESSION = Flag("--new-session")  # no controlling terminal: TIOCSTI cannot inject input
CLEAR_ENV = Flag("--clearenv")


@dataclass(frozen=True)
class CapDrop:
    capability: str = "ALL"

    def args(self) -> tuple[str, ...]:
        return ("--cap-drop", self.capability)


@dataclass(frozen=True)
class Hostname:
    name: str

    def args(self) -> tuple[str, ...]:
        return ("--hostname", self.name)


@dataclass(frozen=True)
class Uid:
    uid: int

    def args(self) -> tuple[str, ...]:
        return ("--uid", str(self.uid))


@dataclass(frozen=True)
class Gid:
    gid: int

    def args(self) -> tuple[str, ...]:
        return ("--gid", str(self.gid))


@dataclass(frozen=True)
class RoBind:
    src: Path
    dest: str

    def args(self) -> tuple[str, ...]:
        return ("--ro-bind", str(self.src), self.dest)


@dataclass(frozen=True)
class Bind:
    src: Path
    dest: str

    def args(self) -> tuple[str, ...]:
        return ("--bind", str(self.src), self.dest)


@dataclass(frozen=True)
class Tmpfs:
    dest: str
    size_bytes: int  # always sized: tmpfs pages are memory
    perms: int = 0o1777

    def args(self) -> tuple[str, ...]:
        return ("--perms", f"{self.perms:o}", "--size", str(self.size_bytes), "--tmpfs", self.dest)


@dataclass(frozen=True)
class Proc:
    dest: str = "/proc"

    def args(self) -> tuple[str, ...]:
        return ("--proc", self.dest)


@dataclass(frozen=True)
class Dev:
    dest: str = "/dev"

    def args(self) -> tuple[str, ...]:
        return ("--dev", self.dest)


@dataclass(frozen=True)
class RoBindData:
    """A read-only file with the content of `fd`, bound over `dest` (e.g. a /proc entry)."""

    fd: int
    dest: str
    perms: int = 0o444

    def args(self) -> tuple[str, ...]:
        return ("--perms", f"{self.perms:o}", "--ro-bind-data", str(self.fd), self.dest)


@dataclass(frozen=True)
class RemountRo:
    dest: str

    def args(self) -> tuple[str, ...]:
        return ("--remount-ro", self.dest)


@dataclass(frozen=True)
class SetEnv:
    name: str
    value: str

    def args(self) -> tuple[str, ...]:
        return ("--setenv", self.name, self.value)


@dataclass(frozen=True)
class Chdir:
    path: str

    def args(self) -> tuple[str, ...]:
        return ("--chdir", self.path)


@dataclass(frozen=True)
class JsonStatusFd:
    fd: int

    def args(self) -> tuple[str, ...]:
        return ("--json-status-fd", str(self.fd))


# --- spec and result ------------------------------------------------------------------------

@dataclass(frozen=True)
class SandboxSpec:
    rootfs: Path  # staged root dir, bound read-only at /
    input_dir: Path  # bound read-only at /input
    output_dir: Path  # existing empty host dir, bound writable at /output
    argv: tuple[str, ...]  # run inside, e.g. ("/sbin/init", "sh", "-c", "...")
    limits: Limits = field(default_factory=Limits)
    interactive: bool = False  # True: stdin is the caller's; else /dev/null
    env: Mapping[str, str] = field(default_factory=lambda: DEFAULT_ENV)
    # Where the payload's monotonic and boot clocks start (a verifier may vary it).
    clock_start_s: float = CLOCK_START_S

    def __post_init__(self) -> None:
        if not self.argv:
            raise SandboxError("nothing to run: the sandbox argv is empty")
        if not 0 <= self.clock_start_s < 2**31:
            raise SandboxError(f"clock start {self.clock_start_s} s is out of range")
        if any("\0" in arg for arg in self.argv):
            raise SandboxError("sandbox argv contains a NUL byte")
        for name, value in self.env.items():
            if not name or "=" in name or "\0" in name or "\0" in value:
                raise SandboxError(f"invalid sandbox environment variable {name!r}")


@dataclass(frozen=True)
class SandboxResult:
    exit_status: int | None  # payload's status (128+N if killed by signal N); None: never ran
    timed_out: bool
    duration_s: float
    limits_enforced: Mapping[str, str]  # only what was really enforced, and how
    # asked for but impossible here, with the reason
    limits_not_enforced: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # Sources of nondeterminism this run fixed, and how; and those it could not fix here, and
    # why (UNFIXABLE_SOURCES lists the ones no run fixes).
    determinism: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    determinism_not_fixed: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


# --- argv -----------------------------------------------------------------------------------

def sandbox_options(spec: SandboxSpec, *, json_status_fd: int | None = None,
                    proc_stat_fd: int | None = None) -> list[BwrapOption]:
    """The bwrap options of one run, in mount order.

    `proc_stat_fd` holds PROC_STAT, bound over /proc/stat (run_sandbox always passes one).
    """
    tmp_bytes = spec.limits.tmp_bytes
    options: list[BwrapOption] = [
        UNSHARE_ALL,
        UNSHARE_USER,
        DISABLE_USERNS,
        DIE_WITH_PARENT,
        NEW_SESSION,
        CapDrop("ALL"),
        Hostname(HOSTNAME),
        Uid(0),
        Gid(0),
        CLEAR_ENV,
        *(SetEnv(name, value) for name, value in sorted(spec.env.items())),
        RoBind(spec.rootfs, "/"),
        RoBind(spec.input_dir, "/input"),
        Bind(spec.output_dir, "/output"),
        Tmpfs("/tmp", tmp_bytes),
        Proc("/proc"),
        *([RoBindData(proc_stat_fd, "/proc/stat")] if proc_stat_fd is not None else []),
        Dev("/dev"),
        # --dev leaves /dev a writable, unsized tmpfs: size /dev/shm and freeze the rest.
        Tmpfs("/dev/shm", tmp_bytes),
        RemountRo("/dev"),
        Chdir("/"),
    ]
    if json_status_fd is not None:
        options.append(JsonStatusFd(json_status_fd))
    return options


def _option_args(spec: SandboxSpec, json_status_fd: int | None,
                 proc_stat_fd: int | None) -> list[str]:
    return [arg for option in sandbox_options(spec, json_status_fd=json_status_fd,
                                              proc_stat_fd=proc_stat_fd)
            for arg in option.args()]


def bwrap_argv(spec: SandboxSpec, *, json_status_fd: int | None = None,
               proc_stat_fd: int | None = None, bwrap: str = "bwrap") -> list[str]:
    """Pure: the full command line that runs `spec` (no file system access).

    run_sandbox passes the options through `--args FD` instead, so that the sandbox's
    /proc/1/cmdline does not show host paths.
    """
    # "--": an argv[0] starting with "--" is still the payload.
    return [bwrap, *_option_args(spec, json_status_fd, proc_stat_fd), "--", *spec.argv]


def _memfd(name: str, data: bytes) -> int:
    """A memfd holding `data`, positioned at its start (close-on-exec: pass it explicitly)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _options_fd(spec: SandboxSpec, json_status_fd: int, proc_stat_fd: int) -> int:
    """A memfd holding the NUL-separated options, for `bwrap --args FD`."""
    return _memfd("bwrap-args", b"".join(os.fsencode(arg) + b"\0" for arg in
                                         _option_args(spec, json_status_fd, proc_stat_fd)))


# --- availability ---------------------------------------------------------------------------

def _find_bwrap() -> str:
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxUnavailableError(
            "bubblewrap (bwrap) is not installed; install the Debian package bubblewrap")
    return path


@functools.cache
def bwrap_version() -> str:
    """E.g. "0.8.0"."""
    completed = subprocess.run([_find_bwrap(), "--version"], capture_output=True, text=True,
                               check=False, timeout=10)
    words = completed.stdout.split()
    if completed.returncode != 0 or not words:
        raise SandboxUnavailableError(f"`bwrap --version` failed: {completed.stderr.strip()}")
    return words[-1]


def _read_sysctl(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _user_namespace_hint() -> str:
    """Which knob keeps unprivileged user namespaces off on this machine."""
    if _read_sysctl("/proc/sys/kernel/unprivileged_userns_clone") == "0":
        return "user namespaces are disabled: run `sysctl -w kernel.unprivileged_userns_clone=1`"
    if _read_sysctl("/proc/sys/user/max_user_namespaces") == "0":
        return "user namespaces are disabled: run `sysctl -w user.max_user_namespaces=15000`"
    if _read_sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1":
        return ("AppArmor forbids unprivileged user namespaces: run "
                "`sysctl -w kernel.apparmor_restrict_unprivileged_userns=0` "
                "or install an AppArmor profile for bwrap")
    return ("bwrap cannot create user namespaces here (check the sysctls "
            "user.max_user_namespaces and kernel.unprivileged_userns_clone, "
            "or the container's seccomp/AppArmor policy)")


_NAMESPACE_FAILURE_MARKERS = (
    "creating new namespace", "setting up uid map", "no permissions to creat",
    "unprivileged_userns_clone", "user namespace",
)


def _looks_like_namespace_failure(message: str) -> bool:
    lowered = message.lower()
    return any(marker in lowered for marker in _NAMESPACE_FAILURE_MARKERS)


_available = False


def check_available() -> None:
    """Raise SandboxUnavailableError unless bwrap can start a sandbox for us here."""
    global _available
    if _available:
        return
    bwrap = _find_bwrap()
    # Probe exactly the way runs start bwrap (same uid, all namespaces, fresh /proc).
    probe = [bwrap, *UNSHARE_ALL.args(), *UNSHARE_USER.args(), *DISABLE_USERNS.args(),
             *DIE_WITH_PARENT.args(), *RoBind(Path("/"), "/").args(), *Proc("/proc").args(),
             *Dev("/dev").args(), "--", bwrap, "--version"]
    drop = os.geteuid() == 0
    try:
        completed = subprocess.run(
            probe, capture_output=True, text=True, check=False, timeout=30, env={},
            preexec_fn=_drop_privileges if drop else None)
    except subprocess.SubprocessError as exc:
        raise SandboxUnavailableError(f"could not start bwrap: {exc}") from None
    if completed.returncode != 0:
        message = _bwrap_message(completed.stderr) or f"bwrap exited with {completed.returncode}"
        if _looks_like_namespace_failure(message):
            raise SandboxUnavailableError(f"{message}; {_user_namespace_hint()}")
        raise SandboxUnavailableError(f"bwrap cannot start a sandbox here: {message}")
    _available = True


def _drop_privileges() -> None:
    os.setgroups([])
    os.setgid(SANDBOX_GID)
    os.setuid(SANDBOX_UID)


def _bwrap_message(stderr: str) -> str | None:
    """bwrap's own last complaint ("bwrap: ...") among the stderr lines, if any."""
    lines = [line.strip() for line in stderr.splitlines() if line.startswith("bwrap: ")]
    return lines[-1] if lines else None


# --- cgroups --------------------------------------------------------------------------------

@dataclass(frozen=True)
class CgroupMount:
    path: Path
    version: Literal[1, 2]
    controllers: frozenset[str]  # v1: bound to this hierarchy; v2: available at its root


@dataclass(frozen=True)
class RunCgroup:
    """A per-run cgroup directory, created before the run and removed after it."""

    path: Path
    version: Literal[1, 2]
    controllers: frozenset[str]  # which of our limits it carries

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    @property
    def join_file(self) -> Path:
        """Where the forked child writes "0" to move itself in.

        On v1, moving the calling thread through `tasks` skips the global threadgroup lock
        that `cgroup.procs` takes (its RCU grace period cost ~15 ms a run); the child is
        single-threaded, so its thread is the whole process. v2 has only `cgroup.procs`.
        """
        return self.path / ("tasks" if self.version == 1 else "cgroup.procs")

    def pids(self) -> list[int]:
        try:
            return [int(pid) for pid in self.procs_file.read_text().split()]
        except OSError:
            return []


def cgroup_mounts(mountinfo: str) -> list[CgroupMount]:
    """Parse /proc/self/mountinfo text into cgroup hierarchies (pure)."""
    mounts: list[CgroupMount] = []
    for line in mountinfo.splitlines():
        before, sep, after = line.partition(" - ")
        if not sep:
            continue
        fields_before, fields_after = before.split(), after.split()
        if len(fields_before) < 5 or len(fields_after) < 3:
            continue
        mount_point = Path(fields_before[4].replace("\\040", " "))
        fstype, super_options = fields_after[0], fields_after[2].split(",")
        if fstype == "cgroup":
            mounts.append(CgroupMount(mount_point, 1, frozenset(super_options)))
        elif fstype == "cgroup2":
            try:
                available = (mount_point / "cgroup.controllers").read_text().split()
            except OSError:
                available = []
            mounts.append(CgroupMount(mount_point, 2, frozenset(available)))
    return mounts


@functools.cache
def _cgroup_mounts_here() -> tuple[CgroupMount, ...]:
    # Cached: cgroup hierarchies are mounted at boot, and parsing costs more than a run's
    # own cgroup work.
    try:
        return tuple(cgroup_mounts(Path("/proc/self/mountinfo").read_text()))
    except OSError:
        return ()


def _own_cgroup_v2_path() -> str | None:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    except OSError:
        pass
    return None


def _run_cgroup_name() -> str:
    # The owner's pid in the name lets a later run sweep dirs a crashed run left behind.
    return f"run-{os.getpid()}-{secrets.token_hex(4)}"


def _owner_alive(name: str) -> bool:
    try:
        pid = int(name.split("-")[1])
        os.kill(pid, 0)
    except (IndexError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass
    return True


def _sweep_stale(parent: Path) -> None:
    """Remove empty run cgroups whose owning process is gone (killed with SIGKILL, say)."""
    try:
        children = [child for child in parent.iterdir() if child.name.startswith("run-")]
    except OSError:
        return
    for child in children:
        if not _owner_alive(child.name):
            _remove_cgroup_dir(child)


def _remove_cgroup_dir(path: Path) -> None:
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError:
        pass  # busy or not ours to remove


def _write(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


def _limit_files(version: int, limits: Limits) -> dict[str, list[tuple[str, str]]]:
    """controller -> [(file, value)] to write into a run cgroup, in order."""
    files: dict[str, list[tuple[str, str]]] = {}
    if limits.memory_bytes is not None:
        memory = str(limits.memory_bytes)
        if version == 1:
            # memsw (memory+swap) must not be set below memory; it is absent without swap
            # accounting, so it is optional.
            files["memory"] = [("memory.limit_in_bytes", memory),
                               ("?memory.memsw.limit_in_bytes", memory)]
        else:
            files["memory"] = [("memory.max", memory), ("?memory.swap.max", "0")]
    if limits.pids is not None:
        files["pids"] = [("pids.max", str(limits.pids))]
    return files


def _try_make_run_cgroup(path: Path, version: Literal[1, 2],
                         files: Mapping[str, list[tuple[str, str]]]) -> RunCgroup | None:
    """Create and configure one run cgroup; None if this parent will not do.

    Raises FileNotFoundError when the parent vanished (another run removed it just now).
    """
    try:
        path.mkdir()
    except FileNotFoundError:
        raise
    except OSError:
        return None
    try:
        for controller_files in files.values():
            for name, value in controller_files:
                optional = name.startswith("?")
                target = path / name.lstrip("?")
                if optional and not target.exists():
                    continue
                _write(target, value)
    except OSError:
        _remove_cgroup_dir(path)
        return None
    return RunCgroup(path, version, frozenset(files))


def _make_in_our_parent(parent: Path, name: str, version: Literal[1, 2],
                        files: Mapping[str, list[tuple[str, str]]]) -> RunCgroup | None:
    """A run cgroup in our own `ipfs-execute` dir, which other runs may remove when empty."""
    for _attempt in range(3):
        try:
            parent.mkdir(exist_ok=True)
        except OSError:
            return None
        if version == 2 and not _v2_controllers_enabled(parent, files, may_enable=True):
            return None
        _sweep_stale(parent)
        try:
            return _try_make_run_cgroup(parent / name, version, files)
        except FileNotFoundError:
            continue
    return None


def _v2_controllers_enabled(parent: Path, controllers: Iterable[str], *,
                            may_enable: bool) -> bool:
    """Whether children of `parent` get `controllers`; enable them only in our own dir."""
    wanted = set(controllers)
    try:
        enabled = set((parent / "cgroup.subtree_control").read_text().split())
        if wanted <= enabled:
            return True
        if not may_enable:
            return False  # someone else's cgroup: never change its configuration
        _write(parent / "cgroup.subtree_control",
               " ".join(f"+{name}" for name in sorted(wanted - enabled)))
        return True
    except OSError:
        return False


def _v2_delegated_parents(mount: CgroupMount) -> list[Path]:
    """Cgroups around our own where an unprivileged run cgroup may go, best first."""
    own = _own_cgroup_v2_path()
    if not own or own == "/":
        return []
    own_dir = mount.path / own.lstrip("/")
    # A sibling of our own cgroup: delegated trees (systemd user sessions) are writable there,
    # and our own cgroup cannot have controller-enabled children while we are in it (the
    # "no internal processes" rule), unless it already has them.
    return [own_dir.parent, own_dir]


def create_run_cgroups(limits: Limits) -> tuple[list[RunCgroup], dict[str, str]]:
    """Per-run cgroups for the memory and pids limits, and how they enforce them."""
    mounts = _cgroup_mounts_here()
    wanted = _limit_files(1, limits)
    cgroups: list[RunCgroup] = []
    enforced: dict[str, str] = {}
    name = _run_cgroup_name()

    # cgroup v1: one hierarchy per controller, writable only by root.
    for controller, files in wanted.items():
        mount = next((m for m in mounts if m.version == 1 and controller in m.controllers), None)
        if mount is None:
            continue
        cgroup = _make_in_our_parent(mount.path / _CGROUP_PARENT, name, 1, {controller: files})
        if cgroup is not None:
            cgroups.append(cgroup)
            enforced[controller] = "cgroup v1"

    # cgroup v2: one tree; a run cgroup needs a writable parent with the controllers enabled.
    remaining = {c: f for c, f in _limit_files(2, limits).items() if c not in enforced}
    for mount in (m for m in mounts if m.version == 2):
        usable = {c: f for c, f in remaining.items() if c in mount.controllers}
        if not usable:
            continue
        cgroup = None
        if os.geteuid() == 0 and _v2_controllers_enabled(mount.path, usable, may_enable=False):
            cgroup = _make_in_our_parent(mount.path / _CGROUP_PARENT, name, 2, usable)
        for parent in _v2_delegated_parents(mount):
            if cgroup is not None:
                break
            # Moving a process needs write access to the common ancestor's cgroup.procs.
            if (os.access(parent, os.W_OK) and os.access(parent / "cgroup.procs", os.W_OK)
                    and _v2_controllers_enabled(parent, usable, may_enable=False)):
                try:
                    # Among someone else's cgroups: say whose it is.
                    cgroup = _try_make_run_cgroup(parent / f"{_CGROUP_PARENT}-{name}", 2, usable)
                except FileNotFoundError:
                    cgroup = None
        if cgroup is not None:
            cgroups.append(cgroup)
            for controller in usable:
                enforced[controller] = "cgroup v2"
                remaining.pop(controller)

    described: dict[str, str] = {}
    if limits.memory_bytes is not None and "memory" in enforced:
        described["memory"] = (f"{limits.memory_bytes} bytes ({enforced['memory']}; "
                               "whole sandbox incl. its tmpfs)")
    if limits.pids is not None and "pids" in enforced:
        described["pids"] = f"{limits.pids} ({enforced['pids']}; processes and threads)"
    return cgroups, described


def _kill_cgroup_members(cgroup: RunCgroup) -> None:
    if cgroup.version == 2 and (cgroup.path / "cgroup.kill").exists():
        try:
            _write(cgroup.path / "cgroup.kill", "1")
            return
        except OSError:
            pass
    for pid in cgroup.pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def remove_run_cgroups(cgroups: Iterable[RunCgroup], *, deadline_s: float = _KILL_GRACE_S) -> None:
    """Kill whatever is left in the run cgroups and remove them (and empty parents)."""
    cgroups = list(cgroups)
    deadline = time.monotonic() + deadline_s
    for cgroup in cgroups:
        while cgroup.path.exists():
            _kill_cgroup_members(cgroup)
            try:
                cgroup.path.rmdir()
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    break  # left for the next run's sweep
                time.sleep(0.001)  # the last tasks are still being reaped
        if cgroup.path.parent.name == _CGROUP_PARENT:
            _remove_cgroup_dir(cgroup.path.parent)  # fails while other runs use it: fine


# --- the child process ----------------------------------------------------------------------

def _libc_function(name: str, argtypes: list[type]) -> Callable[..., int] | None:
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


@functools.cache
def _libc_personality() -> Callable[[int], int] | None:
    return _libc_function("personality", [ctypes.c_ulong])


@functools.cache
def _libc_unshare() -> Callable[[int], int] | None:
    return _libc_function("unshare", [ctypes.c_int])


@functools.cache
def aslr_problem() -> str | None:
    """Why ASLR cannot be turned off for the payload here, or None.

    Docker's default seccomp profile, for one, allows personality() only with a few values.
    """
    personality = _libc_personality()
    if personality is None:
        return "personality() is not available"
    current = personality(_PERSONALITY_QUERY)
    if current == -1 or personality(current | _ADDR_NO_RANDOMIZE) == -1:
        return f"personality(ADDR_NO_RANDOMIZE) failed: {os.strerror(ctypes.get_errno())}"
    personality(current)  # only tried: the caller keeps its own
    return None


def _enter_time_namespace(unshare: Callable[[int], int], start_ns: int) -> None:
    """Give this process's future children (the sandbox) their own monotonic and boot clocks,
    both reading `start_ns` now. The caller itself stays in its time namespace.

    For forked children only: offsets can be written only before the namespace has members.
    """
    if unshare(_CLONE_NEWTIME) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"unshare(CLONE_NEWTIME): {os.strerror(errno)}")
    offsets = b""
    for name, clock in ((b"monotonic", time.CLOCK_MONOTONIC), (b"boottime", time.CLOCK_BOOTTIME)):
        # The kernel wants nanoseconds in [0, 1e9): divmod floors, as it should.
        seconds, nanoseconds = divmod(start_ns - time.clock_gettime_ns(clock), 1_000_000_000)
        offsets += b"%s %d %d\n" % (name, seconds, nanoseconds)
    fd = os.open("/proc/self/timens_offsets", os.O_WRONLY)
    try:
        os.write(fd, offsets)
    finally:
        os.close(fd)


@functools.cache
def time_namespace_problem() -> str | None:
    """Why the payload cannot get its own monotonic clock here, or None. Probed once, by
    starting `bwrap --version` the way a run starts bwrap."""
    if not os.path.exists("/proc/self/ns/time"):
        return "this kernel has no time namespaces (Linux 5.6+ with CONFIG_TIME_NS)"
    unshare = _libc_unshare()
    if unshare is None:
        return "unshare() is not available"
    if os.geteuid() != 0:
        # A time namespace needs CAP_SYS_ADMIN, and bwrap 0.8 has no option for one.
        return ("a time namespace needs root (CAP_SYS_ADMIN) and bwrap 0.8 cannot make one: "
                "the monotonic and boot clocks are the host's")
    try:
        subprocess.run([_find_bwrap(), "--version"], capture_output=True, check=True,
                       timeout=10, env={},
                       preexec_fn=lambda: _enter_time_namespace(unshare, 1_000_000_000))
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot create a time namespace here ({exc})"
    return None


_cpu_turn = itertools.count()


def _pick_cpus() -> tuple[int, ...]:
    """The allowed CPUs, rotated so that concurrent runs start on different ones."""
    allowed = sorted(os.sched_getaffinity(0))
    start = (os.getpid() + next(_cpu_turn)) % len(allowed)
    return tuple(allowed[start:] + allowed[:start])


@dataclass(frozen=True)
class ChildSetup:
    """Everything done between fork and exec of bwrap; computed beforehand in the parent."""

    pid_report_fd: int  # the child writes its pid here first (see _kill_half_spawned)
    cgroup_procs_files: tuple[str, ...]
    rlimits: tuple[tuple[int, int, int], ...]  # (resource, soft, hard)
    drop_to: tuple[int, int] | None  # (uid, gid) when started as root
    personality: Callable[[int], int] | None  # resolved before fork: dlopen is unsafe after
    signals_to_default: tuple[signal.Signals, ...] = ()
    # Candidate CPUs, best first: the sandbox is pinned to the first SANDBOX_CPUS that work.
    cpus: tuple[int, ...] = ()
    unshare: Callable[[int], int] | None = None  # with clock_start_ns: own time namespace
    clock_start_ns: int | None = None

    def __call__(self) -> None:
        # Runs in the forked child: no imports, no locks, no logging.
        os.write(self.pid_report_fd, b"%d" % os.getpid())
        # Blocked and ignored signals survive exec (a `cmd &` job ignores SIGINT, say): the
        # payload must start with defaults wherever the tool was launched from.
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        for signum in self.signals_to_default:
            signal.signal(signum, signal.SIG_DFL)
        for procs_file in self.cgroup_procs_files:
            fd = os.open(procs_file, os.O_WRONLY)
            try:
                os.write(fd, b"0")  # "0" means the writing process itself
            finally:
                os.close(fd)
        for which, soft, hard in self.rlimits:
            resource.setrlimit(which, (soft, hard))
        os.umask(SANDBOX_UMASK)
        if self.personality is not None:
            self.personality(_ADDR_NO_RANDOMIZE)  # inherited through exec: no ASLR inside
        if self.cpus:
            self._pin_cpus()
        if self.unshare is not None and self.clock_start_ns is not None:
            # Needs the privileges dropped just below; bwrap and the sandbox are its children.
            _enter_time_namespace(self.unshare, self.clock_start_ns)
        if self.drop_to is not None:
            uid, gid = self.drop_to
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)

    def _pin_cpus(self) -> None:
        # Usually the first choice works; a CPU may have gone offline since the parent looked.
        for start in range(len(self.cpus) - SANDBOX_CPUS + 1):
            try:
                os.sched_setaffinity(0, self.cpus[start:start + SANDBOX_CPUS])
                return
            except OSError:
                continue
        raise OSError("cannot pin the sandbox to a CPU")


def _ignored_signals() -> tuple[signal.Signals, ...]:
    ignored = []
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            if signal.getsignal(signum) == signal.SIG_IGN:
                ignored.append(signal.Signals(signum))
        except (ValueError, OSError):
            pass
    return tuple(ignored)


def _at_most(value: int, ceiling: int) -> int:
    if ceiling == _INF:
        return value
    return ceiling if value == _INF else min(value, ceiling)


def _capped(which: int, soft: int, hard: int, *, can_raise: bool) -> tuple[int, int]:
    """(soft, hard) as wanted, except that without privileges the hard limit we were given
    cannot be raised."""
    if can_raise:
        return soft, hard
    _, given_hard = resource.getrlimit(which)
    hard = _at_most(hard, given_hard)
    return _at_most(soft, hard), hard


_CAP_SYS_RESOURCE = 24


@functools.cache
def _can_raise_hard_limits() -> bool:
    """Whether we hold CAP_SYS_RESOURCE (root in a container often does not)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_SYS_RESOURCE & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _rlimit_text(value: int) -> str:
    return "unlimited" if value == _INF else str(value)


def _count_tasks_of_uid(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid:
                count += len(os.listdir(f"/proc/{entry.name}/task"))
        except OSError:
            pass
    return count


@dataclass(frozen=True)
class RlimitPlan:
    """Every rlimit the child sets, how the limits among them are described to the user, and
    which values differ from the fixed ones (a non-root caller cannot raise a hard limit)."""

    rlimits: tuple[tuple[int, int, int], ...]  # (resource, soft, hard)
    enforced: Mapping[str, str]
    not_fixed: Mapping[str, str]


def plan_rlimits(limits: Limits, *, have_memory_cgroup: bool, have_pids_cgroup: bool,
                 running_as_root: bool) -> RlimitPlan:
    """The rlimits set in the child: every one of them, so that none is the host's."""
    plan: list[tuple[int, int, int]] = []
    described: dict[str, str] = {}
    not_fixed: dict[str, str] = {}

    def add(name: str, soft: int, hard: int | None = None) -> int:
        which = getattr(resource, name) if hasattr(resource, name) else _UNNAMED_RLIMITS[name]
        wanted = (soft, soft if hard is None else hard)
        got = _capped(which, *wanted, can_raise=_can_raise_hard_limits())
        plan.append((which, *got))
        if got != wanted:
            not_fixed[name] = (f"soft {_rlimit_text(got[0])}, hard {_rlimit_text(got[1])} "
                               f"instead of {_rlimit_text(wanted[0])}, "
                               f"{_rlimit_text(wanted[1])}: the caller's hard limit is lower")
        return got[0]

    add("RLIMIT_CORE", 0)
    described["core_dumps"] = "none (RLIMIT_CORE 0)"
    size = add("RLIMIT_FSIZE", _INF if limits.file_bytes is None else limits.file_bytes)
    if limits.file_bytes is not None:
        described["file_size"] = f"{size} bytes per file (RLIMIT_FSIZE)"
    seconds = add("RLIMIT_CPU", _INF if limits.cpu_seconds is None else limits.cpu_seconds)
    if limits.cpu_seconds is not None:
        described["cpu_time"] = f"{seconds} s per process (RLIMIT_CPU)"
    open_files = add("RLIMIT_NOFILE", limits.open_files)
    described["open_files"] = f"{open_files} per process (RLIMIT_NOFILE)"
    if limits.memory_bytes is not None and not have_memory_cgroup:
        size = add("RLIMIT_AS", limits.memory_bytes)
        described["memory"] = (f"{size} bytes of address space per process (RLIMIT_AS; "
                               "no memory cgroup, so not a whole-sandbox limit)")
    else:
        add("RLIMIT_AS", _INF)
    if limits.pids is not None and not have_pids_cgroup and not running_as_root:
        # RLIMIT_NPROC counts every task of our uid on the host, so allow for those first.
        uid = os.getuid()
        nproc = add("RLIMIT_NPROC", limits.pids + _count_tasks_of_uid(uid))
        described["pids"] = (f"{limits.pids} processes/threads (RLIMIT_NPROC {nproc}, "
                             f"counted over all processes of uid {uid})")
        not_fixed["RLIMIT_NPROC"] = (f"{nproc}: the pids limit plus the caller's other "
                                     "processes (no pids cgroup here)")
    else:
        add("RLIMIT_NPROC", _INF)  # a pids cgroup limits processes, or nothing does
    for name, (soft, hard) in FIXED_RLIMITS.items():
        add(name, soft, hard)
    return RlimitPlan(tuple(plan), MappingProxyType(described), MappingProxyType(not_fixed))


# --- running --------------------------------------------------------------------------------

def _check_rootfs(spec: SandboxSpec) -> None:
    for path, what in ((spec.rootfs, "rootfs"), (spec.input_dir, "input"),
                       (spec.output_dir, "output")):
        if not path.is_dir():
            raise SandboxError(f"sandbox {what} directory {path} does not exist")
    for name in MOUNT_POINTS:
        point = spec.rootfs / name
        try:
            is_real_dir = point.lstat().st_mode & 0o170000 == 0o040000
        except FileNotFoundError:
            is_real_dir = False
        if not is_real_dir:
            raise SandboxError(f"rootfs {spec.rootfs} has no real directory /{name} "
                               "(a symlink or missing mount point is refused)")


def plan_determinism(spec: SandboxSpec, rlimit_plan: RlimitPlan, *,
                     running_as_root: bool) -> tuple[dict[str, str], dict[str, str]]:
    """(fixed, not fixed): the sources of nondeterminism this run fixes, and how; those it
    cannot fix on this machine, and why. Probes what the machine allows (cached)."""
    fixed = {
        "hostname": f"{HOSTNAME} (own UTS namespace)",
        "environment": f"only {', '.join(sorted(spec.env))} and PWD (--clearenv)",
        "umask": f"{SANDBOX_UMASK:04o}",
        "ids": "uid 0, gid 0 (own user namespace)",
        "cwd": "/",
        "signals": "default dispositions, none blocked",
        "cpu_count": (f"{SANDBOX_CPUS} (sched_setaffinity to one of the allowed CPUs; a "
                      "synthetic /proc/stat lists one CPU for glibc's sysconf, e.g. Python's "
                      "os.cpu_count)"),
        "proc_stat": f"synthetic: one CPU, zero counters, btime {SOURCE_DATE_EPOCH}",
        "output_dir": f"/output starts empty, mode 0755, mtime {SOURCE_DATE_EPOCH}",
        "stdin": "/dev/null",
    }
    not_fixed: dict[str, str] = {}
    personality_problem = aslr_problem()
    if personality_problem is None:
        fixed["aslr"] = "off (personality ADDR_NO_RANDOMIZE): the same memory map in every run"
    else:
        not_fixed["aslr"] = f"on: {personality_problem}"
    clock_problem = time_namespace_problem()
    if clock_problem is None:
        fixed["clocks"] = (f"CLOCK_MONOTONIC and CLOCK_BOOTTIME (/proc/uptime) start at "
                           f"{spec.clock_start_s:g} s (own time namespace)")
    else:
        not_fixed["clocks"] = clock_problem
    if rlimit_plan.not_fixed:
        not_fixed["rlimits"] = "; ".join(f"{name} {why}"
                                         for name, why in sorted(rlimit_plan.not_fixed.items()))
    else:
        fixed["rlimits"] = "every one at a fixed value (FIXED_RLIMITS and the run's Limits)"
    if running_as_root:
        fixed["ids"] += ", no supplementary groups"
    elif extra := set(os.getgroups()) - {os.getgid()}:
        # bwrap cannot drop them: an unprivileged user namespace denies setgroups().
        not_fixed["groups"] = (f"the caller's {len(extra)} supplementary group(s) show as "
                               f"{SANDBOX_GID} (nogroup) inside")
    if spec.interactive:
        del fixed["stdin"]
        not_fixed["stdin"] = "the caller's (interactive run)"
    return fixed, not_fixed


def _exit_status_of_returncode(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _parse_json_status(data: bytes) -> dict[str, object]:
    """bwrap writes several JSON documents, one per line; merge them."""
    merged: dict[str, object] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if line:
            try:
                merged.update(json.loads(line))
            except ValueError:
                pass
    return merged


@dataclass
class _Streams:
    """Mutable state of one run's pipes (internal)."""

    on_stdout: Callable[[bytes], None] | None
    on_stderr: Callable[[bytes], None] | None
    status: bytearray = field(default_factory=bytearray)
    stderr_tail: bytearray = field(default_factory=bytearray)

    def stdout(self, data: bytes) -> None:
        if self.on_stdout is not None:
            self.on_stdout(data)

    def stderr(self, data: bytes) -> None:
        self.stderr_tail += data
        del self.stderr_tail[:-_STDERR_TAIL_BYTES]
        if self.on_stderr is not None:
            self.on_stderr(data)

    def json_status(self, data: bytes) -> None:
        self.status += data


def _pump(selector: selectors.BaseSelector, deadline: float | None) -> bool:
    """Deliver output until every pipe is closed; False if the deadline passed first."""
    while selector.get_map():
        timeout = None if deadline is None else deadline - time.monotonic()
        if timeout is not None and timeout <= 0:
            return False
        for key, _ in selector.select(timeout):
            try:
                data = os.read(key.fd, _READ_CHUNK)
            except BlockingIOError:
                continue
            if not data:
                selector.unregister(key.fd)
                continue
            key.data(data)
    return True


def _wait_exit(process: subprocess.Popen[bytes], deadline: float | None) -> bool:
    """Reap bwrap; False if the deadline passed first."""
    if deadline is None:
        process.wait()
        return True
    if process.poll() is not None:
        return True
    # A pidfd wakes us at exit; Popen.wait(timeout) would poll with sleeps.
    pidfd = os.pidfd_open(process.pid)
    try:
        with selectors.DefaultSelector() as exit_selector:
            exit_selector.register(pidfd, selectors.EVENT_READ)
            if not exit_selector.select(max(0.0, deadline - time.monotonic())):
                return False
    finally:
        os.close(pidfd)
    process.wait()
    return True


def _kill_process_group(process: subprocess.Popen[bytes]) -> None:
    if process.returncode is not None:
        return  # reaped: its group id may belong to someone else now
    try:
        # bwrap leads its own session; its pid-1 dies with it (--die-with-parent), and with
        # pid 1 the whole pid namespace, double-forked daemons included.
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_half_spawned(pid_read: int) -> None:
    """Kill a bwrap whose Popen was interrupted (Ctrl-C while spawning): Popen neither
    returned its pid nor killed it. The child wrote its pid into `pid_read`'s pipe first
    thing; EOF without a pid means no child was forked."""
    report = bytearray()
    deadline = time.monotonic() + 1.0
    with selectors.DefaultSelector() as selector:
        selector.register(pid_read, selectors.EVENT_READ)
        # EOF comes once the child exec'd or died (its copy of the write end is close-on-exec).
        while (remaining := deadline - time.monotonic()) > 0 and selector.select(remaining):
            data = os.read(pid_read, 32)
            if not data:
                break
            report += data
    if not report:
        return
    pid = int(report)
    try:
        os.killpg(pid, signal.SIGKILL)  # its own session: pgid == pid, not yet reaped
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _teardown(process: subprocess.Popen[bytes] | None, cgroups: list[RunCgroup]) -> None:
    """Kill everything of the run and remove its cgroups; survives repeated Ctrl-C."""
    pending: BaseException | None = None
    for _attempt in range(5):
        try:
            if process is not None:
                _kill_process_group(process)
                for cgroup in cgroups:
                    _kill_cgroup_members(cgroup)  # backstop for anything outside the group
                process.wait()
            remove_run_cgroups(cgroups)
            break
        except KeyboardInterrupt as exc:
            pending = exc
    if pending is not None:
        raise pending


def run_sandbox(spec: SandboxSpec, *, on_stdout: Callable[[bytes], None] | None = None,
                on_stderr: Callable[[bytes], None] | None = None) -> SandboxResult:
    """Run `spec.argv` in the sandbox, streaming its stdout/stderr to the callbacks.

    Output with no callback is dropped. Raises SandboxError if the sandbox could not be set
    up (the payload never ran). Any exception while the payload runs, KeyboardInterrupt
    included, kills the whole sandbox and is re-raised; nothing is left behind.
    """
    bwrap = _find_bwrap()
    _check_rootfs(spec)
    limits = spec.limits
    running_as_root = os.geteuid() == 0
    try:
        if running_as_root:
            # The payload is host uid SANDBOX_UID: its /output must be writable by it.
            os.chown(spec.output_dir, SANDBOX_UID, SANDBOX_GID)
        # What `ls -ld /output` shows must not depend on the caller's umask or the time.
        os.chmod(spec.output_dir, 0o755)
        os.utime(spec.output_dir, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH))
    except OSError as exc:
        raise SandboxError(f"cannot prepare the output directory {spec.output_dir} for the "
                           f"sandbox uid {SANDBOX_UID if running_as_root else os.getuid()}: "
                           f"{exc.strerror}") from None

    enforced: dict[str, str] = {}
    if limits.timeout is not None:
        enforced["timeout"] = f"{limits.timeout:g} s wall clock (whole sandbox killed)"
    enforced["network"] = "none (own network namespace with only loopback)"
    enforced["tmp"] = (f"tmpfs {limits.tmp_bytes} bytes at /tmp and at /dev/shm"
                       " (their pages count as memory)")

    cgroups, cgroup_enforced = create_run_cgroups(limits)
    process: subprocess.Popen[bytes] | None = None
    status_read = status_write = options_fd = proc_stat_fd = pid_read = pid_write = -1
    selector = selectors.DefaultSelector()
    try:
        enforced.update(cgroup_enforced)
        rlimit_plan = plan_rlimits(
            limits, have_memory_cgroup="memory" in cgroup_enforced,
            have_pids_cgroup="pids" in cgroup_enforced, running_as_root=running_as_root)
        enforced.update(rlimit_plan.enforced)
        not_enforced = {
            name: "no writable cgroup with this controller and no fallback"
            for name, wanted in (("memory", limits.memory_bytes), ("pids", limits.pids))
            if wanted is not None and name not in enforced}
        fixed, not_fixed = plan_determinism(spec, rlimit_plan, running_as_root=running_as_root)

        pid_read, pid_write = os.pipe()
        child_setup = ChildSetup(
            pid_report_fd=pid_write,
            cgroup_procs_files=tuple(str(c.join_file) for c in cgroups),
            rlimits=rlimit_plan.rlimits,
            drop_to=(SANDBOX_UID, SANDBOX_GID) if running_as_root else None,
            personality=None if "aslr" in not_fixed else _libc_personality(),
            signals_to_default=_ignored_signals(), cpus=_pick_cpus(),
            unshare=None if "clocks" in not_fixed else _libc_unshare(),
            clock_start_ns=round(spec.clock_start_s * 1e9))
        status_read, status_write = os.pipe()
        proc_stat_fd = _memfd("proc-stat", PROC_STAT)
        options_fd = _options_fd(spec, json_status_fd=status_write, proc_stat_fd=proc_stat_fd)
        started = time.monotonic()
        deadline = None if limits.timeout is None else started + limits.timeout
        try:
            process = subprocess.Popen(
                [bwrap, "--args", str(options_fd), "--", *spec.argv],
                stdin=None if spec.interactive else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={},
                pass_fds=(status_write, options_fd, proc_stat_fd), start_new_session=True,
                preexec_fn=child_setup)
        except (OSError, subprocess.SubprocessError) as exc:
            # Popen has reaped the child already.
            raise SandboxError(f"sandbox set-up failed: could not start bwrap ({exc}; "
                               "joining cgroups, setting rlimits, pinning a CPU, making a "
                               "time namespace or dropping privileges)") from None
        except BaseException:
            os.close(pid_write)
            pid_write = -1
            _kill_half_spawned(pid_read)
            raise
        for fd in (status_write, options_fd, proc_stat_fd, pid_write, pid_read):
            os.close(fd)
        status_write = options_fd = proc_stat_fd = pid_write = pid_read = -1

        streams = _Streams(on_stdout, on_stderr)
        assert process.stdout is not None and process.stderr is not None
        for fd, sink in ((process.stdout.fileno(), streams.stdout),
                         (process.stderr.fileno(), streams.stderr),
                         (status_read, streams.json_status)):
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ, sink)

        # Not finished while bwrap lives: the payload may have closed its output and go on.
        timed_out = not _pump(selector, deadline) or not _wait_exit(process, deadline)
        # On success bwrap is gone already, and with it the pid namespace; on a timeout this
        # kills everything. Either way the run's cgroups go.
        duration = time.monotonic() - started
        _teardown(process, cgroups)
        status = _parse_json_status(bytes(streams.status))
    except BaseException:
        _teardown(process, cgroups)
        raise
    finally:
        selector.close()
        for fd in (status_read, status_write, options_fd, proc_stat_fd, pid_read, pid_write):
            if fd >= 0:
                os.close(fd)
        if process is not None:
            for pipe in (process.stdout, process.stderr):
                if pipe is not None:
                    pipe.close()

    def result(exit_status: int | None) -> SandboxResult:
        return SandboxResult(
            exit_status, timed_out, duration,
            limits_enforced=MappingProxyType(dict(sorted(enforced.items()))),
            limits_not_enforced=MappingProxyType(dict(sorted(not_enforced.items()))),
            determinism=MappingProxyType(dict(sorted(fixed.items()))),
            determinism_not_fixed=MappingProxyType(dict(sorted(not_fixed.items()))))

    if timed_out:
        return result(None)
    exit_code = status.get("exit-code")
    if isinstance(exit_code, int):
        return result(exit_code)
    message = _bwrap_message(streams.stderr_tail.decode("utf-8", "replace"))
    assert process.returncode is not None
    if message is None and "child-pid" in status:
        # The sandbox started but bwrap lost its payload's status (e.g. the OOM killer chose
        # bwrap's own pid 1): report what bwrap itself died of.
        return result(_exit_status_of_returncode(process.returncode))
    raise _setup_error(message or f"bwrap exited with status {process.returncode} "
                       "before starting the payload", running_as_root=running_as_root)


def _setup_error(message: str, *, running_as_root: bool) -> SandboxError:
    if _looks_like_namespace_failure(message):
        return SandboxUnavailableError(f"sandbox set-up failed: {message}; "
                                       f"{_user_namespace_hint()}")
    hint = ""
    if running_as_root and "Permission denied" in message:
        hint = (f" (the sandbox starts as uid {SANDBOX_UID}: rootfs, input and every parent "
                "directory must be world-readable and traversable)")
    return SandboxError(f"sandbox set-up failed: {message}{hint}")
