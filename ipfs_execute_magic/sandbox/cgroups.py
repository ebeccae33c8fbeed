"""Per-run cgroups: the memory and pids limits of the whole sandbox.

A run gets its own cgroup directory (one per v1 hierarchy, or one in the v2 tree) wherever
this machine lets us write one: root's own `ipfs-execute` directory, or a delegated subtree
next to our own cgroup. The cgroup is removed after the run, after killing whatever is left
in it; a later run sweeps those a killed run left behind.
"""

from __future__ import annotations

import functools
import os
import secrets
import signal
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal, NamedTuple

from ..settings import Limits

_CGROUP_PARENT = "ipfs-execute"
# The CPU quota's period (the kernel's default) and its smallest quota, in microseconds.
_CPU_PERIOD_US = 100_000
_MIN_CPU_QUOTA_US = 1_000
_KILL_GRACE_S = 2.0  # how long teardown waits for killed processes to vanish


class CgroupMount(NamedTuple):
    path: Path
    version: Literal[1, 2]
    controllers: frozenset[str]  # v1: bound to this hierarchy; v2: available at its root


class RunCgroup(NamedTuple):
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


def _cpu_quota_us(cpus: float) -> int:
    return max(_MIN_CPU_QUOTA_US, round(cpus * _CPU_PERIOD_US))


def _limit_files(
    version: int, limits: Limits, cpuset: str | None = None, mems: str = ""
) -> dict[str, list[tuple[str, str]]]:
    """controller -> [(file, value)] to write into a run cgroup, in order. `cpuset`: the
    CPUs ("3", "0,2") the sandbox may run on; `mems`: the memory nodes of a v1 cpuset."""
    files: dict[str, list[tuple[str, str]]] = {}
    if limits.memory_bytes is not None:
        memory = str(limits.memory_bytes)
        if version == 1:
            # memsw (memory+swap) must not be set below memory; it is absent without swap
            # accounting, so it is optional.
            files["memory"] = [
                ("memory.limit_in_bytes", memory),
                ("?memory.memsw.limit_in_bytes", memory),
            ]
        else:
            files["memory"] = [("memory.max", memory), ("?memory.swap.max", "0")]
    if limits.pids is not None:
        files["pids"] = [("pids.max", str(limits.pids))]
    if limits.cpus is not None:
        quota = str(_cpu_quota_us(limits.cpus))
        if version == 1:
            files["cpu"] = [
                ("cpu.cfs_period_us", str(_CPU_PERIOD_US)),
                ("cpu.cfs_quota_us", quota),
            ]
        else:
            files["cpu"] = [("cpu.max", f"{quota} {_CPU_PERIOD_US}")]
    if cpuset is not None:
        # Affinity the payload cannot widen: sched_setaffinity is cut down to the cpuset.
        # A v1 cpuset takes no task before it has CPUs and memory nodes.
        files["cpuset"] = [("cpuset.cpus", cpuset)]
        if version == 1:
            files["cpuset"].append(("cpuset.mems", mems))
    return files


def _v1_cpuset_inherit(parent: Path) -> None:
    """Fill our v1 cpuset parent's CPUs and memory nodes from the hierarchy's root: a new v1
    cpuset starts with none (unless cgroup.clone_children is set)."""
    for name in ("cpuset.cpus", "cpuset.mems"):
        try:
            if not (parent / name).read_text().strip():
                _write(parent / name, (parent.parent / name).read_text().strip())
        except OSError:
            return  # the run cgroup under it will fail and say so by its absence


def _try_make_run_cgroup(
    path: Path, version: Literal[1, 2], files: Mapping[str, list[tuple[str, str]]]
) -> RunCgroup | None:
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


# Our `ipfs-execute` parents this process has set up and swept (see _make_in_our_parent).
_parents_ready: set[Path] = set()


def _make_in_our_parent(
    parent: Path, name: str, version: Literal[1, 2], files: Mapping[str, list[tuple[str, str]]]
) -> RunCgroup | None:
    """A run cgroup in our own `ipfs-execute` dir.

    The dir stays once made (an empty cgroup costs nothing; making, sweeping and removing it
    took about 0.6 ms of every run). A process sets it up and sweeps what killed runs left
    there at its first run in it, and again whenever it had to make the dir (someone removed
    it).
    """
    for _attempt in range(3):
        try:
            parent.mkdir()
            _parents_ready.discard(parent)
        except FileExistsError:
            pass
        except OSError:
            return None
        # Runs differ in the controllers they need: checked every time (one read).
        if version == 2 and not _v2_controllers_enabled(parent, files, may_enable=True):
            return None
        if parent not in _parents_ready:
            if version == 1 and "cpuset" in files:
                _v1_cpuset_inherit(parent)
            _sweep_stale(parent)
            _parents_ready.add(parent)
        try:
            return _try_make_run_cgroup(parent / name, version, files)
        except FileNotFoundError:
            continue
    return None


def _v2_controllers_enabled(parent: Path, controllers: Iterable[str], *, may_enable: bool) -> bool:
    """Whether children of `parent` get `controllers`; enable them only in our own dir."""
    wanted = set(controllers)
    try:
        enabled = set((parent / "cgroup.subtree_control").read_text().split())
        if wanted <= enabled:
            return True
        if not may_enable:
            return False  # someone else's cgroup: never change its configuration
        _write(
            parent / "cgroup.subtree_control",
            " ".join(f"+{name}" for name in sorted(wanted - enabled)),
        )
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


