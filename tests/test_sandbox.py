"""The bubblewrap sandbox, against the real bwrap with a busybox rootfs.

Only the argv and parsing tests are pure; everything else starts real sandboxes. CI runs this
as root (the tool then drops to a host uid of the run's own before starting bwrap).
"""

from __future__ import annotations

import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import package_copy_for_other_users

from ipfs_execute_magic.errors import SandboxError
from ipfs_execute_magic.sandbox import (
    DEFAULT_ENV,
    FIXED_RLIMITS,
    PROC_STAT,
    SOURCE_DATE_EPOCH,
    Bind,
    RoBind,
    RoBindData,
    SandboxResult,
    SandboxSpec,
    Tmpfs,
    bwrap_argv,
    bwrap_version,
    cgroup_mounts,
    cgroups,
    check_available,
    plan_rlimits,
    rlimits,
    run_sandbox,
    time_namespace_problem,
)
from ipfs_execute_magic.sandbox.run import _kill_half_spawned
from ipfs_execute_magic.settings import DEFAULT_UID_RANGE, Limits

BUSYBOX = Path("/bin/busybox")
APPLETS = (
    "sh",
    "cat",
    "echo",
    "ls",
    "sleep",
    "id",
    "mkdir",
    "wget",
    "nc",
    "env",
    "hostname",
    "head",
    "tail",
    "tr",
    "wc",
    "seq",
    "grep",
    "setsid",
    "touch",
    "stat",
    "ifconfig",
    "true",
    "kill",
    "pwd",
    "unshare",
    "nproc",
    "cut",
)
# Marks every payload process of this test run, so the host can be searched for leftovers.
MARKER = f"sbxmark{secrets.token_hex(6)}"


# --- fixtures ---------------------------------------------------------------------------------


def _make_rootfs(root: Path, *, with_init: bool = True) -> Path:
    root.parent.chmod(0o755)
    for name in ("bin", "sbin", "input", "output", "tmp", "proc", "dev"):
        (root / name).mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    if with_init:
        (root / "sbin" / "init").write_text('#!/bin/busybox sh\nexec "$@"\n')
        (root / "sbin" / "init").chmod(0o755)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755)
    return root


