"""What runs between fork and exec of bwrap, and the libc calls it needs.

ChildSetup is computed in the parent and only applied in the child: after fork nothing may
be imported, locked or loaded (dlopen), so every libc function is resolved beforehand. The
probes here (`aslr_problem`, `time_namespace_problem`) say once per process whether this
machine lets the child turn ASLR off and give the sandbox its own clocks.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
import resource
import signal
import subprocess
import time
from collections.abc import Callable
from typing import NamedTuple

from .probe import find_bwrap, known_time_namespace

_ADDR_NO_RANDOMIZE = 0x0040000
_PERSONALITY_QUERY = 0xFFFFFFFF
_CLONE_NEWTIME = 0x80
_CLONE_NEWNS = 0x00020000
_PR_SET_PDEATHSIG = 1
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x2, 0x4, 0x8
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 0x40000

_cpu_turn = itertools.count()


def _libc_function(name: str, argtypes: list[type]) -> Callable[..., int] | None:
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


@functools.cache
def libc_personality() -> Callable[[int], int] | None:
    return _libc_function("personality", [ctypes.c_ulong])


@functools.cache
def libc_unshare() -> Callable[[int], int] | None:
    return _libc_function("unshare", [ctypes.c_int])


@functools.cache
def libc_mount() -> Callable[..., int] | None:
    return _libc_function(
        "mount",
        [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p],
    )


@functools.cache
def _libc_prctl() -> Callable[..., int] | None:
    return _libc_function(
        "prctl", [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    )


def die_with_parent(signum: signal.Signals = signal.SIGTERM) -> Callable[[], None]:
    """A preexec_fn: the child gets `signum` when the thread that started it dies
    (PR_SET_PDEATHSIG). prctl is resolved now, in the parent."""
    prctl = _libc_prctl()

    def child() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)

    return child


@functools.cache
def aslr_problem() -> str | None:
    """Why ASLR cannot be turned off for the payload here, or None.

    Docker's default seccomp profile, for one, allows personality() only with a few values.
    """
    personality = libc_personality()
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
    unshare = libc_unshare()
    if unshare is None:
        return "unshare() is not available"
    if os.geteuid() != 0:
        # A time namespace needs CAP_SYS_ADMIN, and bwrap 0.8 has no option for one.
        return (
            "a time namespace needs root (CAP_SYS_ADMIN) and bwrap 0.8 cannot make one: "
            "the monotonic and boot clocks are the host's"
        )
    remembered = known_time_namespace.get(find_bwrap())
    if remembered is not None:
        return remembered or None
    try:
        subprocess.run(
            [find_bwrap(), "--version"],
            capture_output=True,
            check=True,
            timeout=10,
            env={},
            preexec_fn=lambda: _enter_time_namespace(unshare, 1_000_000_000),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot create a time namespace here ({exc})"
    return None


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


class PrivateBinds(NamedTuple):
    """The run's directories where the sandbox uid can reach them, seen by bwrap alone.

    Run by root, the tool keeps its data directory 0700, and bwrap (started as the run's
    unprivileged uid) resolves every bind source by path, with that uid's rights, `--bind-fd`
    included. So the child enters a mount namespace of its own, mounts a small tmpfs at `at`
    and binds each source there under its name; bwrap is given those paths. Nothing of it is
    visible outside the run, and it goes with the run's last process.
    """

    at: str
    sources: tuple[tuple[str, str], ...]  # (name under `at`, host directory)
    unshare: Callable[[int], int]
    mount: Callable[..., int]  # resolved before fork: dlopen is unsafe after
    # (source name, entry in it, host file or directory) bound over that entry after the
    # sources: the parts of an input staged by parts, which bwrap then binds along with it.
    nested: tuple[tuple[str, str, str], ...] = ()

    def path(self, name: str) -> str:
        return f"{self.at}/{name}"

    def enter(self) -> None:
        """In the forked child, as root: the namespace, the tmpfs and the binds."""
        _check(self.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        # The host's / is usually a shared mount: nothing mounted here may propagate back.
        _check(self.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "private mounts")
        # Opened before the tmpfs covers `at`: a source may lie under it.
        fds = [
            os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for _, source in self.sources
        ]
        nested_fds = [
            os.open(source, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
            for _, _, source in self.nested
        ]
        at = os.fsencode(self.at)
        flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
        _check(
            self.mount(b"tmpfs", at, b"tmpfs", flags, b"size=16k,nr_inodes=16,mode=0755"),
            f"tmpfs at {self.at}",
        )
        for (name, _), fd in zip(self.sources, fds, strict=True):
            target = os.fsencode(self.path(name))
            os.mkdir(target, 0o755)
            # Through the fd, not the path: what was checked is what gets bound.
            _check(
                self.mount(b"/proc/self/fd/%d" % fd, target, None, _MS_BIND | _MS_REC, None),
                f"bind at {self.path(name)}",
            )
            os.close(fd)
        for (parent, entry, _), fd in zip(self.nested, nested_fds, strict=True):
            target = os.fsencode(f"{self.path(parent)}/{entry}")
            _check(
                self.mount(b"/proc/self/fd/%d" % fd, target, None, _MS_BIND | _MS_REC, None),
                f"bind at {self.path(parent)}/{entry}",
            )
            os.close(fd)


def pick_cpus() -> tuple[int, ...]:
    """The allowed CPUs, rotated so that concurrent runs start on different ones."""
    allowed = sorted(os.sched_getaffinity(0))
    start = (os.getpid() + next(_cpu_turn)) % len(allowed)
    return tuple(allowed[start:] + allowed[:start])


def ignored_signals() -> tuple[signal.Signals, ...]:
    """The signals this process ignores (its children would inherit that through exec)."""
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


class ChildSetup(NamedTuple):
    """Everything done between fork and exec of bwrap; computed beforehand in the parent."""

    pid_report_fd: int  # the child writes its pid here first (see run._kill_half_spawned)
    cgroup_procs_files: tuple[str, ...]
    rlimits: tuple[tuple[int, int, int], ...]  # (resource, soft, hard)
    drop_to: tuple[int, int] | None  # (uid, gid) when started as root
    personality: Callable[[int], int] | None  # resolved before fork: dlopen is unsafe after
    umask: int
    cpu_count: int  # the sandbox is pinned to this many of `cpus`
    signals_to_default: tuple[signal.Signals, ...] = ()
    # Candidate CPUs, best first: the sandbox is pinned to the first `cpu_count` that work.
    cpus: tuple[int, ...] = ()
    unshare: Callable[[int], int] | None = None  # with clock_start_ns: own time namespace
    clock_start_ns: int | None = None
    private_binds: PrivateBinds | None = None  # as root: where bwrap finds the run's dirs

    def apply(self) -> None:
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
        os.umask(self.umask)
        if self.personality is not None:
            self.personality(_ADDR_NO_RANDOMIZE)  # inherited through exec: no ASLR inside
        if self.cpus:
            self._pin_cpus()
        if self.unshare is not None and self.clock_start_ns is not None:
            # Needs the privileges dropped just below; bwrap and the sandbox are its children.
            _enter_time_namespace(self.unshare, self.clock_start_ns)
        if self.private_binds is not None:
            self.private_binds.enter()  # needs root: before the privileges go
        if self.drop_to is not None:
            uid, gid = self.drop_to
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)

    def _pin_cpus(self) -> None:
        # Usually the first choice works; a CPU may have gone offline since the parent looked.
        for start in range(len(self.cpus) - self.cpu_count + 1):
            try:
                os.sched_setaffinity(0, self.cpus[start : start + self.cpu_count])
                return
            except OSError:
                continue
        raise OSError("cannot pin the sandbox to a CPU")
