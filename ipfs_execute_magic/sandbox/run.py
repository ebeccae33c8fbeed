"""run_sandbox: plan, spawn, collect; nothing of a run outlives it.

plan:    everything decided before a process exists: which limits are enforced and how, every
         rlimit, which sources of nondeterminism are fixed, what the child does before exec;
spawn:   bwrap started in the run's cgroups, its options passed through a memfd;
collect: output streamed to the callbacks until bwrap exits or the timeout, then the result.

Any exception on the way, KeyboardInterrupt included, kills the whole sandbox and removes its
cgroups before it propagates.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from ..errors import SandboxError
from .cgroups import (
    RunCgroup,
    create_run_cgroups,
    memory_limit_killed,
    remove_run_cgroups,
)
from .child import (
    ChildSetup,
    PrivateBinds,
    ignored_signals,
    libc_mount,
    libc_personality,
    libc_unshare,
    pick_cpus,
)
from .determinism import plan_determinism
from .options import BwrapOption, option_args
from .output_area import OutputWatch
from .probe import bwrap_message, find_bwrap, setup_error
from .rlimits import plan_rlimits
from .spec import SandboxResult, SandboxSpec, sandbox_options
from .uid_pool import HostIds, lease_host_ids
from .view import PayloadView, SizedTmpfs, mount_point_problem

OutputCallback = Callable[[bytes], None]

_READ_CHUNK = 65536
_STDERR_TAIL_BYTES = 8192
_STOPPED_CHECK_S = 1.0  # how often a running sandbox is checked for a stopped bwrap


def run_sandbox(
    spec: SandboxSpec,
    *,
    on_stdout: OutputCallback | None = None,
    on_stderr: OutputCallback | None = None,
) -> SandboxResult:
    """Run `spec.argv` in the sandbox, streaming its stdout/stderr to the callbacks.

    Output with no callback is dropped. Raises SandboxError if the sandbox could not be set
    up (the payload never ran). Any exception while the payload runs, KeyboardInterrupt
    included, kills the whole sandbox and is re-raised; nothing is left behind.

    Run by root, the sandbox gets a host uid of its own (uid_pool), held until it is gone.
    """
    if os.geteuid() != 0:
        return _run(spec, None, on_stdout=on_stdout, on_stderr=on_stderr)
    with lease_host_ids(spec.uid_range) as host_ids:
        return _run(spec, host_ids, on_stdout=on_stdout, on_stderr=on_stderr)


def _run(
    spec: SandboxSpec,
    host_ids: HostIds | None,
    *,
    on_stdout: OutputCallback | None,
    on_stderr: OutputCallback | None,
) -> SandboxResult:
    bwrap = find_bwrap()
    view = spec.view
    _check_dirs(spec, view)
    running_as_root = host_ids is not None
    _prepare_output_dir(spec, view, host_ids)
    watch = OutputWatch(spec.output_dir, spec.limits)
    # The CPUs chosen now: the run's cpuset holds the sandbox to the ones it is pinned to.
    cpus = pick_cpus()
    cgroups, cgroup_enforced = create_run_cgroups(spec.limits, cpus=cpus[: view.cpu_count])
    run = _Running(cgroups)
    try:
        plan = _plan(
            spec,
            view,
            cgroups,
            cgroup_enforced,
            running_as_root=running_as_root,
            host_ids=host_ids,
            cpus=cpus,
        )
        _spawn(run, bwrap, spec, plan)
        assert run.process is not None
        # Opened before anyone can reap bwrap: the watch kills exactly this process.
        with watch.watching(run.keep(os.pidfd_open(run.process.pid))):
            result = _collect(run, plan, on_stdout=on_stdout, on_stderr=on_stderr)
        return _with_output_watch(result, watch)
    except BaseException:
        run.teardown()
        raise
    finally:
        run.close()


def _with_output_watch(result: SandboxResult, watch: OutputWatch) -> SandboxResult:
    """The result with the /output limits, and the one passed (a payload may also have
    stopped by itself at a full /output: checked once more now that it is gone)."""
    enforced = {**result.limits_enforced, **watch.enforced()}
    exceeded = watch.check()
    return result._replace(
        limits_enforced=MappingProxyType(dict(sorted(enforced.items()))),
        killed_by=exceeded or result.killed_by,
    )


# --- before bwrap -------------------------------------------------------------------------------


def _check_dirs(spec: SandboxSpec, view: PayloadView) -> None:
    for path, what in (
        (spec.rootfs, "rootfs"),
        (spec.input_dir, "input"),
        (spec.output_dir, "output"),
    ):
        if not path.is_dir():
            raise SandboxError(f"sandbox {what} directory {path} does not exist")
    for name, path in spec.input_parts:
        # A top-level part's mount point is in the input dir; deeper ones are in a part.
        if not path.exists() or ("/" not in name and not (spec.input_dir / name).exists()):
            raise SandboxError(
                f"input part /input/{name} ({path}) or its mount point in {spec.input_dir} "
                "does not exist"
            )
    # Checked again although staging checked: bwrap 0.8 follows a symlinked mount point.
    problem = mount_point_problem(spec.rootfs, view.mount_points)
    if problem is not None:
        raise SandboxError(
            f"rootfs {spec.rootfs} has no real directory /{problem[0]} "
            "(a symlink or missing mount point is refused)"
        )


def _prepare_output_dir(spec: SandboxSpec, view: PayloadView, host_ids: HostIds | None) -> None:
    try:
        if host_ids is not None:
            # The payload is host uid host_ids.uid: its /output must be writable by it.
            os.chown(spec.output_dir, host_ids.uid, host_ids.gid)
        # What `ls -ld /output` shows must not depend on the caller's umask or the time.
        os.chmod(spec.output_dir, view.output_mode)
        os.utime(spec.output_dir, (view.mtime, view.mtime))
    except OSError as exc:
        raise SandboxError(
            f"cannot prepare the output directory {spec.output_dir} for the "
            f"sandbox uid {os.getuid() if host_ids is None else host_ids.uid}: "
            f"{exc.strerror}"
        ) from None


class _Plan(NamedTuple):
    """Everything decided before bwrap starts."""

    view: PayloadView
    child: ChildSetup  # its pid_report_fd is set by _spawn
    timeout_s: float | None
    enforced: Mapping[str, str]
    not_enforced: Mapping[str, str]
    fixed: Mapping[str, str]
    not_fixed: Mapping[str, str]
    running_as_root: bool


def _plan(
    spec: SandboxSpec,
    view: PayloadView,
    cgroups: list[RunCgroup],
    cgroup_enforced: Mapping[str, str],
    *,
    running_as_root: bool,
    host_ids: HostIds | None = None,
    cpus: tuple[int, ...] | None = None,
) -> _Plan:
    """What the run enforces and fixes, given the cgroups it got; probes the machine (cached)
    but starts nothing."""
    limits = spec.limits
    enforced: dict[str, str] = {}
    if limits.timeout is not None:
        enforced["timeout"] = f"{limits.timeout:g} s wall clock (whole sandbox killed)"
    enforced["network"] = "none (own network namespace with only loopback)"
    tmpfs_dests = " and at ".join(m.dest for m in view.mounts if isinstance(m, SizedTmpfs))
    enforced["tmp"] = f"tmpfs {view.tmp_bytes} bytes at {tmpfs_dests} (their pages count as memory)"
    enforced.update(cgroup_enforced)
    rlimit_plan = plan_rlimits(
        limits,
        have_memory_cgroup="memory" in cgroup_enforced,
        have_pids_cgroup="pids" in cgroup_enforced,
        running_as_root=running_as_root,
        fixed=view.rlimits,
    )
    enforced.update(rlimit_plan.enforced)
    not_enforced = {
        name: "no writable cgroup with this controller and no fallback"
        for name, wanted in (
            ("memory", limits.memory_bytes),
            ("pids", limits.pids),
            ("cpus", limits.cpus),
        )
        if wanted is not None and name not in enforced
    }
    if "cpuset" not in enforced:
        not_enforced["cpuset"] = (
            "no writable cpuset cgroup: the sandbox starts pinned to its CPU, but the payload "
            "can widen its affinity"
        )
    fixed, not_fixed = plan_determinism(
        view, rlimit_plan, interactive=spec.interactive, running_as_root=running_as_root
    )
    child = ChildSetup(
        pid_report_fd=-1,
        cgroup_procs_files=tuple(str(c.join_file) for c in cgroups),
        rlimits=rlimit_plan.rlimits,
        drop_to=None if host_ids is None else (host_ids.uid, host_ids.gid),
        personality=None if "aslr" in not_fixed else libc_personality(),
        umask=view.umask,
        cpu_count=view.cpu_count,
        signals_to_default=ignored_signals(),
        cpus=pick_cpus() if cpus is None else cpus,
        unshare=None if "clocks" in not_fixed else libc_unshare(),
        clock_start_ns=round(view.clock_start_s * 1e9),
        private_binds=None if host_ids is None else _private_binds(spec),
    )
    return _Plan(
        view,
        child,
        limits.timeout,
        MappingProxyType(enforced),
        MappingProxyType(not_enforced),
        MappingProxyType(fixed),
        MappingProxyType(not_fixed),
        running_as_root,
    )


# Where bwrap finds the run's directories when the tool runs as root (child.PrivateBinds): a
# directory every system has, covered only in the run's own mount namespace.
PRIVATE_BINDS_AT = "/tmp"


def _private_binds(spec: SandboxSpec) -> PrivateBinds:
    unshare, mount = libc_unshare(), libc_mount()
    if unshare is None or mount is None:
        raise SandboxError(
            "cannot bind the run's directories for the sandbox uid: unshare() or mount() is "
            "not available in this C library"
        )
    sources = (("rootfs", spec.rootfs), ("input", spec.input_dir), ("output", spec.output_dir))
    return PrivateBinds(
        PRIVATE_BINDS_AT,
        tuple((name, str(path)) for name, path in sources),
        unshare,
        mount,
        nested=tuple(("input", name, str(path)) for name, path in spec.input_parts),
    )


def _as_bound(spec: SandboxSpec, binds: PrivateBinds | None) -> SandboxSpec:
    """The spec with the directories where bwrap finds them."""
    if binds is None:
        return spec
    return replace(
        spec,
        rootfs=Path(binds.path("rootfs")),
        input_dir=Path(binds.path("input")),
        input_parts=(),  # bound inside the private input already: bwrap binds it recursively
        output_dir=Path(binds.path("output")),
    )


# --- starting bwrap -----------------------------------------------------------------------------


@dataclass
class _Running:
    """The live parts of one run, so that every way out kills and closes them (internal)."""

    cgroups: list[RunCgroup]
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0  # time.monotonic() when bwrap was started
    status_read: int = -1  # our end of bwrap's --json-status-fd
    fds: set[int] = field(default_factory=set)  # every fd of ours still open
    selector: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)
    torn_down: bool = False

    def pipe(self) -> tuple[int, int]:
        read, write = os.pipe()
        self.fds.update((read, write))
        return read, write

    def keep(self, fd: int) -> int:
        self.fds.add(fd)
        return fd

    def close_fd(self, fd: int) -> None:
        self.fds.discard(fd)
        os.close(fd)

    def teardown(self) -> None:
        if not self.torn_down:
            _teardown(self.process, self.cgroups)
            self.torn_down = True

    def close(self) -> None:
        self.selector.close()
        while self.fds:
            os.close(self.fds.pop())
        if self.process is not None:
            for pipe in (self.process.stdout, self.process.stderr):
                if pipe is not None:
                    pipe.close()


def _spawn(run: _Running, bwrap: str, spec: SandboxSpec, plan: _Plan) -> None:
    """Start bwrap; its child joins the cgroups and applies plan.child before exec."""
    pid_read, pid_write = run.pipe()
    child_setup = plan.child._replace(pid_report_fd=pid_write)
    run.status_read, status_write = run.pipe()
    proc_stat_fd = run.keep(_memfd("proc-stat", plan.view.proc_stat()))
    seccomp_fd = run.keep(_memfd("seccomp", plan.view.seccomp.bpf()))
    options_fd = run.keep(
        _options_fd(
            sandbox_options(
                _as_bound(spec, plan.child.private_binds),
                json_status_fd=status_write,
                proc_stat_fd=proc_stat_fd,
                seccomp_fd=seccomp_fd,
                view=plan.view,
            )
        )
    )
    run.started = time.monotonic()
    try:
        run.process = subprocess.Popen(
            [bwrap, "--args", str(options_fd), "--", *spec.argv],
            stdin=None if spec.interactive else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={},
            pass_fds=(status_write, options_fd, proc_stat_fd, seccomp_fd),
            start_new_session=True,
            preexec_fn=child_setup.apply,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        # Popen has reaped the child already.
        raise SandboxError(
            f"sandbox set-up failed: could not start bwrap ({exc}; "
            "joining cgroups, setting rlimits, pinning a CPU, making a "
            "time namespace or dropping privileges)"
        ) from None
    except BaseException:
        run.close_fd(pid_write)
        _kill_half_spawned(pid_read)
        raise
    # bwrap has its own copies (or, for the pid pipe, no more use for them).
    for fd in (status_write, options_fd, proc_stat_fd, seccomp_fd, pid_write, pid_read):
        run.close_fd(fd)


def _memfd(name: str, data: bytes) -> int:
    """A memfd holding `data`, positioned at its start (close-on-exec: pass it explicitly)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _options_fd(options: list[BwrapOption]) -> int:
    """A memfd holding the NUL-separated options, for `bwrap --args FD`."""
    return _memfd("bwrap-args", b"".join(os.fsencode(arg) + b"\0" for arg in option_args(options)))


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