@pytest.fixture(scope="session")
def base_dir() -> Iterator[Path]:
    # Not pytest's tmp_path: the unprivileged-caller tests run the tool as another user here.
    base = Path(tempfile.mkdtemp(prefix="sandbox-test-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base)


@pytest.fixture(scope="session")
def rootfs(base_dir: Path) -> Path:
    return _make_rootfs(base_dir / "rootfs")


@pytest.fixture(scope="session")
def input_dir(base_dir: Path) -> Path:
    directory = base_dir / "input"
    directory.mkdir()
    (directory / "data.txt").write_text("input data\n")
    for path in (directory, directory / "data.txt"):
        path.chmod(0o755)
    return directory


def _host_leftovers() -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if MARKER.encode() in cmdline:
            found.append(f"process {pid}: {cmdline!r}")
    # Run cgroups are named after the process that made them: only ours count here.
    found.extend(
        f"cgroup {path}" for path in Path("/sys/fs/cgroup").glob(f"**/*run-{os.getpid()}-*")
    )
    return found


def _mount_count() -> int:
    # Not counted: the /output images and shuffled views of whole runs, which other test
    # processes on the machine may be mounting meanwhile (run_sandbox itself mounts neither).
    return sum(
        " - ext4 /dev/loop" not in line and "fuse.disorderfs" not in line
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
    )


@pytest.fixture(autouse=True)
def nothing_left_behind() -> Iterator[None]:
    mounts_before = _mount_count()
    yield
    assert _host_leftovers() == []
    assert _mount_count() == mounts_before


@dataclass
class Run:
    result: SandboxResult
    stdout: bytes
    stderr: bytes
    output_dir: Path


@pytest.fixture
def run(rootfs: Path, input_dir: Path, base_dir: Path):
    def run_script(script: str, limits: Limits | None = None, **spec_changes: object) -> Run:
        output_dir = Path(tempfile.mkdtemp(prefix="output-", dir=base_dir))
        stdout, stderr = bytearray(), bytearray()
        spec = SandboxSpec(
            rootfs=rootfs,
            input_dir=input_dir,
            output_dir=output_dir,
            argv=("/sbin/init", "sh", "-c", script),
            limits=limits or Limits(timeout=20),
            **spec_changes,
        )  # type: ignore[arg-type]
        result = run_sandbox(spec, on_stdout=stdout.extend, on_stderr=stderr.extend)
        return Run(result, bytes(stdout), bytes(stderr), output_dir)

    return run_script


# --- pure -------------------------------------------------------------------------------------


def _spec(**changes: object) -> SandboxSpec:
    values: dict[str, object] = dict(
        rootfs=Path("/r"),
        input_dir=Path("/in"),
        output_dir=Path("/out"),
        argv=("/sbin/init", "true"),
        limits=Limits(tmp_bytes=1234),
    )
    values.update(changes)
    return SandboxSpec(**values)  # type: ignore[arg-type]


def test_option_objects_render_their_bwrap_arguments() -> None:
    assert RoBind(Path("/r"), "/").args() == ("--ro-bind", "/r", "/")
    assert Bind(Path("/o"), "/output").args() == ("--bind", "/o", "/output")
    assert Tmpfs("/tmp", 1024).args() == ("--perms", "1777", "--size", "1024", "--tmpfs", "/tmp")


def test_bwrap_argv_isolates_everything() -> None:
    argv = bwrap_argv(_spec(), json_status_fd=7, bwrap="/usr/bin/bwrap")
    assert argv[0] == "/usr/bin/bwrap"
    assert argv[-3:] == ["--", "/sbin/init", "true"]
    options = " ".join(argv[:-3])
    for expected in (
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--cap-drop ALL",
        "--clearenv",
        "--hostname sandbox",
        "--uid 0 --gid 0",
        "--ro-bind /r /",
        "--ro-bind /in /input",
        "--bind /out /output",
        "--size 1234 --tmpfs /tmp",
        "--proc /proc",
        "--dev /dev",
        "--size 1234 --tmpfs /dev/shm",
        "--remount-ro /dev",
        "--chdir /",
        "--json-status-fd 7",
    ):
        assert expected in options
    assert "--share-net" not in argv
    # / first: later mounts land on top of it.
    assert argv.index("--ro-bind") < argv.index("--bind") < argv.index("--tmpfs")
    for name, value in DEFAULT_ENV.items():
        assert f"--setenv {name} {value}" in options


def test_bwrap_argv_binds_the_synthetic_proc_stat_over_the_fresh_proc() -> None:
    assert RoBindData(9, "/proc/stat").args() == (
        "--perms",
        "444",
        "--ro-bind-data",
        "9",
        "/proc/stat",
    )
    argv = bwrap_argv(_spec(), proc_stat_fd=9)
    options = " ".join(argv)
    assert "--proc /proc --perms 444 --ro-bind-data 9 /proc/stat" in options
    assert "--ro-bind-data" not in bwrap_argv(_spec())
    # Exactly one CPU line, which is what glibc counts without /sys.
    cpu_lines = [line for line in PROC_STAT.decode().splitlines() if line.startswith("cpu")]
    assert [line.split()[0] for line in cpu_lines] == ["cpu", "cpu0"]


def test_spec_rejects_an_impossible_clock_start() -> None:
    with pytest.raises(SandboxError):
        _spec(clock_start_s=-1.0)


def _rlimit_table(plan) -> dict[str, tuple[int, int]]:
    names = {
        getattr(resource, name): name
        for name in dir(resource)
        if name.startswith("RLIMIT_") and name != "RLIMIT_OFILE"
    }  # OFILE: NOFILE's alias
    names[10] = "RLIMIT_LOCKS"  # not in Python's resource module
    return {names[which]: (soft, hard) for which, soft, hard in plan.rlimits}


def test_plan_rlimits_sets_every_rlimit(monkeypatch) -> None:
    monkeypatch.setattr(rlimits, "_can_raise_hard_limits", lambda: True)
    plan = plan_rlimits(
        Limits(file_bytes=None, cpu_seconds=7, open_files=512),
        have_memory_cgroup=True,
        have_pids_cgroup=True,
        running_as_root=True,
    )
    table = _rlimit_table(plan)
    # Linux has 16 rlimits (RLIM_NLIMITS): none is left at the host's value.
    assert sorted(which for which, _soft, _hard in plan.rlimits) == list(range(16))
    inf = resource.RLIM_INFINITY
    assert table["RLIMIT_FSIZE"] == (inf, inf)  # None: unlimited, not inherited
    assert table["RLIMIT_CPU"] == (7, 7)
    assert table["RLIMIT_NOFILE"] == (512, 512)
    assert table["RLIMIT_NPROC"] == (inf, inf)  # the pids cgroup limits processes
    for name, wanted in FIXED_RLIMITS.items():
        assert table[name] == wanted
    assert plan.not_fixed == {}


def test_plan_rlimits_reports_what_an_unprivileged_caller_cannot_reach(monkeypatch) -> None:
    monkeypatch.setattr(rlimits, "_can_raise_hard_limits", lambda: False)
    real_getrlimit = resource.getrlimit
    low_memlock = 64 * 1024  # the kernel's default before 5.16

    def fake_getrlimit(which: int) -> tuple[int, int]:
        if which == resource.RLIMIT_MEMLOCK:
            return low_memlock, low_memlock
        return real_getrlimit(which)

    monkeypatch.setattr(rlimits.resource, "getrlimit", fake_getrlimit)
    plan = plan_rlimits(
        Limits(), have_memory_cgroup=True, have_pids_cgroup=True, running_as_root=False
    )
    assert _rlimit_table(plan)["RLIMIT_MEMLOCK"] == (low_memlock, low_memlock)
    assert "caller's hard limit is lower" in plan.not_fixed["RLIMIT_MEMLOCK"]
    # Lowering is always allowed: the fixed pending-signals value is always reached.
    assert "RLIMIT_SIGPENDING" not in plan.not_fixed


def test_bwrap_argv_keeps_payload_dashes_as_payload() -> None:
    argv = bwrap_argv(_spec(argv=("--version",)))
    assert argv[-2:] == ["--", "--version"]


def test_spec_rejects_nul_and_empty_argv() -> None:
    with pytest.raises(SandboxError):
        _spec(argv=())
    with pytest.raises(SandboxError):
        _spec(argv=("a\0b",))


def test_cgroup_mounts_parses_v1_and_v2() -> None:
    mountinfo = textwrap.dedent("""\
        35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
        39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
        41 31 0:38 / /nonexistent/unified rw,relatime - cgroup2 cgroup2 rw
        22 1 8:1 / / rw - ext4 /dev/vda rw
        """)
    mounts = cgroup_mounts(mountinfo)
    assert [(str(m.path), m.version) for m in mounts] == [
        ("/sys/fs/cgroup/memory", 1),
        ("/sys/fs/cgroup/pids", 1),
        ("/nonexistent/unified", 2),
    ]
    assert "memory" in mounts[0].controllers
    assert mounts[2].controllers == frozenset()


# --- availability -----------------------------------------------------------------------------


def test_bwrap_is_available_here() -> None:
    check_available()
    assert bwrap_version().count(".") == 2


# --- behaviour ----------------------------------------------------------------------------------


def test_hello_world_writes_output(run) -> None:
    done = run("echo hello > /output/greeting; cat /input/data.txt")
    assert done.result.exit_status == 0
    assert not done.result.timed_out
    assert done.stdout == b"input data\n"
    greeting = done.output_dir / "greeting"
    assert greeting.read_text() == "hello\n"
    if os.geteuid() == 0:
        first, last = DEFAULT_UID_RANGE
        assert first <= greeting.stat().st_uid <= last


def test_exit_status_passes_through(run) -> None:
    assert run("exit 3").result.exit_status == 3
    assert run("kill -9 $$").result.exit_status == 128 + signal.SIGKILL


def test_stdout_and_stderr_stream_separately_while_running(rootfs, input_dir, base_dir) -> None:
    arrivals: list[tuple[str, bytes, float]] = []
    output_dir = Path(tempfile.mkdtemp(dir=base_dir))
    script = "echo first; echo oops >&2; sleep 1; echo second"
    spec = SandboxSpec(
        rootfs, input_dir, output_dir, ("/sbin/init", "sh", "-c", script), Limits(timeout=20)
    )
    result = run_sandbox(
        spec,
        on_stdout=lambda data: arrivals.append(("out", data, time.monotonic())),
        on_stderr=lambda data: arrivals.append(("err", data, time.monotonic())),
    )
    finished = time.monotonic()
    assert result.exit_status == 0
    out = b"".join(data for kind, data, _ in arrivals if kind == "out")
    err = b"".join(data for kind, data, _ in arrivals if kind == "err")
    assert (out, err) == (b"first\nsecond\n", b"oops\n")
    first_arrival = min(when for _, _, when in arrivals)
    assert finished - first_arrival > 0.8  # delivered before the payload slept and ended


def test_no_network(run) -> None:
    done = run(
        "tail -n +3 /proc/net/dev; "
        "if wget -T 2 -q -O- http://1.1.1.1/ ; then echo CONNECTED; fi; "
        "if echo x | nc -w 1 10.0.2.2 80; then echo CONNECTED; fi"
    )
    interfaces = [line.split(":")[0].strip() for line in done.stdout.decode().splitlines()]
    assert interfaces == ["lo"]
    assert b"CONNECTED" not in done.stdout
    assert b"unreachable" in done.stderr.lower()


def test_only_output_and_tmp_are_writable(run) -> None:
    done = run(
        "for path in /x /input/x /bin/x /dev/x /output/x /tmp/x /dev/shm/x; do "
        "  if touch $path 2>/dev/null; then echo writable $path; fi; done; "
        "if echo sandbox > /proc/sys/kernel/hostname; then echo writable sysctl; fi; "
        "if echo 1 > /proc/sysrq-trigger; then echo writable sysrq; fi"
    )
    assert done.stdout.decode().split("\n") == [
        "writable /output/x",
        "writable /tmp/x",
        "writable /dev/shm/x",
        "",
    ]
    assert not (done.output_dir.parent / "x").exists()


def test_identity_capabilities_and_determinism_knobs(run) -> None:
    done = run(
        "grep -E '^Cap(Eff|Prm|Bnd)' /proc/self/status; id -u; id -g; hostname; umask; "
        "cat /proc/self/personality; pwd"
    )
    lines = done.stdout.decode().split("\n")
    assert lines[:3] == [
        "CapPrm:\t0000000000000000",
        "CapEff:\t0000000000000000",
        "CapBnd:\t0000000000000000",
    ]
    assert lines[3:9] == ["0", "0", "sandbox", "0022", "00040000", "/"]


def test_cpu_count_clocks_and_rlimits_are_fixed_inside(run) -> None:
    done = run(
        "nproc; grep -c '^cpu[0-9]' /proc/stat; cut -d' ' -f1 /proc/uptime; "
        "ulimit -i; ulimit -l; ulimit -s; stat -c '%a %Y' /output; "
        "grep Cpus_allowed_list /proc/self/status"
    )
    nproc, stat_cpus, uptime, sigpending, memlock, stack, output_dir, allowed = (
        done.stdout.decode().splitlines()
    )
    assert (nproc, stat_cpus) == ("1", "1")
    assert len(allowed.split()[1].split(",")) == 1 and "-" not in allowed.split()[1]
    assert sigpending == "1024"
    assert (memlock, stack) == ("8192", "8192")
    assert output_dir == f"755 {SOURCE_DATE_EPOCH}"
    determinism = done.result.determinism
    for source in ("hostname", "environment", "umask", "ids", "cwd", "cpu_count", "proc_stat"):
        assert source in determinism
    not_fixed = done.result.determinism_not_fixed
    assert set(determinism).isdisjoint(not_fixed)
    if time_namespace_problem() is None:
        assert 1.0 <= float(uptime) < 3.0  # starts at CLOCK_START_S, as on a fresh boot
        assert "clocks" in determinism
    else:
        assert not_fixed["clocks"] == time_namespace_problem()
    # The time namespace was the sandbox's: this process and its later children keep ours.
    assert os.readlink("/proc/self/ns/time") == os.readlink("/proc/self/ns/time_for_children")


def test_aslr_is_off_so_memory_maps_repeat(run) -> None:
    maps = [run("cat /proc/self/maps").stdout for _ in range(2)]
    assert maps[0] == maps[1]
    assert "aslr" in run("true").result.determinism


def test_consecutive_runs_are_spread_over_the_cpus(run) -> None:
    cpus = {run("grep Cpus_allowed_list /proc/self/status").stdout for _ in range(2)}
    # One CPU each, but not the same one (where there are two to choose from).
    assert len(cpus) == min(2, len(os.sched_getaffinity(0)))


def test_no_host_paths_in_cmdline_no_stray_fds_no_nested_user_namespaces(run, base_dir) -> None:
    done = run("cat /proc/1/cmdline; echo; ls /proc/self/fd; unshare -U true || echo no-userns")
    cmdline, *fds, last, _ = done.stdout.split(b"\n")
    # bwrap's options came through --args. (/proc/self/mountinfo still names bind sources.)
    assert str(base_dir).encode() not in cmdline
    assert fds == [b"0", b"1", b"2", b"3"]  # 3 is ls's own directory handle
    assert last == b"no-userns"


def test_environment_is_exactly_the_fixed_one(rootfs, input_dir, base_dir) -> None:
    output = bytearray()
    spec = SandboxSpec(
        rootfs, input_dir, Path(tempfile.mkdtemp(dir=base_dir)), ("/bin/env",), Limits(timeout=20)
    )
    assert run_sandbox(spec, on_stdout=output.extend).exit_status == 0
    environment = dict(line.split("=", 1) for line in output.decode().splitlines())
    # bwrap itself exports PWD after --chdir; it is fixed too.
    assert environment == {**DEFAULT_ENV, "PWD": "/"}


def test_limits_enforced_reports_what_this_machine_enforces(run) -> None:
    limits = Limits(
        timeout=20,
        memory_bytes=128 * 1024**2,
        pids=64,
        tmp_bytes=1024**2,
        file_bytes=10**6,
        cpu_seconds=30,
    )
    enforced = run("true", limits).result.limits_enforced
    assert enforced["timeout"].startswith("20 s")
    assert enforced["tmp"].startswith("tmpfs 1048576 bytes")
    assert "RLIMIT_FSIZE" in enforced["file_size"]
    assert "RLIMIT_CPU" in enforced["cpu_time"]
    assert "RLIMIT_NOFILE" in enforced["open_files"]
    if os.geteuid() == 0 and Path("/sys/fs/cgroup/memory/cgroup.procs").exists():
        assert enforced["memory"] == "134217728 bytes (cgroup v1; whole sandbox incl. its tmpfs)"
        assert enforced["pids"].startswith("64 (cgroup v1")


def test_timeout_kills_double_forked_escapees(run) -> None:
    escape = (
        f"setsid sh -c '(sh -c \"sleep 1000; : {MARKER}\" &); sleep 1000; : {MARKER}' & "
        f"sh -c 'sleep 1000; : {MARKER}' & echo started; sleep 1000"
    )
    started = time.monotonic()
    done = run(escape, Limits(timeout=1.0))
    assert done.result.timed_out
    assert done.result.exit_status is None
    assert done.stdout == b"started\n"
    assert time.monotonic() - started < 3.0
    # the autouse fixture checks that no MARKER process and no cgroup is left


def test_fork_bomb_is_contained_by_the_pids_limit(run) -> None:
    # A subshell starts sleepers until fork fails (which ends it); then the outer shell reads
    # the subshell's complaint and counts the processes with builtins only, since it cannot
    # fork any more either.
    bomb = (
        f"(for i in $(seq 100); do sh -c 'sleep 30; : {MARKER}' & done) 2>/tmp/err; "
        'read -r complaint < /tmp/err; set -- /proc/[0-9]*; echo "$# $complaint"'
    )
    done = run(bomb, Limits(timeout=20, pids=32))
    assert done.result.exit_status == 0
    count, complaint = done.stdout.decode().strip().split(" ", 1)
    assert "fork" in complaint  # the bomb ran into the limit...
    assert 1 < int(count) <= 32  # ...which held (how many got started before depends on load)


def test_memory_hog_is_killed_by_the_memory_limit(run) -> None:
    hog = "x=$(head -c 300000000 /dev/zero | tr '\\0' a); echo survived"
    done = run(hog, Limits(timeout=30, memory_bytes=64 * 1024**2, tmp_bytes=1024**2))
    if "cgroup" not in done.result.limits_enforced["memory"]:
        pytest.skip("no memory cgroup here")
    assert b"survived" not in done.stdout
    assert done.result.exit_status == 128 + signal.SIGKILL


def test_tmp_is_size_limited(run) -> None:
    done = run(
        "head -c 3000000 /dev/zero > /tmp/big; echo $?; wc -c < /tmp/big",
        Limits(timeout=20, tmp_bytes=1024**2),
    )
    status, size = done.stdout.split()
    assert status != b"0"
    assert int(size) <= 1024**2


def test_file_size_limit(run) -> None:
    done = run("head -c 300000 /dev/zero > /output/big", Limits(timeout=20, file_bytes=100_000))
    assert done.result.exit_status != 0
    assert (done.output_dir / "big").stat().st_size == 100_000


def test_missing_init_is_a_set_up_failure(base_dir: Path, input_dir: Path) -> None:
    bare = _make_rootfs(Path(tempfile.mkdtemp(dir=base_dir)) / "rootfs", with_init=False)
    spec = SandboxSpec(
        bare,
        input_dir,
        Path(tempfile.mkdtemp(dir=base_dir)),
        ("/sbin/init", "true"),
        Limits(timeout=20),
    )
    with pytest.raises(SandboxError) as raised:
        run_sandbox(spec)
    assert str(raised.value) == (
        "sandbox set-up failed: bwrap: execvp /sbin/init: No such file or directory"
    )


def test_symlinked_mount_point_is_refused(base_dir: Path, input_dir: Path) -> None:
    planted = _make_rootfs(Path(tempfile.mkdtemp(dir=base_dir)) / "rootfs")
    (planted / "tmp").rmdir()
    (planted / "tmp").symlink_to("/etc")
    spec = SandboxSpec(
        planted,
        input_dir,
        Path(tempfile.mkdtemp(dir=base_dir)),
        ("/sbin/init", "true"),
        Limits(timeout=20),
    )
    with pytest.raises(SandboxError, match="no real directory /tmp"):
        run_sandbox(spec)


def test_interrupt_from_a_callback_kills_the_sandbox(rootfs, input_dir, base_dir) -> None:
    raised_at: list[float] = []

    def interrupt(_data: bytes) -> None:
        raised_at.append(time.monotonic())
        raise KeyboardInterrupt

    spec = SandboxSpec(
        rootfs,
        input_dir,
        Path(tempfile.mkdtemp(dir=base_dir)),
        ("/sbin/init", "sh", "-c", f"echo ready; sleep 1000; : {MARKER}"),
        Limits(timeout=10),
    )
    with pytest.raises(KeyboardInterrupt):
        run_sandbox(spec, on_stdout=interrupt)
    assert time.monotonic() - raised_at[0] < 1.0


def test_sigint_while_the_payload_sleeps(rootfs, input_dir, base_dir) -> None:
    sent_at: list[float] = []

    def send_sigint() -> None:
        sent_at.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    spec = SandboxSpec(
        rootfs,
        input_dir,
        Path(tempfile.mkdtemp(dir=base_dir)),
        ("/sbin/init", "sh", "-c", f"sleep 1000; : {MARKER}"),
        Limits(timeout=10),
    )
    # Python's own handler, even where SIGINT came in ignored (a `cmd &` background job).
    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.5, send_sigint)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_sandbox(spec)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous_handler)
    assert time.monotonic() - sent_at[0] < 1.0


