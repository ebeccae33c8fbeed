"""The payload's seccomp filter: which system calls it may not make, as data.

A blocklist in the manner of Flatpak's: everything is allowed except kernel facilities a
pure computation never needs and that have a history of kernel exploits, or that reach
outside the sandbox (namespaces, mounts, tracing other processes, sockets of families that
network namespaces do not isolate, faking terminal input). Denied calls fail with an errno
(EPERM, or ENOSYS where the C library falls back to an older call), never by killing the
process: software that probes for a feature keeps working.

The rules are data (`SANDBOX_POLICY`); they go into the payload's view (`PayloadView.seccomp`)
and so into the result-cache key by name and digest. The BPF program is compiled from them
with libseccomp (through PyPI `pyseccomp`, ctypes bindings with libseccomp's own Python API)
and bwrap loads it with `--seccomp FD` just before it execs the payload. A compiled program is
remembered once a process, and in the caller's data directory (`remember_filters_in`) for
what it depends on, so that a new process neither imports pyseccomp nor compiles (about
10 ms of a CLI run).
"""

from __future__ import annotations

import errno as errno_module
import functools
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any, Literal, NamedTuple

from ..errors import SandboxError
from ..files import replace_file

# ioctl requests (asm-generic/ioctls.h; the same on every architecture that has them).
_TIOCSTI = 0x5412  # push a byte into the terminal's input queue (CVE-2017-5226)
_TIOCLINUX = 0x541C  # console copy/paste, as good as TIOCSTI (CVE-2023-28100)

# clone() flags that make a namespace (linux/sched.h).
_CLONE_NAMESPACE_FLAGS: dict[str, int] = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}

# The persona the sandbox sets before bwrap (PER_LINUX | ADDR_NO_RANDOMIZE, see child.py):
# the only one the payload may (re)set.
SANDBOX_PERSONALITY = 0x0040000

_NETLINK_ROUTE = 0

# Socket families the payload may open, in numerical order. Its network namespace has only a
# loopback interface, so INET and INET6 reach nothing outside; UNIX sockets reach only what
# is bound into the sandbox (abstract ones are per network namespace); NETLINK is allowed for
# its ROUTE protocol only (getaddrinfo and if_nameindex ask it about the interfaces).
ALLOWED_SOCKET_FAMILIES: tuple[int, ...] = tuple(
    int(family)  # plain ints: the rules are hashed as JSON
    for family in (
        socket.AF_UNSPEC,
        socket.AF_UNIX,
        socket.AF_INET,
        socket.AF_INET6,
        socket.AF_NETLINK,
    )
)

Comparison = Literal["eq", "ne", "ge", "masked_eq"]


class ArgCheck(NamedTuple):
    """A condition on one argument of a call: `args[arg] <op> value`, or for masked_eq
    `args[arg] & mask == value`."""

    arg: int  # which argument, from 0 (not `index`: that is a tuple's method)
    op: Comparison
    value: int
    mask: int = 0


class SyscallRule(NamedTuple):
    """Deny `syscall` with `errno` (a name, e.g. "EPERM") when every check holds."""

    syscall: str
    errno: str
    checks: tuple[ArgCheck, ...] = ()


def _deny(errno: str, *syscalls: str) -> tuple[SyscallRule, ...]:
    return tuple(SyscallRule(name, errno) for name in syscalls)


def _socket_family_rules(allowed: tuple[int, ...]) -> tuple[SyscallRule, ...]:
    """socket() of any family outside `allowed` fails with EAFNOSUPPORT, as for a family this
    kernel does not have; NETLINK sockets other than ROUTE fail with EPROTONOSUPPORT."""
    rules = [
        SyscallRule("socket", "EAFNOSUPPORT", (ArgCheck(0, "eq", family),))
        for family in range(max(allowed))
        if family not in allowed
    ]
    # Everything above the last allowed family, and any value with high bits set.
    rules.append(SyscallRule("socket", "EAFNOSUPPORT", (ArgCheck(0, "ge", max(allowed) + 1),)))
    if socket.AF_NETLINK in allowed:
        rules.append(
            SyscallRule(
                "socket",
                "EPROTONOSUPPORT",
                (ArgCheck(0, "eq", int(socket.AF_NETLINK)), ArgCheck(2, "ne", _NETLINK_ROUTE)),
            )
        )
    return tuple(rules)


def _clone_flags_arg() -> int:
    # s390 passes clone()'s flags second (the stack comes first).
    return 1 if os.uname().machine.startswith("s390") else 0