# --- while it runs, and after -------------------------------------------------------------------


@dataclass
class _Streams:
    """Mutable state of one run's pipes (internal)."""

    on_stdout: OutputCallback | None
    on_stderr: OutputCallback | None
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


def _collect(
    run: _Running,
    plan: _Plan,
    *,
    on_stdout: OutputCallback | None,
    on_stderr: OutputCallback | None,
) -> SandboxResult:
    """Deliver output until bwrap is gone or the deadline passed, tear the run down, and say
    how it ended (or raise the set-up error when the payload never started)."""
    process = run.process
    assert process is not None and process.stdout is not None and process.stderr is not None
    streams = _Streams(on_stdout, on_stderr)
    for fd, sink in (
        (process.stdout.fileno(), streams.stdout),
        (process.stderr.fileno(), streams.stderr),
        (run.status_read, streams.json_status),
    ):
        os.set_blocking(fd, False)
        run.selector.register(fd, selectors.EVENT_READ, sink)

    deadline = None if plan.timeout_s is None else run.started + plan.timeout_s

    def check_not_stopped() -> None:
        _check_not_stopped(process.pid, _parse_json_status(bytes(streams.status)))

    # Not finished while bwrap lives: the payload may have closed its output and go on.
    timed_out = not _pump(run.selector, deadline, check_not_stopped) or not _wait_exit(
        process, deadline
    )
    duration = time.monotonic() - run.started
    status = _parse_json_status(bytes(streams.status))
    exit_code = status.get("exit-code")
    # Read while the cgroup exists (teardown removes it with its counters), and only for a
    # run that failed: no other can have been killed by the memory limit.
    memory_killed = not timed_out and exit_code != 0 and memory_limit_killed(run.cgroups)
    # On success bwrap is gone already, and with it the pid namespace; on a timeout this
    # kills everything. Either way the run's cgroups go.
    run.teardown()

    if timed_out:
        return _result(plan, None, timed_out, duration, memory_killed=memory_killed)
    if isinstance(exit_code, int):
        return _result(plan, exit_code, timed_out, duration, memory_killed=memory_killed)
    message = bwrap_message(streams.stderr_tail.decode("utf-8", "replace"))
    assert process.returncode is not None
    if message is None and "child-pid" in status:
        # The sandbox started but bwrap lost its payload's status (e.g. the OOM killer chose
        # bwrap's own pid 1): report what bwrap itself died of.
        return _result(
            plan,
            _exit_status_of_returncode(process.returncode),
            timed_out,
            duration,
            memory_killed=memory_killed,
        )
    raise setup_error(
        message or f"bwrap exited with status {process.returncode} before starting the payload",
        running_as_root=plan.running_as_root,
    )