def test_a_half_spawned_bwrap_is_killed_by_the_pid_it_reported() -> None:
    # What run_sandbox does when Ctrl-C lands inside Popen (which then returns no pid).
    pid_read, pid_write = os.pipe()

    def report_pid() -> None:
        os.write(pid_write, b"%d" % os.getpid())

    child = subprocess.Popen(
        ["sh", "-c", f"sleep 1000; : {MARKER}"], start_new_session=True, preexec_fn=report_pid
    )
    os.close(pid_write)
    _kill_half_spawned(pid_read)
    os.close(pid_read)
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(child.pid, 0)
    child.poll()  # lets Popen notice (it reads ECHILD as 0)


def test_interactive_passes_the_callers_stdin(rootfs, input_dir, base_dir) -> None:
    script = textwrap.dedent(f"""\
        import sys
        from pathlib import Path
        from ipfs_execute_magic.sandbox import SandboxSpec, run_sandbox
        from ipfs_execute_magic.settings import Limits
        spec = SandboxSpec(Path({str(rootfs)!r}), Path({str(input_dir)!r}),
                           Path({tempfile.mkdtemp(dir=base_dir)!r}),
                           ("/sbin/init", "sh", "-c", "read line; echo got $line"),
                           Limits(timeout=20), interactive=True)
        result = run_sandbox(spec, on_stdout=sys.stdout.buffer.write)
        sys.exit(result.exit_status)
        """)
    completed = subprocess.run(
        [sys.executable, "-c", script],
        input=b"typed words\n",
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert completed.stdout == b"got typed words\n", completed.stderr
    assert completed.returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="starts the tool as another user")
