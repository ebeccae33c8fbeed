"""The payload's seccomp filter and pid 1 out of its reach, in the manner of Flatpak's
tests/test-seccomp.sh: a static C program (tests/programs/seccomp_probe.c) makes each denied
system call inside the real sandbox and prints the errno it got; a few allowed ones must
still work."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import world_traversable_tmpdir

from ipfs_execute_magic.errors import SandboxError
from ipfs_execute_magic.sandbox import MOUNT_POINTS, SandboxSpec, payload_view, run_sandbox
from ipfs_execute_magic.sandbox.seccomp import SANDBOX_POLICY, SeccompPolicy, SyscallRule
from ipfs_execute_magic.settings import Limits

PROBE_SOURCE = Path(__file__).parent / "programs" / "seccomp_probe.c"

DENIED = {
    "io_uring_setup": "ENOSYS",
    "perf_event_open": "EPERM",
    "keyctl": "EPERM",
    "add_key": "EPERM",
    "request_key": "EPERM",
    "userfaultfd": "EPERM",
    "bpf": "EPERM",
    "syslog": "EPERM",
    "socket_vsock": "EAFNOSUPPORT",
    "socket_alg": "EAFNOSUPPORT",
    "socket_packet": "EAFNOSUPPORT",
    "socket_netlink_audit": "EPROTONOSUPPORT",
    "socket_unix_high_bits": "EAFNOSUPPORT",
    "ioctl_tiocsti": "EPERM",
    "ioctl_tiocsti_high_bits": "EPERM",
    "ioctl_tioclinux": "EPERM",
    "unshare_user": "EPERM",
    "unshare_net": "EPERM",
    "setns": "EPERM",
    "clone_newnet": "EPERM",
    "clone_newpid": "EPERM",
    "clone3": "ENOSYS",
    "mount": "EPERM",
    "umount2": "EPERM",
    "pivot_root": "EPERM",
    "chroot": "EPERM",
    "fsopen": "ENOSYS",
    "open_tree": "ENOSYS",
    "mount_setattr": "ENOSYS",
    "personality_bsd": "EPERM",
    "personality_query": "EPERM",
    "ptrace_attach_pid1": "EPERM",
    "ptrace_traceme": "EPERM",
    "process_vm_readv_pid1": "EPERM",
    "process_vm_writev_self": "EPERM",
    "pidfd_getfd_pid1": "EPERM",
    "kcmp": "EPERM",
    # Not the filter: pid 1's memory files are covered by an unopenable /dev/null.
    "open_pid1_mem": "EACCES",
    "open_pid1_task_mem": "EACCES",
}
ALLOWED = (
    "pipe",
    "write",
    "mmap",
    "thread",
    "fork",
    "socket_unix",
    "socket_inet",
    "socket_inet6",
    "socket_netlink_route",
    "personality_sandbox",
    "pidfd_open_pid1",
    # Accepted, and dropped by the kernel: pid 1 of a pid namespace ignores SIGSTOP from
    # inside it.
    "kill_stop_pid1",
)
# The same calls through the i386 ABI (int 0x80 from the 64-bit program).
DENIED_IA32 = {
    "ia32_ptrace_attach_pid1": "EPERM",
    "ia32_unshare_net": "EPERM",
    "ia32_io_uring_setup": "ENOSYS",
    "ia32_socket_vsock": "EAFNOSUPPORT",
    "ia32_socketcall_vsock": "EAFNOSUPPORT",
    "ia32_keyctl": "EPERM",
}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def probe_rootfs() -> Iterator[Path]:
    """A rootfs with the probe program and a static busybox (sh, sleep)."""
    base = world_traversable_tmpdir("iex-seccomp-")
    root = base / "rootfs"
    for name in ("bin", *MOUNT_POINTS):
        (root / name).mkdir(parents=True)
    probe = root / "bin" / "probe"
    subprocess.run(
        ["gcc", "-static", "-O2", "-pthread", "-Wall", "-Werror", "-o", str(probe), PROBE_SOURCE],
        check=True,
        capture_output=True,
    )
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    for applet in ("sh", "sleep", "echo"):
        (root / "bin" / applet).symlink_to("busybox")
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755)
    yield root
    shutil.rmtree(base)


def _run_probe(root: Path) -> tuple[dict[str, str], float, bool]:
    output_dir = Path(tempfile.mkdtemp(prefix="output-", dir=root.parent))
    stdout, stderr = bytearray(), bytearray()
    spec = SandboxSpec(root, root / "input", output_dir, ("/bin/probe",), Limits(timeout=30))
    result = run_sandbox(spec, on_stdout=stdout.extend, on_stderr=stderr.extend)
    assert result.exit_status == 0, stderr.decode()
    lines = dict(line.split(" ", 1) for line in stdout.decode().splitlines())
    return lines, result.duration_s, result.timed_out


def test_denied_system_calls_fail_with_their_errno_and_allowed_ones_work(probe_rootfs) -> None:
    results, duration_s, timed_out = _run_probe(probe_rootfs)
    assert {name: results.get(name) for name in DENIED} == DENIED
    assert {name: results.get(name) for name in ALLOWED} == dict.fromkeys(ALLOWED, "ok")
    if results.get("ia32") != "unsupported":
        assert {name: results.get(name) for name in DENIED_IA32} == DENIED_IA32
        assert results["ia32_getppid"] == "ok"
    # Nothing stopped bwrap's pid 1: the run ended on its own, promptly.
    assert results["pid1_state"] in ("S", "R")
    assert not timed_out and duration_s < 10


def test_the_filter_is_compiled_once_and_keyed_by_its_rules() -> None:
    assert SANDBOX_POLICY.bpf() is SANDBOX_POLICY.bpf()
    profile = payload_view(Limits()).profile()["seccomp"]
    assert SANDBOX_POLICY.name in profile and SANDBOX_POLICY.digest() in profile
    fewer = SANDBOX_POLICY._replace(rules=SANDBOX_POLICY.rules[1:])
    assert fewer.digest() != SANDBOX_POLICY.digest()
    assert fewer.bpf() != SANDBOX_POLICY.bpf()


# Prints the program's hex and whether getting it imported pyseccomp (compiled).
_PROGRAM_OF_A_NEW_PROCESS = """\
import sys
from pathlib import Path
from ipfs_execute_magic.sandbox.seccomp import SANDBOX_POLICY, remember_filters_in
remember_filters_in(Path(sys.argv[1]))
print(SANDBOX_POLICY.bpf().hex(), "pyseccomp" in sys.modules)
"""


def test_a_compiled_filter_is_remembered_for_the_next_process(tmp_path: Path) -> None:
    def new_process() -> tuple[str, bool]:
        done = subprocess.run(
            [sys.executable, "-c", _PROGRAM_OF_A_NEW_PROCESS, str(tmp_path)],
            capture_output=True,
            text=True,
            check=True,
        )
        program, compiled = done.stdout.split()
        return program, compiled == "True"

    assert new_process() == (SANDBOX_POLICY.bpf().hex(), True)
    (remembered,) = (tmp_path / "seccomp").glob("*.bpf")
    # The next process loads it: no pyseccomp, no compiling (about 10 ms of a CLI run).
    assert new_process() == (SANDBOX_POLICY.bpf().hex(), False)
    # A damaged one (not whole instructions) is compiled again and replaced; another
    # version's is dropped.
    remembered.write_bytes(b"\x06\x00\x00")
    other_version = tmp_path / "seccomp" / "0123.bpf"
    other_version.write_bytes(bytes(8))
    assert new_process() == (SANDBOX_POLICY.bpf().hex(), True)
    assert remembered.read_bytes() == SANDBOX_POLICY.bpf() and not other_version.exists()


def test_a_rule_for_an_unknown_system_call_is_a_clear_error() -> None:
    policy = SeccompPolicy("broken", (SyscallRule("no_such_call", "EPERM"),))
    with pytest.raises(SandboxError, match=r"seccomp rule for no_such_call: .*libseccomp"):
        policy.bpf()


def _children(parent: int) -> list[int]:
    children = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rfind(")") + 2 :].split()[1]) == parent:
            children.append(int(name))
    return children


def test_a_stopped_bwrap_ends_the_run_with_a_clear_error(probe_rootfs) -> None:
    # Nothing inside can stop pid 1 (above); something outside still could, and then bwrap
    # would hold the output pipes until the timeout.
    stopped: list[int] = []

    def stop_the_sandbox_init(_data: bytes) -> None:
        if not stopped:
            (bwrap,) = (pid for pid in _children(os.getpid()) if _children(pid))
            (init,) = _children(bwrap)
            os.kill(init, signal.SIGSTOP)
            stopped.append(init)

    output_dir = Path(tempfile.mkdtemp(prefix="output-", dir=probe_rootfs.parent))
    argv = ("/bin/sh", "-c", "echo ready; sleep 60")
    spec = SandboxSpec(probe_rootfs, probe_rootfs / "input", output_dir, argv, Limits(timeout=60))
    started = time.monotonic()
    with pytest.raises(SandboxError, match=r"pid 1 \(bwrap's init\), host pid \d+, was stopped"):
        run_sandbox(spec, on_stdout=stop_the_sandbox_init)
    assert time.monotonic() - started < 10
    # Killed with the rest of the sandbox (reaped by whoever inherited it, soon).
    deadline = time.monotonic() + 5
    while Path(f"/proc/{stopped[0]}/stat").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{stopped[0]}/stat").exists()