def _result(
    plan: _Plan,
    exit_status: int | None,
    timed_out: bool,
    duration: float,
    *,
    memory_killed: bool,
) -> SandboxResult:
    def frozen(mapping: Mapping[str, str]) -> Mapping[str, str]:
        return MappingProxyType(dict(sorted(mapping.items())))

    killed_by = None
    if timed_out:
        killed_by = "timeout"
    elif memory_killed and exit_status != 0:
        # A payload that survived the loss of one of its processes is not reported as killed.
        killed_by = "memory"

    return SandboxResult(
        exit_status,
        timed_out,
        duration,
        limits_enforced=frozen(plan.enforced),
        limits_not_enforced=frozen(plan.not_enforced),
        determinism=frozen(plan.fixed),
        determinism_not_fixed=frozen(plan.not_fixed),
        killed_by=killed_by,
    )


def _pump(
    selector: selectors.BaseSelector,
    deadline: float | None,
    check: Callable[[], None] = lambda: None,
) -> bool:
    """Deliver output until every pipe is closed; False if the deadline passed first.
    `check` runs about every _STOPPED_CHECK_S and may raise to end the run."""
    next_check = time.monotonic() + _STOPPED_CHECK_S
    while selector.get_map():
        now = time.monotonic()
        if now >= next_check:
            check()
            next_check = now + _STOPPED_CHECK_S
        timeout = None if deadline is None else deadline - now
        if timeout is not None and timeout <= 0:
            return False
        timeout = next_check - now if timeout is None else min(timeout, next_check - now)
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