def test_unprivileged_caller_falls_back_to_rlimits(rootfs, input_dir, base_dir) -> None:
    # Most users' machines: not root, no writable cgroup. The venv's interpreter may live
    # under /root, so this uses the system one; the sandbox package needs only the standard
    # library and pyseccomp (one module file).
    python = shutil.which("python3", path="/usr/bin:/bin")  # Debian's python3 (./run installs it)
    assert python is not None, "Debian's python3 is missing: run ./run setup"
    # A copy of the package where uid 1000 can read it (the checkout may be under /root).
    package_parent = package_copy_for_other_users(base_dir)
    user = 1000
    output_dir = Path(tempfile.mkdtemp(dir=base_dir))
    os.chown(output_dir, user, user)
    script = textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {str(package_parent)!r})
        from pathlib import Path
        from ipfs_execute_magic.sandbox import SandboxSpec, run_sandbox
        from ipfs_execute_magic.settings import Limits
        spec = SandboxSpec(Path({str(rootfs)!r}), Path({str(input_dir)!r}),
                           Path({str(output_dir)!r}),
                           ("/sbin/init", "sh", "-c", "echo hi > /output/x; ulimit -v; ulimit -u"),
                           Limits(timeout=20, memory_bytes=256 * 1024**2, pids=32))
        result = run_sandbox(spec, on_stdout=sys.stdout.buffer.write)
        print(result.exit_status, result.limits_enforced["memory"],
              result.limits_enforced["pids"], " ".join(sorted(result.determinism_not_fixed)),
              sep="\\n")
        """)
    completed = subprocess.run(
        ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", python, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    address_space_kb, max_processes, status, memory, pids, not_fixed = completed.stdout.splitlines()
    assert address_space_kb == str(256 * 1024)
    assert int(max_processes) >= 32
    assert status == "0"
    assert memory.startswith(f"{256 * 1024**2} bytes of address space per process (RLIMIT_AS")
    assert pids.startswith("32 processes/threads (RLIMIT_NPROC")
    # No time namespace without privileges; the NPROC fallback counts the caller's processes.
    assert set(not_fixed.split()) >= {"clocks", "rlimits"}
    assert (output_dir / "x").stat().st_uid == user


@pytest.mark.skipif(not os.access("/sys/fs/cgroup/pids", os.W_OK), reason="needs cgroup v1 as root")
def test_stale_run_cgroups_of_dead_processes_are_swept(run, monkeypatch) -> None:
    parent = Path("/sys/fs/cgroup/pids/ipfs-execute")
    stale = parent / "run-999999999-deadbeef"
    stale.mkdir(parents=True, exist_ok=True)
    # A process sweeps at its first run in the parent: this test's runs are a new process's.
    monkeypatch.setattr(cgroups, "_parents_ready", set())
    try:
        run("true", Limits(timeout=20, pids=32))
        assert not stale.exists()
        # The parent stays for the next runs (making and removing it cost every run).
        assert parent.is_dir()
        assert not list(parent.glob(f"run-{os.getpid()}-*"))
    finally:
        if stale.exists():
            stale.rmdir()


def test_signals_ignored_by_the_caller_are_default_inside(run) -> None:
    previous_handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        done = run("grep SigIgn /proc/self/status")
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    ignored_mask = int(done.stdout.split()[1], 16)
    assert not ignored_mask & (1 << (signal.SIGINT - 1))


def test_non_interactive_stdin_is_empty(run) -> None:
    assert run("cat; echo end").stdout == b"end\n"


def test_the_result_says_which_limit_killed_the_run(run) -> None:
    hog = "x=$(head -c 300000000 /dev/zero | tr '\\0' a); echo survived"
    memory = Limits(timeout=30, memory_bytes=64 * 1024**2, tmp_bytes=1024**2)
    done = run(hog, memory)
    if "cgroup" not in done.result.limits_enforced["memory"]:
        pytest.skip("no memory cgroup here")
    assert done.result.exit_status == 128 + signal.SIGKILL
    assert done.result.killed_by == "memory"
    # The same status with memory to spare, and a success, are nobody's limit.
    assert run("kill -9 $$", memory).result.killed_by is None
    assert run("true", memory).result.killed_by is None
    assert run("sleep 30", Limits(timeout=0.5)).result.killed_by == "timeout"