SANDBOX_RULES: tuple[SyscallRule, ...] = (
    # Kernel log, accounting, quotas, the kernel keyring, NUMA memory policy, 16-bit segments
    # and a long-obsolete loader: host information or old exploit surface (Flatpak's list).
    *_deny("EPERM", "syslog", "uselib", "acct", "quotactl", "modify_ldt"),
    *_deny("EPERM", "add_key", "keyctl", "request_key"),
    *_deny("EPERM", "move_pages", "mbind", "get_mempolicy", "set_mempolicy", "migrate_pages"),
    # No new namespaces and no mount changes: the sandbox's own are final. clone3 passes its
    # flags in memory a filter cannot read: ENOSYS makes the C library fall back to clone().
    *_deny("EPERM", "unshare", "setns", "mount", "umount", "umount2", "pivot_root", "chroot"),
    *(
        SyscallRule("clone", "EPERM", (ArgCheck(_clone_flags_arg(), "masked_eq", flag, flag),))
        for flag in _CLONE_NAMESPACE_FLAGS.values()
    ),
    *_deny("ENOSYS", "clone3"),
    *_deny("ENOSYS", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick"),
    *_deny("ENOSYS", "mount_setattr"),
    # No faked terminal input, even where a terminal is shared (interactive runs).
    SyscallRule("ioctl", "EPERM", (ArgCheck(1, "masked_eq", _TIOCSTI, 0xFFFFFFFF),)),
    SyscallRule("ioctl", "EPERM", (ArgCheck(1, "masked_eq", _TIOCLINUX, 0xFFFFFFFF),)),
    # Other processes stay out of reach, bwrap's pid 1 above all (same uid, no filter of its
    # own): no tracing, no reading or writing their memory, no taking their fds.
    *_deny("EPERM", "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp"),
    # Profiling, eBPF, userfaultfd and io_uring: large kernel surfaces, frequent CVEs; io_uring
    # also does I/O that seccomp never sees. ENOSYS: programs fall back to plain calls.
    *_deny("EPERM", "perf_event_open", "bpf", "userfaultfd"),
    *_deny("ENOSYS", "io_uring_setup", "io_uring_enter", "io_uring_register"),
    # Only the persona the sandbox gave it (no READ_IMPLIES_EXEC, no other emulation).
    SyscallRule("personality", "EPERM", (ArgCheck(0, "ne", SANDBOX_PERSONALITY),)),
    # The host's kernel, clock and devices: the payload has no capability for these; denied
    # here too so that a capability leak is not enough.
    *_deny("EPERM", "kexec_load", "kexec_file_load", "init_module", "finit_module"),
    *_deny("EPERM", "delete_module", "reboot", "swapon", "swapoff", "iopl", "ioperm"),
    *_deny("EPERM", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex"),
    *_deny("EPERM", "open_by_handle_at", "fanotify_init", "lookup_dcookie", "vhangup"),
    *_socket_family_rules(ALLOWED_SOCKET_FAMILIES),
)


class SeccompPolicy(NamedTuple):
    """A named list of rules; what the payload's view records of its filter."""

    name: str
    rules: tuple[SyscallRule, ...]

    def digest(self) -> str:
        """sha256 of the rules as canonical JSON: changes whenever a rule does."""
        rules = [
            {
                "syscall": rule.syscall,
                "errno": rule.errno,
                # Keyed "index" as ever: the digest is part of every cache key.
                "checks": [
                    {"index": check.arg, "op": check.op, "value": check.value, "mask": check.mask}
                    for check in rule.checks
                ],
            }
            for rule in self.rules
        ]
        text = json.dumps(rules, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def describe(self) -> str:
        return f"{self.name} ({len(self.rules)} rules, sha256 {self.digest()})"

    def bpf(self) -> bytes:
        """The filter as a BPF program for `bwrap --seccomp FD`: compiled, or remembered."""
        return _remembered_bpf(self)


SANDBOX_POLICY = SeccompPolicy("ipfs-execute-blocklist-1", SANDBOX_RULES)


def _compat_arches(seccomp: Any) -> tuple[int, ...]:
    """The other ABIs this machine's kernel runs, which a filter must cover too: a 64-bit
    process can make 32-bit system calls (int 0x80 on x86_64), with other numbers."""
    arch, native = seccomp.Arch, seccomp.system_arch()
    extra = {arch.X86_64: (arch.X86,), arch.AARCH64: (arch.ARM,)}
    return extra.get(native, ())


# The sonames pyseccomp's import looks up with ctypes.util.find_library, which runs
# `ldconfig -p` for each (about 10 ms of a CLI run's start-up for the two).
_SONAMES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}


def _import_pyseccomp() -> Any:
    """pyseccomp, its libraries found by soname first (dlopen's own search), else as it would."""
    import ctypes
    import ctypes.util

    original = ctypes.util.find_library

    def find_library(name: str) -> str | None:
        soname = _SONAMES.get(name)
        if soname is not None:
            try:
                ctypes.CDLL(soname)
                return soname
            except OSError:
                pass
        return original(name)

    ctypes.util.find_library = find_library
    try:
        import pyseccomp
    finally:
        ctypes.util.find_library = original
    return pyseccomp


# Where compiled programs are kept across processes: a private directory (the data
# directory's `seccomp/`), or None to compile in every process.
_memo_dir: Path | None = None
# sock_filter: a BPF program is a whole number of 8-byte instructions.
_BPF_INSTRUCTION_BYTES = 8


def remember_filters_in(data_dir: Path | None) -> None:
    """Keep compiled filters in `data_dir`/seccomp from now on (None: not across processes).

    The directory must be the caller's own (the data directory is 0700): a program found
    there is loaded as it is.
    """
    global _memo_dir
    _memo_dir = None if data_dir is None else data_dir / "seccomp"


def _libseccomp_version() -> str | None:
    """libseccomp's version, asked of the library itself (dlopen, no ldconfig)."""
    import ctypes

    class Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]

    try:
        function = ctypes.CDLL(_SONAMES["seccomp"]).seccomp_version
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.POINTER(Version)
    version = function().contents
    return f"{version.major}.{version.minor}.{version.micro}"


def _memo_path(policy: SeccompPolicy) -> Path | None:
    """Where `policy`'s program is remembered: named after everything the program depends
    on, the rules, this module's code (how they are compiled), libseccomp and the machine."""
    if _memo_dir is None or (version := _libseccomp_version()) is None:
        return None
    try:
        code = Path(__file__).read_bytes()
    except OSError:
        return None
    key = hashlib.sha256(
        b"%s\0%s\0%s\0%s"
        % (policy.digest().encode(), code, version.encode(), os.uname().machine.encode())
    ).hexdigest()[:32]
    return _memo_dir / f"{key}.bpf"


@functools.cache
def _remembered_bpf(policy: SeccompPolicy) -> bytes:
    memo = _memo_path(policy)
    if memo is not None:
        try:
            program = memo.read_bytes()
        except OSError:
            program = b""
        if program and len(program) % _BPF_INSTRUCTION_BYTES == 0:
            return program
    program = _compile(policy)
    if memo is not None:
        _remember(memo, program)
    return program


def _remember(memo: Path, program: bytes) -> None:
    """Write the program whole (a reader meanwhile sees the old file or none), and drop every
    other program there: older code's are never used again, another policy's is compiled
    again when one is needed."""
    try:
        memo.parent.mkdir(mode=0o700, exist_ok=True)
        replace_file(memo, program)
        for other in memo.parent.glob("*.bpf"):
            if other != memo:
                other.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only data directory compiles every time


def _compile(policy: SeccompPolicy) -> bytes:
    try:
        seccomp = _import_pyseccomp()
    except (ImportError, RuntimeError, OSError) as exc:
        raise SandboxError(
            f"cannot build the sandbox's seccomp filter ({exc}): install libseccomp "
            "(Debian: libseccomp2) and the Python package pyseccomp"
        ) from None
    operators = {
        "eq": seccomp.EQ,
        "ne": seccomp.NE,
        "ge": seccomp.GE,
        "masked_eq": seccomp.MASKED_EQ,
    }
    try:
        # Allowed unless a rule says otherwise; another ABI than the filter knows is killed
        # (libseccomp's default for a bad architecture).
        filter_ = seccomp.SyscallFilter(seccomp.ALLOW)
        try:
            # A binary tree of system call numbers instead of a list: an allowed call, the
            # common case, passes a few comparisons instead of every rule's.
            filter_.set_attr(seccomp.Attr.CTL_OPTIMIZE, 2)
        except OSError:
            pass  # libseccomp before 2.5: the same filter, only slower
        for arch in _compat_arches(seccomp):
            filter_.add_arch(arch)
        for rule in policy.rules:
            number = seccomp.resolve_syscall(seccomp.Arch.NATIVE, rule.syscall)
            if number == -1:
                raise SandboxError(
                    f"seccomp rule for {rule.syscall}: this libseccomp does not know the "
                    "system call; install libseccomp 2.5 or newer"
                )
            args = [
                seccomp.Arg(check.arg, operators[check.op], check.mask, check.value)
                if check.op == "masked_eq"
                else seccomp.Arg(check.arg, operators[check.op], check.value)
                for check in rule.checks
            ]
            action = seccomp.ERRNO(getattr(errno_module, rule.errno))
            try:
                filter_.add_rule(action, number, *args)
            except OSError as exc:
                # EFAULT: the call does not exist on one of the architectures (fine: then
                # there is nothing to deny there).
                if exc.errno != errno_module.EFAULT:
                    raise
        # A memfd, not a pipe: export_bpf writes all of it before we read.
        fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
        with os.fdopen(fd, "w+b") as program:
            filter_.export_bpf(program)
            program.seek(0)
            return program.read()
    except OSError as exc:
        raise SandboxError(
            f"cannot build the sandbox's seccomp filter {policy.name}: libseccomp said "
            f"{exc.strerror or exc}; check that libseccomp 2.5 or newer is installed"
        ) from None