def _process_state(pid: int) -> str:
    """The state letter of /proc/PID/stat ("" when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # The name in parentheses may hold spaces and ")": the state follows the last ")".
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3]


def _check_not_stopped(bwrap_pid: int, status: Mapping[str, object]) -> None:
    """Raise if bwrap, or its init (the sandbox's pid 1), is stopped or stopped by a tracer:
    then it holds the output pipes and never exits, and the run would wait for its timeout."""
    init_pid = status.get("child-pid")
    for what, pid in (("bwrap", bwrap_pid), ("the sandbox's pid 1 (bwrap's init)", init_pid)):
        if isinstance(pid, int) and (state := _process_state(pid)) in ("T", "t"):
            how = "by a tracer" if state == "t" else "by a stop signal"
            raise SandboxError(
                f"{what}, host pid {pid}, was stopped {how}, so the run could not finish: it "
                "was killed; nothing inside the sandbox can do this, so look for what on this "
                "machine stops or traces processes of the sandbox's uid"
            )


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


def _kill_process_group(process: subprocess.Popen[bytes]) -> None:
    if process.returncode is not None:
        return  # reaped: its group id may belong to someone else now
    try:
        # bwrap leads its own session; its pid-1 dies with it (--die-with-parent), and with
        # pid 1 the whole pid namespace, double-forked daemons included.
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _teardown(process: subprocess.Popen[bytes] | None, cgroups: list[RunCgroup]) -> None:
    """Kill everything of the run and remove its cgroups; survives repeated Ctrl-C."""
    pending: BaseException | None = None
    for _attempt in range(5):
        try:
            if process is not None:
                _kill_process_group(process)
                process.wait()
            # Kills whatever is left in them (anything outside the group) until they are empty.
            remove_run_cgroups(cgroups)
            break
        except KeyboardInterrupt as exc:
            pending = exc
    if pending is not None:
        raise pending