def _make_v2_run_cgroup(
    mount: CgroupMount, name: str, usable: Mapping[str, list[tuple[str, str]]]
) -> RunCgroup | None:
    """A v2 run cgroup with every controller of `usable`: in root's own parent, else in a
    delegated subtree next to our own cgroup; None if no parent has them all enabled."""
    if os.geteuid() == 0 and _v2_controllers_enabled(mount.path, usable, may_enable=False):
        cgroup = _make_in_our_parent(mount.path / _CGROUP_PARENT, name, 2, usable)
        if cgroup is not None:
            return cgroup
    for parent in _v2_delegated_parents(mount):
        # Moving a process needs write access to the common ancestor's cgroup.procs.
        if (
            os.access(parent, os.W_OK)
            and os.access(parent / "cgroup.procs", os.W_OK)
            and _v2_controllers_enabled(parent, usable, may_enable=False)
        ):
            try:
                # Among someone else's cgroups: say whose it is.
                cgroup = _try_make_run_cgroup(parent / f"{_CGROUP_PARENT}-{name}", 2, usable)
            except FileNotFoundError:
                continue
            if cgroup is not None:
                return cgroup
    return None


def _v1_root_mems(mounts: Iterable[CgroupMount]) -> str:
    mount = next((m for m in mounts if m.version == 1 and "cpuset" in m.controllers), None)
    try:
        return "" if mount is None else (mount.path / "cpuset.mems").read_text().strip()
    except OSError:
        return ""


def create_run_cgroups(
    limits: Limits, *, cpus: Iterable[int] = ()
) -> tuple[list[RunCgroup], dict[str, str]]:
    """Per-run cgroups for the memory, pids and CPU limits, and a cpuset of `cpus` (the CPUs
    the sandbox is pinned to); and how they enforce them."""
    mounts = _cgroup_mounts_here()
    cpuset = ",".join(str(cpu) for cpu in sorted(cpus)) or None
    wanted = _limit_files(1, limits, cpuset, _v1_root_mems(mounts) if cpuset else "")
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
    remaining = {c: f for c, f in _limit_files(2, limits, cpuset).items() if c not in enforced}
    for mount in (m for m in mounts if m.version == 2):
        usable = {c: f for c, f in remaining.items() if c in mount.controllers}
        if not usable:
            continue
        cgroup = _make_v2_run_cgroup(mount, name, usable)
        if cgroup is None and "cpuset" in usable and len(usable) > 1:
            # Delegated subtrees often lack the cpuset controller (systemd delegates cpu,
            # memory and pids): the other limits must not be lost with it.
            usable = {c: f for c, f in usable.items() if c != "cpuset"}
            cgroup = _make_v2_run_cgroup(mount, name, usable)
        if cgroup is not None:
            cgroups.append(cgroup)
            for controller in usable:
                enforced[controller] = "cgroup v2"
                remaining.pop(controller)

    described: dict[str, str] = {}
    if limits.memory_bytes is not None and "memory" in enforced:
        described["memory"] = (
            f"{limits.memory_bytes} bytes ({enforced['memory']}; whole sandbox incl. its tmpfs)"
        )
    if limits.pids is not None and "pids" in enforced:
        described["pids"] = f"{limits.pids} ({enforced['pids']}; processes and threads)"
    if limits.cpus is not None and "cpu" in enforced:
        described["cpus"] = (
            f"{limits.cpus:g} CPUs of time ({enforced['cpu']}: a quota of "
            f"{_cpu_quota_us(limits.cpus)} us every {_CPU_PERIOD_US} us)"
        )
    if cpuset is not None and "cpuset" in enforced:
        described["cpuset"] = (
            f"CPU {cpuset} ({enforced['cpuset']} cpuset: the payload cannot widen its affinity)"
        )
    return cgroups, described


def kill_cgroup_members(cgroup: RunCgroup) -> None:
    """SIGKILL everything in `cgroup` (at once through cgroup.kill where v2 has it)."""
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
    """Kill whatever is left in the run cgroups and remove them (our parents stay)."""
    cgroups = list(cgroups)
    deadline = time.monotonic() + deadline_s
    for cgroup in cgroups:
        # Removed at the first try when the run has ended (its pid namespace took every
        # process with it); only a busy cgroup has its members listed and killed.
        while True:
            try:
                cgroup.path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    break  # left for the next run's sweep
                kill_cgroup_members(cgroup)
                time.sleep(0.001)  # the last tasks are still being reaped


def _counter(text: str, name: str) -> int | None:
    """The value of `name N` in a flat-keyed cgroup file (memory.events, memory.oom_control)."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == name and value.strip().isdigit():
            return int(value)
    return None


def memory_limit_killed(cgroups: Iterable[RunCgroup]) -> bool:
    """Whether the run's memory cgroup OOM-killed a process of the run.

    Read before teardown removes the cgroup. v2 counts kills in `memory.events`, v1 (kernel
    4.13+) in `memory.oom_control`; an older v1 kernel only counts how often usage hit the
    limit (`memory.failcnt`), the closest sign it has.
    """
    for cgroup in cgroups:
        if "memory" not in cgroup.controllers:
            continue
        try:
            if cgroup.version == 2:
                kills = _counter((cgroup.path / "memory.events").read_text(), "oom_kill")
                return bool(kills)
            kills = _counter((cgroup.path / "memory.oom_control").read_text(), "oom_kill")
            if kills is not None:
                return kills > 0
            return int((cgroup.path / "memory.failcnt").read_text()) > 0
        except (OSError, ValueError):
            return False
    return False
